"""The standard RPC metric of every server (OpenTelemetry semantic conventions):
``rpc.server.call.duration`` in seconds per ``rpc.service``, ``rpc.method`` and
``rpc.grpc.status_code``; its count is the request count (Prometheus:
``rpc_server_call_duration_seconds_{bucket,count,sum}``).

Registered first, outside the error mapping, so it records the status the caller got.
opentelemetry-instrumentation-grpc makes spans only, no metrics: this is the metric half.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import metrics

from services.interceptors import HANDLER_FACTORIES, Behavior, Context

if TYPE_CHECKING:  # grpc-stubs makes the interceptor generic; the runtime class is not.
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

# Buckets for latencies in seconds, 0.5 ms to 10 s (OpenTelemetry's default buckets
# are for milliseconds).
SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def seconds_histogram(meter: metrics.Meter, name: str, description: str) -> metrics.Histogram:
    """A latency histogram in seconds with ``SECONDS_BUCKETS``."""
    return meter.create_histogram(
        name, unit="s", description=description, explicit_bucket_boundaries_advisory=SECONDS_BUCKETS
    )


def _status(context: Context, error: BaseException | None) -> int:
    code: Any = context.code()  # a StatusCode, an int, or None (grpc.aio varies)
    if isinstance(code, grpc.StatusCode):
        return int(code.value[0])
    if isinstance(code, int) and (code or error is None):
        return code
    if error is None:
        return int(grpc.StatusCode.OK.value[0])
    if isinstance(error, grpc.aio.AbortError):
        return int(grpc.StatusCode.UNKNOWN.value[0])  # aborted without a code (not ours)
    # The caller left (CancelledError) or the server is stopping.
    return int(grpc.StatusCode.CANCELLED.value[0])


class RpcMetricsInterceptor(_ServerInterceptor):
    def __init__(self, meter: metrics.Meter) -> None:
        # method -> (the handler below, its wrapped handler), made on a method's first call.
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}
        self._duration = seconds_histogram(
            meter,
            "rpc.server.call.duration",
            "Duration of RPCs received, by service, method and status code",
        )

    def _record(
        self, method: str, started: float, context: Context, error: BaseException | None
    ) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        self._duration.record(
            time.perf_counter() - started,
            {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "rpc.grpc.status_code": _status(context, error),
            },
        )

    def _wrap(self, method: str, behavior: Behavior) -> Behavior | None:
        record = self._record
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                started = time.perf_counter()
                error: BaseException | None = None
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    record(method, started, context, error)

            return stream
        if not inspect.iscoroutinefunction(behavior):
            return None  # a sync handler (none of ours): left exactly as registered

        async def unary(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                record(method, started, context, error)

        return unary

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None:
            return None  # type: ignore[return-value]
        method = handler_call_details.method
        # Inside the tracing interceptor, the handler below is the same object on every
        # call of a method (the error mapping's cached one): wrap it once.
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped_handler = self._wrap_handler(method, handler)
        self._wrapped[method] = (handler, wrapped_handler)
        return wrapped_handler

    def _wrap_handler(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        for attribute, (factory, _streamed) in HANDLER_FACTORIES.items():
            behavior = getattr(handler, attribute)
            if behavior is None:
                continue
            wrapped = self._wrap(method, behavior)
            if wrapped is None:
                return handler
            return factory(
                wrapped,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
