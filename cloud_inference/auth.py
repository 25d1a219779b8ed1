"""Per-site bearer tokens: the cloud never serves an unauthenticated caller.

Only sha256 hashes of the tokens are configured (a leaked config leaks no token), and the
presented token's hash is compared with every configured one in constant time. Health
and reflection stay open: probes and load balancers carry no token. The hashing and the
comparison are ``services.auth``'s, shared with the control plane's per-identity tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from services.access_rules import OPEN_SERVICES
from services.auth import TokenBook, TokenConfigError, load_token_hashes, token_sha256
from services.logging import get_logger

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

_log = get_logger("cloud_inference.auth")
__all__ = [
    "SiteAuthInterceptor",
    "SiteAuthenticator",
    "SiteTokenConfigError",
    "load_site_hashes",
    "token_sha256",
]
SiteTokenConfigError = TokenConfigError


def load_site_hashes(inline: Mapping[str, str], file: Path | None) -> dict[str, str]:
    """Site id -> sha256 hex of its token, from settings and/or a JSON file (file wins)."""
    return load_token_hashes(inline, file)


class SiteAuthenticator:
    def __init__(self, site_hashes: Mapping[str, str]) -> None:
        self._tokens = TokenBook(site_hashes)

    def site_for(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """The site whose token the call presents, or None."""
        return self._tokens.holder(metadata)


class SiteAuthInterceptor(_ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call to a non-open service without a valid token."""

    def __init__(self, authenticator: SiteAuthenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        if self._authenticator.site_for(handler_call_details.invocation_metadata) is None:
            # CloudService is unary only; nothing behind this (not even whether the
            # method exists) is revealed to the caller.
            return grpc.unary_unary_rpc_method_handler(functools.partial(_refuse, method))
        return await continuation(handler_call_details)


async def _refuse(method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    # Logged here, not in the interceptor: only the call's context knows the peer.
    _log.warning("unauthenticated call refused", method=method, peer=context.peer())
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "authorization: a valid 'Bearer <site token>' is required",
    )
