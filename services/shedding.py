"""Shed overload before the rest of the server's stack runs (gRFC A6 pushback).

A request the admission rule (services/admission.py) would refuse is refused by this
interceptor, placed before tracing and error mapping: the refusal costs a few comparisons
and one abort. Behind those layers it cost what an aborted RPC costs there (a server span
whose exception event formats a traceback, which Python 3.11 does by re-parsing source for
its caret anchors: measured, most of the router's CPU at 2x its capacity went to refusing
requests, and the queue of RPCs not yet handled grew until their deadlines passed).

The servicer still takes its slot through ``Admission.slot``, which applies the same rule
(a request can pass here and find the slots taken by the time it asks).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from services.admission import Admission
from services.interceptors import HANDLER_FACTORIES, Behavior, Context, abort_with
from services.rpc_metrics import RpcMetricsInterceptor

if TYPE_CHECKING:  # grpc-stubs makes the interceptor generic; the runtime class is not.
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


class SheddingInterceptor(_ServerInterceptor):
    """Refuse calls of ``methods`` ("/package.Service/Method") that ``admission`` would
    refuse now, given the caller's deadline: RESOURCE_EXHAUSTED with
    ``grpc-retry-pushback-ms``. Other methods (health, metadata) pass untouched."""

    def __init__(self, admission: Admission, methods: Collection[str]) -> None:
        self._admission = admission
        self._methods = frozenset(methods)

    def _wrap(self, behavior: Behavior) -> Behavior | None:
        admission = self._admission
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                refusal = admission.refusal(context.time_remaining(), shed_when_late=True)
                if refusal is not None:
                    await abort_with(context, refusal)
                async for response in behavior(request, context):
                    yield response

            return stream
        if not inspect.iscoroutinefunction(behavior):
            return None

        async def unary(request: Any, context: Context) -> Any:
            refusal = admission.refusal(context.time_remaining(), shed_when_late=True)
            if refusal is not None:
                await abort_with(context, refusal)
            return await behavior(request, context)

        return unary

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self._methods:
            return handler  # type: ignore[return-value]
        for attribute, (factory, _streamed) in HANDLER_FACTORIES.items():
            behavior = getattr(handler, attribute)
            if behavior is None:
                continue
            wrapped = self._wrap(behavior)
            if wrapped is None:
                return handler
            return factory(
                wrapped,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def shed_before_tracing(
    telemetry: Sequence[grpc.aio.ServerInterceptor[Any, Any]],
    shedding: SheddingInterceptor,
) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
    """``telemetry``'s server interceptors with ``shedding`` placed after the RPC metric
    (a shed call is counted, with its status) and before tracing (a shed call costs no
    span). Picked by type, not by position in ``Telemetry.server_interceptors``."""
    metric = [i for i in telemetry if isinstance(i, RpcMetricsInterceptor)]
    rest = [i for i in telemetry if not isinstance(i, RpcMetricsInterceptor)]
    return [*metric, shedding, *rest]
