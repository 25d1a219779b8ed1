"""Edge node settings (env prefix HYBRIDMESH_EDGE_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.config import ServiceSettings

EDGE_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class EdgeSettings(ServiceSettings):
    """What one edge node serves and how hard it may work."""

    model_config = SettingsConfigDict(env_prefix="HYBRIDMESH_EDGE_", extra="ignore", frozen=True)

    service_name: str = "edge-node"
    port: int = Field(default=50052, ge=0, le=65535)
    max_message_bytes: int = Field(default=EDGE_MAX_MESSAGE_BYTES, gt=0)
    # Directory of the versioned model store: <name>/<version>/manifest.json + files.
    model_store: Path = Path("models/store")
    # Names of the models to serve from the store; empty serves every model in it.
    served_models: tuple[str, ...] = ()
    # A read-only store shipped in the image (/app/models/store): at start, and at each
    # poll while the store is refused, each served model with no version in model_store
    # gets the seed's newest version (ota.seed). Unset: nothing is seeded.
    seed_store: Path | None = None
    # onnxruntime sizes its pool from the host, not the cgroup (onnxruntime#29510):
    # always set it. One thread per session run; parallelism comes from compute_slots.
    intra_op_threads: int = Field(default=1, ge=1)
    # Session runs at once (each in a worker thread).
    compute_slots: int = Field(default=2, ge=1)
    # Models whose measured batch-1 latency (manifest) is at most this run on the event
    # loop itself: for a ~20 µs model the thread hand-off costs more than the work.
    # 0 sends every run to a worker thread.
    inline_compute_max_us: float = Field(default=100.0, ge=0)
    # Requests waiting for a slot before new ones get RESOURCE_EXHAUSTED.
    max_queued_requests: int = Field(default=256, ge=0)
    max_batch_size: int = Field(default=64, ge=1)
    # Sum of input bytes per request; checked by the service so an oversized request gets
    # INVALID_ARGUMENT naming the field (the transport limit above is only a backstop).
    max_payload_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    max_top_k: int = Field(default=10, ge=1)

    # Over-the-air updates (edge_node.updater); off unless a registry is configured.
    # The registry to poll ("host:port"); empty: no updates, models from the store only.
    registry_target: str = ""
    # mTLS to the registry (ca.crt, tls.crt, tls.key); unset: plaintext.
    registry_tls_dir: Path | None = None
    # This site's bearer token for the registry (a file holding it); unset: the client
    # certificate above is the credential.
    registry_token_file: Path | None = None
    # Who may call EdgeAdminService (the operator): SPIFFE id -> sha256 hex of its token,
    # inline and/or as a JSON file. Nothing configured: every admin call is refused.
    admin_token_sha256: dict[str, str] = Field(default_factory=dict)
    admin_tokens_file: Path | None = None
    # This site's id in the registry's fleet view.
    site_id: str = "site-local"
    # PEM public keys of the operators whose signatures this site accepts.
    trusted_keys: tuple[Path, ...] = ()
    # Labelled images the canary runs (edge_node.canary.GoldenSet .npz).
    golden_set: Path | None = None
    # Downloads in progress, retired versions and refused.json.
    update_staging: Path = Path("var/edge-updates")
    update_interval_s: float = Field(default=30.0, gt=0)
    keep_versions: int = Field(default=3, ge=2)
    canary_max_accuracy_drop: float = Field(default=0.005, ge=0, le=1)
    canary_min_agreement: float = Field(default=0.90, ge=0, le=1)
