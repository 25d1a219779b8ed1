"""Per-site bearer tokens: the cloud never serves an unauthenticated caller.

Tokens are compared by their sha256 in constant time; only hashes are configured.
Health and reflection stay open (probes and load balancers carry no token).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/")
SITE_METADATA_KEY = "x-hybridmesh-site"


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_site_hashes(inline: Mapping[str, str], file: Path | None) -> dict[str, str]:
    hashes = dict(inline)
    if file is not None:
        hashes.update(json.loads(file.read_text()))
    return {site: digest.lower() for site, digest in hashes.items()}


class SiteAuthenticator:
    def __init__(self, site_hashes: Mapping[str, str]) -> None:
        self._hashes = dict(site_hashes)

    def site_for(self, metadata: Any) -> str | None:
        """The site whose token the call presents, or None."""
        authorization = next(
            (value for key, value in metadata or () if key == "authorization"), None
        )
        if not isinstance(authorization, str) or not authorization.startswith("Bearer "):
            return None
        presented = token_sha256(authorization.removeprefix("Bearer ").strip())
        found = None
        for site, expected in self._hashes.items():
            # Compare against every entry: timing does not reveal which one matched.
            if hmac.compare_digest(presented, expected):
                found = site
        return found


class SiteAuthInterceptor(_ServerInterceptor):
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
            return grpc.unary_unary_rpc_method_handler(_refuse)
        return await continuation(handler_call_details)


async def _refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "authorization: a valid 'Bearer <site token>' is required",
    )
