"""Cloud service settings (env prefix HYBRIDMESH_CLOUD_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.config import ServiceSettings


class CloudSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="HYBRIDMESH_CLOUD_", extra="ignore", frozen=True)

    service_name: str = "cloud-inference"
    port: int = Field(default=50053, ge=0, le=65535)
    max_message_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    triton_url: str = "127.0.0.1:8001"
    # The cloud models to serve and watch are the catalog's cloud models.
    catalog: Path = Path("models/catalog.toml")
    # Where labels (and artifact hashes) of the served models come from: the model
    # store's manifest of the version Triton serves, or labels.txt in a Triton repository.
    labels_source: Literal["model_store", "triton_repository"] = "model_store"
    model_store: Path = Path("models/store")
    triton_repository: Path | None = None
    # Site id -> sha256 (hex) of that site's bearer token. Empty refuses every caller:
    # the cloud never serves an unauthenticated one.
    site_token_sha256: dict[str, str] = Field(default_factory=dict)
    # Or the same mapping as a JSON file (a mounted secret in k8s).
    site_tokens_file: Path | None = None
    # Calls to Triton at once; more wait, up to max_queued_requests, then
    # RESOURCE_EXHAUSTED with retry pushback of retry_after_ms.
    max_in_flight: int = Field(default=32, ge=1)
    max_queued_requests: int = Field(default=256, ge=0)
    retry_after_ms: int = Field(default=50, ge=0)
    max_batch_size: int = Field(default=64, ge=1)
    max_top_k: int = Field(default=10, ge=1)
    max_payload_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # Used when a call carries no deadline (every call to Triton has one).
    default_timeout_s: float = Field(default=5.0, gt=0)
    # Readiness: how often Triton's liveness and model readiness are re-checked, and the
    # timeout of each check.
    health_poll_s: float = Field(default=0.5, gt=0)
    health_check_timeout_s: float = Field(default=1.0, gt=0)
    # A model that answers INTERNAL this many times in a row is NOT_SERVING (its own
    # health entry "<service>/<model>", the service's and the server's "") until a probe
    # (a one-item inference of zeros, at most one per model_probe_interval_s) succeeds.
    # Triton keeps such a model READY (e.g. after its python stub died): docs/cloud.md.
    model_internal_threshold: int = Field(default=3, ge=1)
    model_probe_interval_s: float = Field(default=1.0, gt=0)
    # Answers kept by request id, so an outbox replay is answered without Triton.
    answer_cache_size: int = Field(default=10_000, ge=0)
    # A JSON line per Infer call that arrived (before validation); unset: off.
    intake_log_path: Path | None = None
    # fsync each intake record (survives power loss; ~0.3-0.5 ms per call measured,
    # docs/outbox-privacy.md); off: flushed to the kernel only (survives kill -9).
    intake_fsync: bool = True
