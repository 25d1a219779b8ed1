"""Control-plane credentials for tests: per-identity bearer tokens (and their hashes, as
the registry and the edge admin service are configured), token files, and a channel
that presents a token on every call."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from hybridmesh.registry.v1 import registry_service_pb2 as pb
from services.access_rules import OPERATOR, Identity, site_identity
from services.auth import AUTHORIZATION, token_sha256

# The operator's token for nodes built by the shared fixtures (tests/helpers/edge_node.py).
TEST_OPERATOR_TOKEN = "test-operator-token"


@dataclass
class Credentials:
    """A token per identity; files under ``directory`` when written."""

    directory: Path
    tokens: dict[str, str] = field(default_factory=dict)  # SPIFFE id -> token

    def token(self, identity: Identity) -> str:
        return self.tokens[identity.spiffe_id]

    def hashes(self, identities: Iterable[Identity] | None = None) -> dict[str, str]:
        """SPIFFE id -> sha256 of its token (all identities, or the ones given)."""
        wanted = {i.spiffe_id for i in identities} if identities is not None else None
        return {
            spiffe: token_sha256(token)
            for spiffe, token in self.tokens.items()
            if wanted is None or spiffe in wanted
        }

    def token_file(self, identity: Identity) -> Path:
        path = self.directory / f"{identity.role}-{identity.site or 'operator'}.token"
        if not path.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            path.write_text(self.token(identity) + "\n")
            os.chmod(path, 0o600)
        return path


def make_credentials(directory: Path, sites: Iterable[str] = ("site-local",)) -> Credentials:
    credentials = Credentials(directory)
    credentials.tokens[OPERATOR.spiffe_id] = f"operator-{os.urandom(8).hex()}"
    for site in sites:
        credentials.tokens[site_identity(site).spiffe_id] = f"{site}-{os.urandom(8).hex()}"
    return credentials


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, f"Bearer {token}"),)


TokenChooser = Callable[[str, Any], str | None]


class _PresentToken:
    def __init__(self, choose: TokenChooser) -> None:
        self._choose = choose

    def _details(self, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        raw: object = details.method
        method = raw.decode() if isinstance(raw, bytes) else str(raw)
        token = self._choose(method, request)
        if token is None:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(AUTHORIZATION, f"Bearer {token}")
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files an interceptor under the first of the four kinds it is an instance of:
# one class per kind.
class _UnaryUnary(_PresentToken, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details, request), request)


class _UnaryStream(_PresentToken, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details, request), request)


def token_channel(address: str, choose: TokenChooser | str) -> grpc.aio.Channel:
    """A plaintext channel presenting a token on every call: always the same one, or the
    one ``choose(method, request)`` picks."""
    chooser: TokenChooser = (lambda _m, _r: choose) if isinstance(choose, str) else choose
    interceptors: list[Any] = [_UnaryUnary(chooser), _UnaryStream(chooser)]
    return grpc.aio.insecure_channel(address, interceptors=interceptors)


def operator_or_reporting_site(credentials: Credentials) -> TokenChooser:
    """The operator's token, except for ReportSiteStatus: the token of the site the
    report names (or of the first site, for bytes that are no report)."""
    sites: Mapping[str, str] = {
        spiffe.rsplit("/", 1)[1]: token
        for spiffe, token in credentials.tokens.items()
        if "/site/" in spiffe
    }

    def choose(method: str, request: Any) -> str | None:
        if method.endswith("/ReportSiteStatus"):
            site = request.status.site if isinstance(request, pb.ReportSiteStatusRequest) else ""
            return sites.get(site, next(iter(sites.values()), None))
        return credentials.token(OPERATOR)

    return choose
