"""Router settings (env prefix HYBRIDMESH_ROUTER_; nested fields with ``__``, e.g.
``HYBRIDMESH_ROUTER_BREAKER_CLOUD__SLOW_CALL_S=0.3``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from router_service.breaker import BreakerConfig
from router_service.drain_rate import DrainRateConfig
from services.config import ServiceSettings
from services.workers import worker_settings


class BreakerSettings(BaseModel):
    """One target's circuit breaker (router_service.breaker); the defaults are the
    resilience spec. Rates are in (0, 1], durations > 0, open_max_s >= open_base_s."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The time window the failure and slow-call rates are taken over.
    window_s: float = Field(default=10.0, gt=0)
    # Calls the window must hold before a rate can open the breaker.
    minimum_calls: int = Field(default=20, ge=1)
    failure_rate_to_open: float = Field(default=0.5, gt=0, le=1)
    slow_call_rate_to_open: float = Field(default=0.8, gt=0, le=1)
    # A call slower than this is slow (the target's latency SLO).
    slow_call_s: float = Field(default=0.5, gt=0)
    # First open period; doubles on each consecutive re-open up to open_max_s.
    open_base_s: float = Field(default=5.0, gt=0)
    open_max_s: float = Field(default=60.0, gt=0)
    # Live calls let through at once while half-open; this many successes close it.
    half_open_probes: int = Field(default=3, ge=1)
    # A run of this many failures opens it whatever the window holds.
    consecutive_failures_to_open: int = Field(default=5, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> BreakerSettings:
        self.config()  # BreakerConfig checks across fields (open_max_s >= open_base_s)
        return self

    def config(self) -> BreakerConfig:
        return BreakerConfig(**self.model_dump())


class EdgeBreakerSettings(BreakerSettings):
    # The edge answers in milliseconds on the site's LAN.
    slow_call_s: float = Field(default=0.1, gt=0)


class CloudBreakerSettings(BreakerSettings):
    slow_call_s: float = Field(default=0.5, gt=0)


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="HYBRIDMESH_ROUTER_",
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
    )

    service_name: str = "router"
    port: int = Field(default=50051, ge=0, le=65535)
    max_message_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    # "remote": the edge node is another process (edge_target); "in-process": the router
    # runs the edge model itself with the edge node's code as a library, configured by
    # the HYBRIDMESH_EDGE_* settings (router_service/colocated_edge.py).
    edge_mode: Literal["remote", "in-process"] = "remote"
    edge_target: str = "127.0.0.1:50052"
    cloud_target: str = "127.0.0.1:50053"
    # Per-site token presented to the cloud ("authorization: Bearer ...").
    cloud_site_token: str = ""
    # mTLS to the cloud ingress: a directory with ca.crt, tls.crt and tls.key (the k8s
    # TLS secret layout). Unset: plaintext (tests, or a trusted link).
    cloud_tls_dir: Path | None = None
    catalog: Path = Path("models/catalog.toml")
    # One policy root per catalog pair: <policies_dir>/<pair>/<version>/; the router loads
    # each pair's highest version. A pair with none is served by the explicit max-softmax
    # default below (router_service/escalation.py), named "max-softmax-default".
    policies_dir: Path = Path("models/policies")
    # The policies shipped in the image (/app/models/policies) when policies_dir is a
    # writable volume (a site): at start, each pair with no version under policies_dir
    # gets the seed's newest version (ota.seed), so over-the-air policies can be
    # installed beside it. Unset: nothing is seeded.
    policies_seed: Path | None = None
    # The default policy escalates an item when 1 - its top-1 probability reaches this.
    default_max_softmax_threshold: float = Field(default=0.3, gt=0, lt=1)
    # Hold the operator's ONE cloud-share target online (router_service/
    # threshold_controller.py): each pair's threshold follows a sliding window of its
    # scores, a bounded step at a time. Unset: the policy's calibrated threshold, fixed.
    controller_target_share: float | None = Field(default=None, ge=0, le=1)
    # Or the other ONE target: the maximum edge error among answers kept on the edge,
    # held from the shadow checks' online estimate (needs shadow_check_rate > 0). At
    # most one of the two may be set.
    controller_target_edge_error: float | None = Field(default=None, gt=0, lt=1)
    # Shadow checks (router_service/shadow.py): this share of kept answers is also sent
    # to the cloud in the background, billed and audited as purpose "shadow", to
    # estimate the edge's error among kept answers; 0 turns them off. PUBLIC requests
    # only, and INTERNAL ones through the pair's anonymiser only when
    # shadow_check_internal is on; SENSITIVE never.
    shadow_check_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    shadow_check_internal: bool = False
    # Shadow calls in flight at once; a check that would exceed it is dropped (counted).
    shadow_max_in_flight: int = Field(default=4, ge=1)
    shadow_timeout_s: float = Field(default=2.0, gt=0)
    # The estimate's sliding window of checks, and its interval's confidence.
    edge_error_window: int = Field(default=1000, ge=1)
    edge_error_confidence: float = Field(default=0.95, gt=0, lt=1)

    # Used when the call carries no gRPC deadline and the hints no budget.
    default_budget_s: float = Field(default=1.0, gt=0)
    # Circuit breaker per tier: HYBRIDMESH_ROUTER_BREAKER_EDGE__<FIELD>,
    # HYBRIDMESH_ROUTER_BREAKER_CLOUD__<FIELD> (fields and defaults: BreakerSettings).
    breaker_edge: EdgeBreakerSettings = EdgeBreakerSettings()
    breaker_cloud: CloudBreakerSettings = CloudBreakerSettings()
    # Kept back from every budget for the router's own work and the reply.
    budget_margin_s: float = Field(default=0.02, ge=0)
    # Call the cloud beside the edge (hedge) when the remaining budget is below this, or
    # below edge p95 + cloud p95 once both are known; 0 leaves only the p95 rule.
    hedge_below_budget_s: float = Field(default=0.0, ge=0)
    # Per-attempt timeouts (router_service/budget.py): a tier attempt is capped at
    # attempt_p99_multiple x its rolling p99 (never below attempt_floor_s), and leaves
    # the other tier's rolling p95 (fallback_reserve_default_s until known) for the
    # fallback, so a hung tier costs the cap, not the caller's deadline.
    attempt_floor_s: float = Field(default=0.1, gt=0)
    attempt_p99_multiple: float = Field(default=4.0, ge=1)
    # The cap of a tier with no latency history yet (its first 20 calls).
    attempt_cap_default_s: float = Field(default=0.25, gt=0)
    fallback_reserve_default_s: float = Field(default=0.25, ge=0)
    max_batch_size: int = Field(default=64, ge=1)
    max_top_k: int = Field(default=10, ge=1)
    # Admission (services/admission.py): requests routed at once, and waiting for a turn;
    # beyond that, or when the expected wait exceeds what the caller's deadline leaves,
    # RESOURCE_EXHAUSTED with retry pushback (gRFC A6) at once.
    max_in_flight: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=256, ge=0)
    retry_pushback_ms: int = Field(default=50, ge=0)
    # And while the event loop runs this far behind (smoothed; services/loop_lag.py):
    # the router's CPU is saturated and work queues before any handler sees it. 0: off.
    # Off by default: on this loaded 2-core machine an idle router's smoothed lag reaches
    # 8 ms and the chaos test's router's passed 25 ms with no overload of its own (noisy
    # neighbours), so a default would refuse good traffic; set it where the router has its
    # cores (10 ms kept goodput at 0.92x capacity at 2x load, docs/benchmarks.md).
    max_loop_lag_s: float = Field(default=0.0, ge=0)
    # Prices per item in micro-USD: $1.50 per 1,000 cloud images (a typical cloud vision
    # price) and a nominal edge cost (power, amortised hardware).
    cloud_price_micros: int = Field(default=1500, ge=0)
    edge_price_micros: int = Field(default=10, ge=0)
    currency_code: str = "USD"
    # The outbox (SQLite, WAL) on the site's persistent volume: would-be escalations the
    # cloud could not take, reconciled when it is back, and their labelled examples.
    outbox_path: Path = Path("var/router/outbox.sqlite")
    # When full, the oldest item of the lowest priority goes first (counted and logged).
    outbox_max_items: int = Field(default=10_000, ge=1)
    # Kept back from a cloud call's timeout for the outbox write after a failure
    # (measured: a FULL-sync write takes ~0.2-0.3 ms median, ~1.5 ms p99 here).
    outbox_write_reserve_s: float = Field(default=0.01, ge=0)
    # FULL survives power loss; NORMAL only a process crash, at a lower write cost.
    outbox_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # Share of edge-kept (confident) answers also queued, at low priority, so the cloud
    # checks a sample of them (quality monitoring); 0 turns it off.
    outbox_sample_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # Labelled examples kept (newest first) for retraining the router.
    outbox_max_examples: int = Field(default=100_000, ge=0)
    # Reconciliation starts at drain_rate_per_s requests per second and adapts within
    # [drain_rate_min_per_s, drain_rate_max_per_s] (router_service.drain_rate: AIMD on
    # the replays' latency against drain_latency_tolerance x its unloaded baseline, and
    # the cloud's retry pushback), so a recovering cloud is not stampeded by the backlog
    # and the router's live traffic keeps its latency; min = max gives a fixed rate.
    # Failed items back off exponentially from drain_backoff_base_s up to _max_s.
    drain_rate_per_s: float = Field(default=20.0, gt=0)
    drain_rate_min_per_s: float = Field(default=5.0, gt=0)
    drain_rate_max_per_s: float = Field(default=500.0, gt=0)
    drain_latency_tolerance: float = Field(default=1.5, ge=1)
    drain_batch: int = Field(default=128, ge=1)
    # Reconciliation calls in flight at once: with a 40 ms WAN one at a time would cap
    # the drain at ~25 requests/s, 8 at ~130/s, whatever the rate says; the rate, not
    # this bound, sets the pace.
    drain_concurrency: int = Field(default=32, ge=1)
    drain_idle_s: float = Field(default=0.5, gt=0)
    drain_timeout_s: float = Field(default=5.0, gt=0)
    drain_backoff_base_s: float = Field(default=1.0, gt=0)
    drain_backoff_max_s: float = Field(default=60.0, gt=0)
    # Audit log of off-site transfers (JSON lines). Unset: stdout, apart from the
    # service's own log on stderr.
    audit_log_path: Path | None = None
    # fsync each audit record (survives power loss; ~0.3-0.5 ms per cloud call measured,
    # docs/outbox-privacy.md); off: flushed to the kernel only (survives kill -9).
    audit_fsync: bool = True
    # Over-the-air router policies (router_service.policy_updater); off unless a
    # registry is configured. Verified with trusted_keys, downloads under
    # policy_update_staging/<pair>, installed under policies_dir/<pair>.
    registry_target: str = ""
    registry_tls_dir: Path | None = None
    # The site's bearer token for the registry (a file holding it); unset: the client
    # certificate (registry_tls_dir) is the credential.
    registry_token_file: Path | None = None
    trusted_keys: tuple[Path, ...] = ()
    policy_update_staging: Path = Path("var/router-policy-updates")
    policy_update_interval_s: float = Field(default=30.0, gt=0)
    # This site's id in the registry's fleet view: the router reports the policy version
    # of each pair after every poll (the edge node reports its models under the same id).
    site_id: str = "site-local"

    @model_validator(mode="after")
    def _one_target(self) -> RouterSettings:
        if self.controller_target_share is not None and self.controller_target_edge_error:
            raise ValueError(
                "set one controller target: controller_target_share or controller_target_edge_error"
            )
        if self.controller_target_edge_error is not None and self.shadow_check_rate == 0:
            raise ValueError("controller_target_edge_error needs shadow_check_rate > 0")
        return self

    @model_validator(mode="after")
    def _drain_rates(self) -> RouterSettings:
        self.drain_rate_config()  # DrainRateConfig checks min <= start <= max
        return self

    def drain_rate_config(self) -> DrainRateConfig:
        return DrainRateConfig(
            initial_per_s=self.drain_rate_per_s,
            min_per_s=self.drain_rate_min_per_s,
            max_per_s=self.drain_rate_max_per_s,
            tolerance=self.drain_latency_tolerance,
        )

    @model_validator(mode="after")
    def _workers_with_remote_edge(self) -> RouterSettings:
        if self.workers > 1 and self.edge_mode == "in-process":
            # Each worker would run its own co-located edge node: its admin port, model
            # store updates and canary would be per process, and an admin call would
            # reach one worker only.
            raise ValueError("workers > 1 needs edge_mode 'remote' (not 'in-process')")
        return self

    def for_worker(self, index: int, port: int) -> RouterSettings:
        """These settings for worker ``index`` of ``workers`` on the shared ``port``:
        its own /metrics port, outbox file (``outbox.sqlite`` -> ``outbox.worker1.sqlite``,
        drained by that worker alone), policy staging directory, and its share of the
        drain rate's start and bounds (so the cloud sees the site's rate in all)."""
        settings = worker_settings(self, index, port)
        if self.workers == 1:
            return settings
        outbox = self.outbox_path
        return settings.model_copy(
            update={
                "outbox_path": outbox.with_name(f"{outbox.stem}.worker{index}{outbox.suffix}"),
                "policy_update_staging": self.policy_update_staging / f"worker{index}",
                # The adaptive drain's start and bounds, shared out between the workers.
                "drain_rate_per_s": self.drain_rate_per_s / self.workers,
                "drain_rate_min_per_s": self.drain_rate_min_per_s / self.workers,
                "drain_rate_max_per_s": self.drain_rate_max_per_s / self.workers,
            }
        )
