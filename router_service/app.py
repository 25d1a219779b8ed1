"""Assembles the router: channels, breakers, policy artifact, server, tier health watch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_node.app import EdgeNode
from edge_node.config import EdgeSettings
from hybridmesh.cloud.v1 import cloud_service_pb2_grpc
from hybridmesh.edge.v1 import edge_service_pb2_grpc
from hybridmesh.router.v1 import router_service_pb2_grpc
from ota.registry_client import RegistryClient, SiteServes
from ota.seed import seed_versions
from ota.signatures import load_trusted_keys
from router_service.anonymisers import anonymiser
from router_service.audit import AUDIT_STREAM, TransferAudit
from router_service.breaker import BreakerState, CircuitBreaker
from router_service.colocated_edge import InProcessEdgeTier
from router_service.config import RouterSettings
from router_service.controller_metrics import register_controller_metrics
from router_service.escalation import ScoringPolicy, load_pair_policies
from router_service.metrics import RouterMetrics, observe_router_state
from router_service.oip_conversion import OIP_SERVICE_NAME, PairMetadata, TensorMetadata
from router_service.oip_servicer import OipServicer, add_oip_servicer_to_server
from router_service.outbox import Outbox, ReconciledItem
from router_service.policy_updater import POLICY_KIND, PolicyUpdater
from router_service.reconciler import PairRoute, Reconciler
from router_service.request_validation import PairSpec
from router_service.routing import Router
from router_service.servicer import RouterServicer
from router_service.tier_api import CloudTierApi, EdgeTierApi
from router_service.tiers import CloudTier, EdgeTier
from services.admission import Admission, observe_admission
from services.auth import bearer_metadata, read_token
from services.channels import ChannelFactory, mtls_credentials
from services.logging import get_logger
from services.loop_lag import LoopLag
from services.records import RecordSink
from services.server import ServiceHost, ServiceRegistration
from services.shedding import SheddingInterceptor, shed_before_tracing
from services.telemetry import Telemetry
from services.tensors import DATATYPE_BY_KSERVE_NAME
from workload.catalog import load_catalog

ROUTER_SERVICE_NAME = "hybridmesh.router.v1.RouterService"
HEALTH_POLL_S = 0.5
# The calls that take an admission slot; shed before tracing (services/shedding.py).
SHED_METHODS = (
    f"/{ROUTER_SERVICE_NAME}/Infer",
    f"/{ROUTER_SERVICE_NAME}/InferStream",
    f"/{OIP_SERVICE_NAME}/ModelInfer",
)

_log = get_logger("router_service")


def _admission(settings: RouterSettings) -> tuple[Admission, LoopLag]:
    """The router's one admission limit, and the loop lag it sheds on (started with the
    router)."""
    loop_lag = LoopLag()
    return Admission(
        settings.max_in_flight,
        settings.max_queued_requests,
        settings.retry_pushback_ms,
        resource="the router",
        loop_lag=lambda: loop_lag.lag_s,
        max_loop_lag_s=settings.max_loop_lag_s,
    ), loop_lag


def oip_pairs_from_catalog(path: Path) -> dict[str, PairMetadata]:
    """Each pair's tensors as the Open Inference Protocol's ModelMetadata shows them."""
    return {
        pair.name: PairMetadata(
            pair.name,
            (TensorMetadata(pair.input.name, pair.input.datatype, pair.input.shape),),
            (TensorMetadata(pair.output.name, pair.output.datatype, pair.output.shape),),
        )
        for pair in load_catalog(path).values()
    }


def pairs_from_catalog(path: Path) -> list[PairSpec]:
    """The router's view of the catalog: names, the shared input contract, output kind."""
    return [
        PairSpec(
            name=pair.name,
            edge_model=pair.edge_model,
            cloud_model=pair.cloud_model,
            input_name=pair.input.name,
            input_datatype=DATATYPE_BY_KSERVE_NAME[pair.input.datatype],
            input_shape=pair.input.shape,
            outputs_probabilities=pair.output_kind == "probabilities",
            anonymiser=pair.anonymiser,
        )
        for pair in load_catalog(path).values()
    ]


class RouterNode:
    """The router process: serves RouterService; SERVING while some tier can answer."""

    def __init__(
        self,
        settings: RouterSettings,
        telemetry: Telemetry,
        pairs: Sequence[PairSpec],
        *,
        edge_settings: EdgeSettings | None = None,
    ) -> None:
        """``edge_settings``: with ``edge_mode = "in-process"``, the co-located edge
        node's settings (its model store, served models, updates, admin port)."""
        self.settings = settings
        for pair in pairs:
            anonymiser(pair.anonymiser)  # an unknown anonymiser fails at start, not at upload
        factory = ChannelFactory(telemetry.client_interceptors(), settings.max_message_bytes)
        self._edge_channel, self._cloud_channel = _tier_channels(settings, telemetry)
        if settings.policies_seed is not None:
            for seeded in seed_versions(
                settings.policies_seed, settings.policies_dir, [pair.name for pair in pairs]
            ):
                _log.info("router policy seeded from the image", directory=str(seeded))
        meter = telemetry.meter("hybridmesh.router")
        breaker_state = meter.create_up_down_counter(
            "hybridmesh.breaker.open", description="1 while a tier's breaker is open"
        )

        # Each breaker's state as its callback last said (the breaker.state gauge).
        breaker_states = {"edge": BreakerState.CLOSED, "cloud": BreakerState.CLOSED}

        def on_change(name: str, old: BreakerState, new: BreakerState) -> None:
            _log.warning("breaker state change", target=name, old=old.value, new=new.value)
            breaker_states[name] = new
            if new is BreakerState.OPEN:
                breaker_state.add(1, {"target": name})
            elif old is BreakerState.OPEN:
                breaker_state.add(-1, {"target": name})

        tracer = telemetry.tracer("hybridmesh.router")
        # Written whatever the log level (services/records.py); stdout when no path is set.
        self._audit_sink = RecordSink.open(
            settings.audit_log_path, AUDIT_STREAM, fsync=settings.audit_fsync, meter=meter
        )
        cloud = CloudTier(
            cloud_service_pb2_grpc.CloudServiceStub(self._cloud_channel),
            CircuitBreaker("cloud", settings.breaker_cloud.config(), on_state_change=on_change),
            settings.cloud_site_token,
            TransferAudit(self._audit_sink, settings.cloud_target),
        )
        self.outbox = Outbox(
            settings.outbox_path,
            max_items=settings.outbox_max_items,
            synchronous=settings.outbox_synchronous,
            max_reconciled_rows=settings.outbox_max_examples,
        )
        self.reconciler = Reconciler(
            settings,
            self.outbox,
            cloud,
            {pair.name: PairRoute(pair.cloud_model, pair.anonymiser) for pair in pairs},
            cloud_ready=lambda: (
                self.tier_up["cloud"] and cloud.breaker.state is not BreakerState.OPEN
            ),
            tracer=tracer,
            meter=meter,
        )
        edge_breaker = CircuitBreaker(
            "edge", settings.breaker_edge.config(), on_state_change=on_change
        )
        # At a co-located site the edge model runs in this process (colocated_edge.py).
        self.colocated_edge: EdgeNode | None = None
        edge: EdgeTierApi
        if settings.edge_mode == "in-process":
            self.colocated_edge = EdgeNode(edge_settings or EdgeSettings(), telemetry)
            edge = InProcessEdgeTier(self.colocated_edge, edge_breaker)
        else:
            edge = EdgeTier(edge_service_pb2_grpc.EdgeServiceStub(self._edge_channel), edge_breaker)
        self.router = Router(
            settings,
            pairs=pairs,
            edge=edge,
            cloud=cloud,
            policies=load_pair_policies(
                settings.policies_dir,
                [pair.name for pair in pairs],
                settings.default_max_softmax_threshold,
            ),
            tracer=tracer,
            metrics=RouterMetrics(meter),
            reconciler=self.reconciler,
            meter=meter,
            shadow_labels=self._record_shadow_labels,
        )
        register_controller_metrics(meter, self.router.controllers, self.router.edge_error)
        # One admission limit for the router, whichever protocol a request came by.
        admission, self.loop_lag = _admission(settings)
        servicer = RouterServicer(self.router, self.reconciler, admission)
        observe_router_state(meter, breaker_states, lambda: self.router.policies)
        observe_admission(meter, "hybridmesh.router", lambda: admission)
        # The Open Inference Protocol (KServe v2) beside RouterService: the same Router.
        oip_servicer = OipServicer(
            self.router,
            admission,
            oip_pairs_from_catalog(settings.catalog),
            ready=lambda: any(self.tier_up.values()),
        )
        self.host = ServiceHost(
            settings,
            [
                ServiceRegistration(
                    ROUTER_SERVICE_NAME,
                    lambda server: router_service_pb2_grpc.add_RouterServiceServicer_to_server(
                        servicer, server
                    ),
                    serving_at_start=False,
                ),
                ServiceRegistration(
                    OIP_SERVICE_NAME,
                    lambda server: add_oip_servicer_to_server(oip_servicer, server),
                    serving_at_start=False,
                ),
            ],
            interceptors=shed_before_tracing(
                telemetry.server_interceptors(tracing=settings.tracing_enabled),
                SheddingInterceptor(admission, SHED_METHODS),
            ),
        )
        # Draining ends the endless WatchCorrections streams at once (corrections.py).
        self.host.on_draining(self.reconciler.feed.close)
        self._tasks: list[asyncio.Task[None]] = []
        self.tier_up = {"edge": False, "cloud": False}
        self._registry_channel: grpc.aio.Channel | None = None
        self._registry: RegistryClient | None = None
        # One updater per pair: an update of one pair's policy never touches another's.
        self.policy_updaters: dict[str, PolicyUpdater] = {}
        if settings.registry_target:
            self._registry_channel = factory.create(
                settings.registry_target, credentials=mtls_credentials(settings.registry_tls_dir)
            )
            self._registry = RegistryClient(
                self._registry_channel,
                bearer_metadata(read_token(settings.registry_token_file)),
            )
            for pair in pairs:
                self.policy_updaters[pair.name] = self._policy_updater(self._registry, pair.name)
        for pair_name, policy in self.router.policies.items():
            _log.info(
                "router policy", pair=pair_name, version=policy.version, kind=policy.metadata.kind
            )

    async def _record_shadow_labels(self, labels: Sequence[ReconciledItem]) -> None:
        """Shadow checks' labels beside reconciliation's, for ``training.retrain``."""
        await asyncio.to_thread(self.outbox.record, labels)

    def _policy_updater(self, registry: RegistryClient, pair: str) -> PolicyUpdater:
        settings = self.settings

        def install(policy: ScoringPolicy) -> None:
            # One reference swap: requests in flight keep the policy they started with.
            self.router.install_policy(pair, policy)

        return PolicyUpdater(
            registry,
            pair,
            settings.policies_dir / pair,
            settings.policy_update_staging / pair,
            load_trusted_keys(list(settings.trusted_keys)),
            current=lambda: self.router.policies[pair],
            install=install,
        )

    async def start(self) -> int:
        if self.colocated_edge is not None:
            await self.colocated_edge.start()  # models load before the router serves
        port = await self.host.start()
        self._tasks = [
            asyncio.create_task(self._watch_tiers()),
            asyncio.create_task(self.reconciler.run()),
            asyncio.create_task(self.loop_lag.run()),
        ]
        for updater in self.policy_updaters.values():
            self._tasks.append(asyncio.create_task(self._poll_policies(updater)))
        return port

    async def _poll_policies(self, updater: PolicyUpdater) -> None:
        while True:
            try:
                await updater.poll_once()
            except (grpc.aio.AioRpcError, OSError) as error:
                _log.warning("policy update poll failed", error=str(error))
            await self._report_site()
            await asyncio.sleep(self.settings.policy_update_interval_s)

    async def _report_site(self) -> None:
        """Tell the registry which policy version each pair serves (the fleet view); a
        pair on the max-softmax default has no published version and is left out."""
        if self._registry is None:
            return
        served = [
            SiteServes(POLICY_KIND, pair, int(policy.version), updater.refused.of(pair))
            for pair, updater in self.policy_updaters.items()
            if (policy := self.router.policies[pair]).version.isdigit()
        ]
        try:
            await self._registry.report_site(self.settings.site_id, served)
        except grpc.aio.AioRpcError as error:
            _log.warning("site report failed", code=error.code().name)

    async def stop(self, grace: float | None = None) -> None:
        shadow = self.router.shadow
        for task in [*self._tasks, *(shadow.tasks if shadow is not None else ())]:
            task.cancel()
        for task in [*self._tasks, *(shadow.tasks if shadow is not None else ())]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.host.stop(grace)
        if self.colocated_edge is not None:
            await self.colocated_edge.stop(grace)
        await self._edge_channel.close(None)
        await self._cloud_channel.close(None)
        if self._registry_channel is not None:
            await self._registry_channel.close(None)
        self.outbox.close()
        self._audit_sink.close()

    async def _watch_tiers(self) -> None:
        """Poll both tiers' grpc.health.v1; the router serves while either can answer."""
        edge = health_pb2_grpc.HealthStub(self._edge_channel)
        cloud = health_pb2_grpc.HealthStub(self._cloud_channel)
        serving: bool | None = None
        tiers: dict[str, EdgeTierApi | CloudTierApi] = {
            "edge": self.router.edge,
            "cloud": self.router.cloud,
        }
        while True:
            for name, stub in (("edge", edge), ("cloud", cloud)):
                if name == "edge" and self.colocated_edge is not None:
                    up = self.colocated_edge.ready
                else:
                    up = await _is_serving(stub)
                if up and not self.tier_up[name]:
                    # Back from down: probe now instead of waiting out the open period.
                    tiers[name].breaker.health_restored()
                self.tier_up[name] = up
                if tiers[name].health.observe(up):
                    # Known down: no live call pays to find out (Envoy-style ejection).
                    tiers[name].breaker.health_lost()
            now_serving = any(self.tier_up.values())
            if now_serving != serving:
                serving = now_serving
                for name in (ROUTER_SERVICE_NAME, OIP_SERVICE_NAME):
                    await self.host.set_serving(name, serving)
                _log.info("router health", serving=serving, **self.tier_up)
            await asyncio.sleep(HEALTH_POLL_S)


def _tier_channels(
    settings: RouterSettings, telemetry: Telemetry
) -> tuple[grpc.aio.Channel, grpc.aio.Channel]:
    """The edge and cloud channels. Every call on them is made by tiers.py (which checks
    its deadline, ``require_timeout``) or the health watch (timeout=1.0), so they skip
    the deadline interceptor: one client interceptor layer less per request."""
    factory = ChannelFactory(
        telemetry.client_interceptors(), settings.max_message_bytes, deadline_interceptor=False
    )
    return factory.create(settings.edge_target), factory.create(
        settings.cloud_target, credentials=mtls_credentials(settings.cloud_tls_dir)
    )


async def _is_serving(stub: health_pb2_grpc.HealthStub) -> bool:
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
