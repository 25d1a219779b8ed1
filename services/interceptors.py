"""The error-mapping server interceptor: every RPC shape, undecodable bytes, unknown methods.

Keeps servicers thin: domain code raises ``InvalidArgumentError("...", field="inputs")``
and never touches the context. Covers what no handler can see:

- a method the server does not have: the interceptor passes the missing handler on, so
  grpc answers UNIMPLEMENTED (it used to crash here and the caller got UNKNOWN);
- bytes that do not parse as the request message: grpc.aio deserializes before the
  handler runs and maps a ``DecodeError`` to UNKNOWN with the exception type in the
  message. The request deserializer is wrapped so it hands the handler a marker
  instead, and the wrapped handler answers INVALID_ARGUMENT (for streamed requests, at
  the message that does not parse).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from services.errors import InvalidArgumentError, ServiceError
from services.logging import get_logger

_log = get_logger("services.interceptors")

if TYPE_CHECKING:  # grpc-stubs makes the interceptor generic; the runtime class is not.
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

Context = grpc.aio.ServicerContext[Any, Any]
Behavior = Callable[..., Any]


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _undecodable_error(marker: _Undecodable) -> InvalidArgumentError:
    # The parser's own text is generic ("Error parsing message"): safe to pass on.
    return InvalidArgumentError(
        f"the request bytes do not parse as the method's request message ({marker.reason})"
    )


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as error:  # DecodeError, or a custom deserializer's own error
            return _Undecodable(type(error).__name__)

    return deserialize


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise _undecodable_error(request)
        yield request


def _check(request: Any, streamed: bool) -> Any:
    if streamed:
        return _checked_stream(request)
    if isinstance(request, _Undecodable):
        raise _undecodable_error(request)
    return request


async def _abort_internal(context: Context, error: Exception) -> None:
    # A bug must not leak internals to callers (gRPC's default UNKNOWN carries the
    # exception text); the stack trace goes to the log, which carries the trace id.
    _log.exception("unhandled error in handler", error_type=type(error).__name__)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")


async def abort_with(context: Context, error: ServiceError) -> None:
    """End the RPC with ``error``'s status, rich details and trailing metadata."""
    status = error.to_status()
    # The rich status (google.rpc.Status with details) travels in trailing metadata.
    await context.abort(
        status.code,
        status.details,
        trailing_metadata=(*status.trailing_metadata, *error.trailing_metadata()),
    )


async def _map_error(context: Context, error: Exception) -> None:
    if isinstance(error, ServiceError):
        await abort_with(context, error)
    else:
        await _abort_internal(context, error)


def _wrap_coroutine(behavior: Behavior, streamed: bool) -> Callable[..., Awaitable[Any]]:
    """Unary-response handlers, and streaming ones that write through context.write()."""

    async def wrapper(request: Any, context: Context) -> Any:
        try:
            return await behavior(_check(request, streamed), context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _map_error(context, error)

    return wrapper


def _wrap_generator(behavior: Behavior, streamed: bool) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for response in behavior(_check(request, streamed), context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _map_error(context, error)

    return wrapper


def _wrap(behavior: Behavior, streamed: bool) -> Behavior | None:
    if inspect.isasyncgenfunction(behavior):
        return _wrap_generator(behavior, streamed)
    if inspect.iscoroutinefunction(behavior):
        return _wrap_coroutine(behavior, streamed)
    return None  # a sync handler (none of ours): left exactly as registered


HANDLER_FACTORIES: dict[str, tuple[Callable[..., grpc.RpcMethodHandler[Any, Any]], bool]] = {
    # attribute of RpcMethodHandler -> (its factory, whether requests arrive as a stream)
    "unary_unary": (grpc.unary_unary_rpc_method_handler, False),
    "unary_stream": (grpc.unary_stream_rpc_method_handler, False),
    "stream_unary": (grpc.stream_unary_rpc_method_handler, True),
    "stream_stream": (grpc.stream_stream_rpc_method_handler, True),
}


def map_errors(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler, with ServiceError -> status, bugs -> INTERNAL, bad bytes ->
    INVALID_ARGUMENT; any of the four RPC shapes."""
    for attribute, (factory, streamed) in HANDLER_FACTORIES.items():
        behavior = getattr(handler, attribute)
        if behavior is None:
            continue
        wrapped = _wrap(behavior, streamed)
        if wrapped is None:
            return handler
        return factory(
            wrapped,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    return handler


class ErrorMappingInterceptor(_ServerInterceptor):
    """Turns a ServiceError raised by a handler into its status, message and details.

    Innermost, it sees each method's registered handler, the same object on every call:
    the wrapped handler is made on a method's first call and reused (no per-call
    closures and handler objects)."""

    def __init__(self) -> None:
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None:
            # No such method: grpc itself answers UNIMPLEMENTED for a missing handler.
            return None  # type: ignore[return-value]
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = map_errors(handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
