"""Per-site bearer tokens: the cloud never serves an unauthenticated caller.

Only sha256 hashes of the tokens are configured (a leaked config leaks no token), and the
presented token's hash is compared with every configured one in constant time. Health
and reflection stay open: probes and load balancers carry no token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from services.logging import get_logger

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

_log = get_logger("cloud_inference.auth")
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
AUTHORIZATION = "authorization"
BEARER = "bearer "
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class SiteTokenConfigError(ValueError):
    """The configured site token hashes are malformed (e.g. a raw token, not its hash)."""


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_site_hashes(inline: Mapping[str, str], file: Path | None) -> dict[str, str]:
    """Site id -> sha256 hex of its token, from settings and/or a JSON file (file wins)."""
    hashes = dict(inline)
    if file is not None:
        loaded = json.loads(file.read_text())
        if not isinstance(loaded, dict):
            raise SiteTokenConfigError(f"{file}: expected a JSON object site -> sha256 hex")
        hashes.update({str(site): str(digest) for site, digest in loaded.items()})
    normalised = {site: digest.strip().lower() for site, digest in hashes.items()}
    bad = sorted(site for site, digest in normalised.items() if not SHA256_HEX.fullmatch(digest))
    if bad:
        # Refuse to start rather than refuse every call from these sites later.
        raise SiteTokenConfigError(f"sites {bad}: token hash must be 64 hex digits (sha256)")
    return normalised


class SiteAuthenticator:
    def __init__(self, site_hashes: Mapping[str, str]) -> None:
        self._hashes = dict(site_hashes)

    def site_for(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """The site whose token the call presents, or None."""
        authorization = next((value for key, value in metadata or () if key == AUTHORIZATION), None)
        # RFC 6750: the scheme name is case-insensitive.
        if not isinstance(authorization, str) or not authorization.lower().startswith(BEARER):
            return None
        presented = token_sha256(authorization[len(BEARER) :].strip())
        found = None
        for site, expected in self._hashes.items():
            # Compare against every entry: timing does not reveal which one matched.
            if hmac.compare_digest(presented, expected):
                found = site
        return found


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
            _log.warning("unauthenticated call refused", method=method)
            # CloudService is unary only; nothing behind this (not even whether the
            # method exists) is revealed to the caller.
            return grpc.unary_unary_rpc_method_handler(_refuse)
        return await continuation(handler_call_details)


async def _refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "authorization: a valid 'Bearer <site token>' is required",
    )
