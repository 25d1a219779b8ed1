"""Registry settings (env prefix HYBRIDMESH_REGISTRY_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

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
