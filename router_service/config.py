"""Router settings (env prefix HYBRIDMESH_ROUTER_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.config import ServiceSettings


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="HYBRIDMESH_ROUTER_", extra="ignore", frozen=True)

    service_name: str = "router"
    port: int = Field(default=50051, ge=0, le=65535)
    max_message_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    edge_target: str = "127.0.0.1:50052"
    cloud_target: str = "127.0.0.1:50053"
    # Per-site token presented to the cloud ("authorization: Bearer ...").
    cloud_site_token: str = ""
    # mTLS to the cloud ingress: a directory with ca.crt, tls.crt and tls.key (the k8s
    # TLS secret layout). Unset: plaintext (tests, or a trusted link).
    cloud_tls_dir: Path | None = None
    catalog: Path = Path("models/catalog.toml")
    # A pair's policy root; the router loads its highest version.
    policy_root: Path = Path("models/policies/fashion-mnist")
    # Used when the call carries no gRPC deadline and the hints no budget.
    default_budget_s: float = Field(default=1.0, gt=0)
    # Kept back from every budget for the router's own work and the reply.
    budget_margin_s: float = Field(default=0.02, ge=0)
    # Call the cloud beside the edge (hedge) when the remaining budget is below this, or
    # below edge p95 + cloud p95 once both are known; 0 leaves only the p95 rule.
    hedge_below_budget_s: float = Field(default=0.0, ge=0)
    max_batch_size: int = Field(default=64, ge=1)
    max_top_k: int = Field(default=10, ge=1)
    # Prices per item in micro-USD: $1.50 per 1,000 cloud images (a typical cloud vision
    # price) and a nominal edge cost (power, amortised hardware).
    cloud_price_micros: int = Field(default=1500, ge=0)
    edge_price_micros: int = Field(default=10, ge=0)
    currency_code: str = "USD"
