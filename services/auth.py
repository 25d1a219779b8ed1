"""Who is calling: bearer tokens (hashed at rest), mTLS peers, and the client certificate
the cloud ingress forwards; and the interceptor that enforces ``services.access_rules``.

Tokens: only sha256 hashes are configured (a leaked config leaks no token); the
presented token's hash is compared with every configured one in constant time. The
cloud service's site tokens (``cloud_inference.auth``) and the control plane's
per-identity tokens share this code.

A caller's identity, first match wins:

1. the TLS peer is the ingress (a ``trusted_proxies`` SPIFFE id, Envoy's own client
   certificate): the identity is the one in its ``x-forwarded-client-cert`` header
   (Envoy ``SANITIZE_SET``: exactly one element, its ``URI``); from any other peer that
   header is ignored;
2. the TLS peer's own SPIFFE id (the caller's client certificate, mTLS to us directly);
3. ``authorization: Bearer <token>`` whose hash is configured for an identity.

Refusals are logged (method, identity or "none", peer), never the token.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import inspect
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from services.access_rules import Identity, Verdict, decide, identity_of
from services.logging import get_logger

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

Context = grpc.aio.ServicerContext[Any, Any]
Metadata = Iterable[tuple[str, Any]]

AUTHORIZATION = "authorization"
BEARER = "bearer "
XFCC = "x-forwarded-client-cert"
PEER_SPIFFE_ID = "peer_spiffe_id"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

_log = get_logger("services.auth")
_caller: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "hybridmesh_caller", default=None
)


class TokenConfigError(ValueError):
    """Configured token hashes are malformed (e.g. a raw token, not its hash)."""


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_token_hashes(inline: Mapping[str, str], file: Path | None) -> dict[str, str]:
    """Holder -> sha256 hex of its token, from settings and/or a JSON file (file wins)."""
    hashes = dict(inline)
    if file is not None:
        loaded = json.loads(file.read_text())
        if not isinstance(loaded, dict):
            raise TokenConfigError(f"{file}: expected a JSON object holder -> sha256 hex")
        hashes.update({str(holder): str(digest) for holder, digest in loaded.items()})
    normalised = {holder: digest.strip().lower() for holder, digest in hashes.items()}
    bad = sorted(h for h, digest in normalised.items() if not SHA256_HEX.fullmatch(digest))
    if bad:
        # Refuse to start rather than refuse every call from these holders later.
        raise TokenConfigError(f"{bad}: token hash must be 64 hex digits (sha256)")
    return normalised


def bearer_token(metadata: Metadata | None) -> str | None:
    authorization = next((value for key, value in metadata or () if key == AUTHORIZATION), None)
    # RFC 6750: the scheme name is case-insensitive.
    if not isinstance(authorization, str) or not authorization.lower().startswith(BEARER):
        return None
    return authorization[len(BEARER) :].strip()


class TokenBook:
    """Which holder a presented bearer token belongs to."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        self._hashes = dict(hashes)

    def holder(self, metadata: Metadata | None) -> str | None:
        token = bearer_token(metadata)
        if token is None:
            return None
        presented = token_sha256(token)
        found = None
        for holder, expected in self._hashes.items():
            # Compare against every entry: timing does not reveal which one matched.
            if hmac.compare_digest(presented, expected):
                found = holder
        return found


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata presenting ``token`` (none for an empty token)."""
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


def read_token(path: Path | None) -> str:
    """A token file's token ("" when no file is configured)."""
    return path.read_text().strip() if path is not None else ""


def _split(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside double quotes (Envoy quotes values that
    hold separators)."""
    parts, current, quoted, escaped = [], [], False, False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def forwarded_uri(header: str) -> str | None:
    """The client certificate's URI from an ``x-forwarded-client-cert`` value with exactly
    one element (what Envoy's SANITIZE_SET sends), or None."""
    elements = _split(header, ",")
    if len(elements) != 1:
        return None
    uris = []
    for pair in _split(elements[0], ";"):
        key, _, value = pair.partition("=")
        if key.strip().lower() == "uri":
            uris.append(value.strip())
    return uris[0] if len(uris) == 1 else None


def peer_spiffe_id(context: Context) -> str | None:
    """The SPIFFE id of the TLS peer's verified client certificate, if any."""
    values = list(context.auth_context().get(PEER_SPIFFE_ID) or ())
    if len(values) != 1:
        return None
    value = values[0]
    return value.decode() if isinstance(value, bytes) else str(value)


class CallerAuthenticator:
    """Finds the identity of a call (see the module doc for the order)."""

    def __init__(
        self, token_hashes: Mapping[str, str], trusted_proxies: Collection[str] = ()
    ) -> None:
        bad = sorted(holder for holder in token_hashes if identity_of(holder) is None)
        if bad:
            raise TokenConfigError(f"{bad}: a token's holder must be a hybridmesh SPIFFE id")
        self._tokens = TokenBook(token_hashes)
        self._proxies = frozenset(trusted_proxies)

    def identify(self, context: Context) -> Identity | None:
        metadata = tuple(context.invocation_metadata() or ())
        peer = peer_spiffe_id(context)
        if peer is not None and peer in self._proxies:
            header = next((str(v) for k, v in metadata if k == XFCC), None)
            uri = forwarded_uri(header) if header is not None else None
            return identity_of(uri) if uri is not None else None
        if peer is not None and (identity := identity_of(peer)) is not None:
            return identity
        holder = self._tokens.holder(metadata)
        return identity_of(holder) if holder is not None else None


def current_caller() -> Identity | None:
    """The authenticated caller of the RPC being handled (set by ControlPlaneAuth)."""
    return _caller.get()


Behavior = Callable[..., Any]


class ControlPlaneAuth(_ServerInterceptor):
    """UNAUTHENTICATED without a valid identity, PERMISSION_DENIED for a role the rule
    table does not allow; health and reflection stay open. Place it after the telemetry
    interceptors (a refusal is in the server span) and before the error mapping."""

    def __init__(
        self, authenticator: CallerAuthenticator, decide_: Callable[..., Verdict] = decide
    ) -> None:
        self._authenticator = authenticator
        self._decide = decide_

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self._decide(method, None) is Verdict.OPEN:
            return handler  # type: ignore[return-value]
        return self._guarded(handler, method)

    async def _admit(self, method: str, context: Context) -> Identity:
        caller = self._authenticator.identify(context)
        verdict = self._decide(method, caller)
        if verdict is Verdict.ALLOW and caller is not None:
            return caller
        code, text = (
            (grpc.StatusCode.UNAUTHENTICATED, "a valid credential is required")
            if verdict is Verdict.UNAUTHENTICATED
            else (grpc.StatusCode.PERMISSION_DENIED, "this identity may not call this method")
        )
        _log.warning(
            "control-plane call refused",
            method=method,
            identity=caller.spiffe_id if caller is not None else "none",
            status=code.name,
            peer=context.peer(),
        )
        await context.abort(code, text)
        raise AssertionError("unreachable: abort raises")

    def _guarded(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        for attribute, factory in (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        ):
            behavior: Behavior | None = getattr(handler, attribute)
            if behavior is None:
                continue
            return factory(
                self._wrap(behavior, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap(self, behavior: Behavior, method: str) -> Behavior:
        if inspect.isasyncgenfunction(behavior):

            async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
                token = _caller.set(await self._admit(method, context))
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    # A generator closed from elsewhere runs this in another context.
                    with contextlib.suppress(ValueError):
                        _caller.reset(token)

            return generator

        async def coroutine(request: Any, context: Context) -> Any:
            token = _caller.set(await self._admit(method, context))
            try:
                return await behavior(request, context)
            finally:
                _caller.reset(token)

        return coroutine
