"""Client channels: deadline required, keepalive, message limits, tracing.

Every outgoing call in hybridmesh carries a deadline; the factory's channels refuse a
call without one instead of letting it hang on a dead link.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import trace

from services.config import DEFAULT_MAX_MESSAGE_BYTES


class MissingDeadlineError(ValueError):
    """Raised when a call is made without ``timeout=``."""


def _require_deadline(details: grpc.aio.ClientCallDetails) -> None:
    if details.timeout is None:
        raw: object = details.method  # bytes at run time, despite the stubs
        method = raw.decode() if isinstance(raw, bytes) else str(raw)
        raise MissingDeadlineError(
            f"call to {method} has no deadline: pass timeout= (hybridmesh never calls "
            "downstream without one)"
        )


def require_timeout(method: str, timeout_s: float | None) -> float:
    """``timeout_s`` if it is a deadline (> 0 s); MissingDeadlineError otherwise. The
    check ``DeadlineRequiredInterceptor`` makes, for call sites that make it themselves."""
    if timeout_s is None or not timeout_s > 0:
        raise MissingDeadlineError(
            f"call to {method} has no deadline ({timeout_s!r}): pass timeout= "
            "(hybridmesh never calls downstream without one)"
        )
    return timeout_s


class DeadlineRequiredInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Refuses calls that carry no deadline, before anything is sent."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        _require_deadline(client_call_details)
        return await continuation(client_call_details, request)

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        _require_deadline(client_call_details)
        return await continuation(client_call_details, request)

    async def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        _require_deadline(client_call_details)
        return await continuation(client_call_details, request_iterator)

    async def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        _require_deadline(client_call_details)
        return await continuation(client_call_details, request_iterator)


class CancelOnLeaveInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
):
    """Makes a caller's cancellation reach the wire for unary-response calls.

    An interceptor that awaits the call's status (OpenTelemetry's aio client interceptor
    does, opentelemetry-python-contrib#3271) swallows the task's cancellation: the
    awaiting coroutine is cancelled but the RPC runs on to completion. Placed last (next
    to the wire), this awaits the real call itself, so a cancellation cancels it (the
    workaround given in that issue), and ends the client span left open by it.
    """

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        call = await continuation(client_call_details, request)
        return await _cancel_with_caller(call, client_call_details)

    async def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        call = await continuation(client_call_details, request_iterator)
        return await _cancel_with_caller(call, client_call_details)


async def _cancel_with_caller(call: Any, details: grpc.aio.ClientCallDetails) -> Any:
    try:
        await call
    except grpc.aio.AioRpcError:
        pass  # the call object carries the status to the interceptors above
    except asyncio.CancelledError:
        call.cancel()
        # The tracing interceptor above leaves its client span open when cancelled.
        span = trace.get_current_span()
        raw: object = details.method
        method = raw.decode() if isinstance(raw, bytes) else str(raw)
        if (
            getattr(span, "kind", None) is trace.SpanKind.CLIENT
            and getattr(span, "name", None) == method
        ):
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.CANCELLED.value[0])
            span.end()
        raise
    return call


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for every client channel."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Detect a dead link (WAN cut, peer killed) within ~30 s even when idle.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect within ~2 s of a peer coming back (gRPC's default backoff grows to
        # 120 s): the router's health watch, and so escalation, recovers that fast.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        # gRPC Python skips retries of messages over 256 KiB unless this is raised; keep
        # it at the message limit so a large image is never silently not retried.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
    ]


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._inner.intercept_unary_unary(continuation, details, request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._inner.intercept_unary_stream(continuation, details, request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await self._inner.intercept_stream_unary(continuation, details, request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await self._inner.intercept_stream_stream(continuation, details, request_iterator)


_KINDS: tuple[tuple[type, type], ...] = (
    (grpc.aio.UnaryUnaryClientInterceptor, _UnaryUnary),
    (grpc.aio.UnaryStreamClientInterceptor, _UnaryStream),
    (grpc.aio.StreamUnaryClientInterceptor, _StreamUnary),
    (grpc.aio.StreamStreamClientInterceptor, _StreamStream),
)


def per_call_kind(interceptor: Any) -> list[Any]:
    """One interceptor per call kind it implements: grpc.aio files an interceptor under
    the first kind it is an instance of only, so one object implementing all four
    would guard unary-unary calls alone (streams would go unchecked)."""
    return [adapter(interceptor) for kind, adapter in _KINDS if isinstance(interceptor, kind)]


class ChannelFactory:
    """Creates grpc.aio channels with the mesh's options and interceptors."""

    def __init__(
        self,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        deadline_interceptor: bool = True,
    ) -> None:
        """``deadline_interceptor=False``: for a hot data path whose one call site checks
        the deadline itself (``require_timeout``), one interceptor layer (a coroutine
        and a call-details pass per call) less."""
        # The deadline check runs first, so a refused call never opens a span; the
        # cancellation guard runs last, next to the wire.
        guard = per_call_kind(DeadlineRequiredInterceptor()) if deadline_interceptor else []
        self._interceptors: list[Any] = [
            *guard,
            *interceptors,
            *per_call_kind(CancelOnLeaveInterceptor()),
        ]
        self._max_message_bytes = max_message_bytes

    def create(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        extra_options: Sequence[tuple[str, Any]] = (),
    ) -> grpc.aio.Channel:
        options = [*channel_options(self._max_message_bytes), *extra_options]
        if credentials is None:
            return grpc.aio.insecure_channel(
                target, options=options, interceptors=self._interceptors
            )
        return grpc.aio.secure_channel(
            target, credentials, options=options, interceptors=self._interceptors
        )


def mtls_credentials(tls_dir: Path | None) -> grpc.ChannelCredentials | None:
    """Client credentials from a directory in the Kubernetes TLS secret layout (ca.crt,
    tls.crt, tls.key); None (plaintext) when no directory is configured."""
    if tls_dir is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=(tls_dir / "ca.crt").read_bytes(),
        private_key=(tls_dir / "tls.key").read_bytes(),
        certificate_chain=(tls_dir / "tls.crt").read_bytes(),
    )
