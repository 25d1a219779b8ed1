"""Assembles the registry process: store, site book, gRPC service, version-mix metric."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from opentelemetry.metrics import CallbackOptions, Observation

from hybridmesh.registry.v1 import registry_service_pb2_grpc
from ota.signatures import load_trusted_keys
from registry.config import RegistrySettings
from registry.servicer import RegistryServicer
from registry.sites import SiteBook
from registry.store import RegistryStore
from services.access_rules import REGISTRY_SERVICE
from services.auth import CallerAuthenticator, ControlPlaneAuth, load_token_hashes
from services.server import ServiceHost, ServiceRegistration
from services.telemetry import Telemetry

REGISTRY_SERVICE_NAME = REGISTRY_SERVICE


def server_credentials(settings: RegistrySettings) -> grpc.ServerCredentials | None:
    """mTLS with a required client certificate, when a TLS directory is configured."""
    if settings.tls_dir is None:
        return None
    return grpc.ssl_server_credentials(
        [
            (
                (settings.tls_dir / "tls.key").read_bytes(),
                (settings.tls_dir / "tls.crt").read_bytes(),
            )
        ],
        root_certificates=(settings.tls_dir / "ca.crt").read_bytes(),
        require_client_auth=True,
    )


def authenticator(settings: RegistrySettings) -> CallerAuthenticator:
    tokens = load_token_hashes(settings.token_sha256, settings.tokens_file)
    # Forwarded identities are believed only from an authenticated (mTLS) ingress.
    proxies = settings.trusted_proxies if settings.tls_dir is not None else ()
    return CallerAuthenticator(tokens, proxies)


class RegistryNode:
    def __init__(self, settings: RegistrySettings, telemetry: Telemetry) -> None:
        self.settings = settings
        settings.root.mkdir(parents=True, exist_ok=True)
        self.store = RegistryStore(settings.root)
        self.sites = SiteBook(settings.root)
        servicer = RegistryServicer(
            self.store,
            self.sites,
            settings.default_chunk_bytes,
            load_trusted_keys(list(settings.trusted_keys)),
        )

        def version_mix(_options: CallbackOptions) -> Iterable[Observation]:
            # Skew at a glance: how many sites serve each version of each artifact.
            for (kind, name, version), count in self.sites.version_mix().items():
                yield Observation(count, {"kind": kind, "name": name, "version": str(version)})

        telemetry.meter("hybridmesh.registry").create_observable_gauge(
            "hybridmesh.registry.sites_serving",
            callbacks=[version_mix],
            description="edge sites serving each artifact version (from their reports)",
        )
        self.host = ServiceHost(
            settings,
            [
                ServiceRegistration(
                    REGISTRY_SERVICE_NAME,
                    lambda server: registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(
                        servicer, server
                    ),
                )
            ],
            interceptors=[
                *telemetry.server_interceptors(tracing=settings.tracing_enabled),
                ControlPlaneAuth(authenticator(settings)),
            ],
            server_credentials=server_credentials(settings),
            plaintext_ports=[settings.probe_port] if settings.probe_port else [],
        )

    async def start(self) -> int:
        return await self.host.start()

    async def stop(self, grace: float | None = None) -> None:
        await self.host.stop(grace)
