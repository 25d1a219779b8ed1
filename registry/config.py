"""Registry settings (env prefix HYBRIDMESH_REGISTRY_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.access_rules import INGRESS_ID
from services.config import ServiceSettings


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="HYBRIDMESH_REGISTRY_", extra="ignore", frozen=True
    )

    service_name: str = "registry"
    port: int = Field(default=50054, ge=0, le=65535)
    # The registry's storage (a persistent volume in the cloud cluster).
    root: Path = Path("var/registry")
    # Chunk size of FetchFile when the caller asks for 0.
    default_chunk_bytes: int = Field(default=256 * 1024, gt=0, le=1 << 20)

    # Who may call (services.access_rules; docs/threat-model.md). Nothing configured:
    # every call but health and reflection is refused.
    # Per-identity bearer tokens: SPIFFE id -> sha256 hex of the token, inline and/or
    # as a JSON file (the file wins).
    token_sha256: dict[str, str] = Field(default_factory=dict)
    tokens_file: Path | None = None
    # mTLS on the gRPC port (tls.crt, tls.key, ca.crt; a client certificate is
    # required): callers are known by their certificate's SPIFFE id.
    tls_dir: Path | None = None
    # The peers (SPIFFE ids of their client certificates) whose x-forwarded-client-cert
    # header is believed: the cloud ingress. Only over mTLS (tls_dir).
    trusted_proxies: tuple[str, ...] = (INGRESS_ID,)
    # A plaintext port for the kubelet's gRPC probes (they speak no TLS); every method
    # but health and reflection still needs a credential there. 0: none.
    probe_port: int = Field(default=0, ge=0, le=65535)
    # Public keys (PEM) a promotion statement must be signed by to be recorded; empty:
    # recorded unchecked (sites verify them in any case).
    trusted_keys: tuple[Path, ...] = ()
