"""Assembles an edge node: server first (NOT_SERVING), then models, then SERVING."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from edge_node.admin import EdgeAdminServicer, UpdateEvents
from edge_node.bootstrap import fetch_promoted
from edge_node.canary import CanaryMargins, GoldenSet
from edge_node.config import EdgeSettings
from edge_node.inference import EdgeInference
from edge_node.local_models import LocalModels
from edge_node.servicer import EdgeServicer
from edge_node.updater import MODEL_KIND, EdgeUpdater, UpdateReport, UpdaterSettings
from hybridmesh.edge.v1 import edge_admin_pb2_grpc, edge_service_pb2_grpc
from ota.registry_client import RegistryClient, SiteServes
from ota.seed import seed_versions
from ota.signatures import load_trusted_keys
from ota.updates import SiteUpdates
from services.admission import observe_admission
from services.auth import (
    CallerAuthenticator,
    ControlPlaneAuth,
    bearer_metadata,
    load_token_hashes,
    read_token,
)
from services.channels import ChannelFactory, mtls_credentials
from services.errors import UnavailableError
from services.logging import get_logger
from services.rpc_metrics import seconds_histogram
from services.server import ServiceHost, ServiceRegistration
from services.telemetry import Telemetry, observe_info
from workload.model_store import ModelStoreError

EDGE_SERVICE_NAME = "hybridmesh.edge.v1.EdgeService"
EDGE_ADMIN_SERVICE_NAME = "hybridmesh.edge.v1.EdgeAdminService"

_log = get_logger("edge_node")


class EdgeNode:
    def __init__(self, settings: EdgeSettings, telemetry: Telemetry) -> None:
        self.settings = settings
        self._telemetry = telemetry
        self._inference: EdgeInference | None = None
        self._not_ready_reason = "models are still loading"
        self.models: LocalModels | None = None
        self.updater: EdgeUpdater | None = None
        self._registry_channel: grpc.aio.Channel | None = None
        self._registry: RegistryClient | None = None
        self._first_fetch: SiteUpdates | None = None
        self._stop_updates = asyncio.Event()
        self._updates: asyncio.Task[None] | None = None
        self.events = UpdateEvents()
        meter = telemetry.meter("hybridmesh.edge_node")
        self._latency = seconds_histogram(
            meter,
            "hybridmesh.edge.inference.duration",
            "Edge model compute time per request, by model and version",
        )
        observe_info(
            meter,
            "hybridmesh.edge.model.info",
            "The model versions this edge node serves (value 1)",
            lambda: [
                {"model": model.name, "version": model.version}
                for model in (self.models.all() if self.models is not None else [])
            ],
        )
        observe_admission(
            meter,
            "hybridmesh.edge",
            lambda: None if self._inference is None else self._inference.admission,
        )
        self._reports: set[asyncio.Task[None]] = set()  # strong references until done
        servicer = EdgeServicer(self.inference)
        admin = EdgeAdminServicer(
            settings.site_id, lambda: self.updater, lambda: self.models, self.events
        )
        # EdgeAdminService is the operator's only (services.access_rules); the data path
        # beside it is not guarded here.
        admin_auth = ControlPlaneAuth(
            CallerAuthenticator(
                load_token_hashes(settings.admin_token_sha256, settings.admin_tokens_file)
            )
        )
        self.host = ServiceHost(
            settings,
            [
                ServiceRegistration(
                    EDGE_SERVICE_NAME,
                    lambda server: edge_service_pb2_grpc.add_EdgeServiceServicer_to_server(
                        servicer, server
                    ),
                    serving_at_start=False,
                ),
                ServiceRegistration(
                    EDGE_ADMIN_SERVICE_NAME,
                    lambda server: edge_admin_pb2_grpc.add_EdgeAdminServiceServicer_to_server(
                        admin, server
                    ),
                ),
            ],
            interceptors=[
                *telemetry.server_interceptors(tracing=settings.tracing_enabled),
                admin_auth,
            ],
        )

    @property
    def ready(self) -> bool:
        return self._inference is not None

    def inference(self) -> EdgeInference:
        if self._inference is None:
            raise UnavailableError(self._not_ready_reason)
        return self._inference

    async def start(self) -> int:
        """Start serving; health turns SERVING once every model is loaded and verified.
        With a registry, polling starts whether or not the store loaded: an empty or
        refused store is retried at every poll (seeded, or fetched from the registry)."""
        port = await self.host.start()
        await self._load_models()
        if self.settings.registry_target:
            self._start_updates()
        return port

    async def _load_models(self) -> bool:
        settings = self.settings
        try:
            if settings.seed_store is not None:
                seeded = await asyncio.to_thread(
                    seed_versions, settings.seed_store, settings.model_store, settings.served_models
                )
                if seeded:
                    _log.info(
                        "model store seeded from the image", versions=[str(p) for p in seeded]
                    )
            models = await asyncio.to_thread(
                LocalModels.load,
                settings.model_store,
                settings.intra_op_threads,
                settings.served_models,
            )
        except (ModelStoreError, OSError) as error:
            # Stay up and NOT_SERVING with the reason, rather than crash-loop: the
            # operator sees why in health, in every refused call and in the log.
            self._not_ready_reason = f"model store refused: {error}"
            _log.error("model store refused", error=str(error))
            return False
        self.models = models
        self._inference = EdgeInference(
            models, self.settings, self._telemetry.tracer("hybridmesh.edge_node"), self._latency
        )
        await self.host.set_serving(EDGE_SERVICE_NAME, True)
        _log.info(
            "models loaded",
            models=[f"{m.name}:{m.version}" for m in models.all()],
            address=self.host.address,
        )
        return True

    def _start_updates(self) -> None:
        settings = self.settings
        if settings.golden_set is None or not settings.trusted_keys:
            raise ValueError("over-the-air updates need golden_set and trusted_keys")
        factory = ChannelFactory(self._telemetry.client_interceptors())
        self._registry_channel = factory.create(
            settings.registry_target, credentials=mtls_credentials(settings.registry_tls_dir)
        )
        self._registry = RegistryClient(
            self._registry_channel, bearer_metadata(read_token(settings.registry_token_file))
        )
        self._first_fetch = SiteUpdates(
            self._registry,
            MODEL_KIND,
            settings.update_staging,
            load_trusted_keys(list(settings.trusted_keys)),
        )
        if self.models is not None:
            self.updater = self._updater(self.models)
        self._updates = asyncio.create_task(self._update_loop())

    def _updater(self, models: LocalModels) -> EdgeUpdater:
        settings = self.settings
        assert self._registry is not None and settings.golden_set is not None
        return EdgeUpdater(
            self._registry,
            models,
            UpdaterSettings(
                store=settings.model_store,
                staging=settings.update_staging,
                keep_versions=settings.keep_versions,
                intra_op_threads=settings.intra_op_threads,
                margins=CanaryMargins(
                    settings.canary_max_accuracy_drop, settings.canary_min_agreement
                ),
            ),
            load_trusted_keys(list(settings.trusted_keys)),
            GoldenSet.load(settings.golden_set),
            on_report=self._on_update,
        )

    def _on_update(self, report: UpdateReport) -> None:
        self.events.record(report)
        # Tell the registry at once, so the fleet view shows the change (not at next poll).
        task = asyncio.get_running_loop().create_task(self._report_site())
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report_site(self) -> None:
        if self._registry is None or self.models is None or self.updater is None:
            return
        served = [
            SiteServes(
                MODEL_KIND,
                model.name,
                int(model.version),
                self.updater.refused.of(model.name),
            )
            for model in self.models.all()
        ]
        try:
            await self._registry.report_site(self.settings.site_id, served)
        except grpc.aio.AioRpcError as error:
            _log.warning("site report failed", code=error.code().name)

    async def _update_loop(self) -> None:
        await self._report_site()
        while not self._stop_updates.is_set():
            try:
                if self.models is None and self._first_fetch is not None:
                    settings = self.settings
                    try:
                        await fetch_promoted(
                            self._first_fetch, settings.model_store, settings.served_models
                        )
                    finally:  # an unreachable registry does not stop a retry of the store
                        await self._load_models()
                if self.models is not None:
                    self.updater = self.updater or self._updater(self.models)
                    await self.updater.poll_once()
            except (grpc.aio.AioRpcError, OSError) as error:
                _log.warning("update poll failed", error=str(error))
            await self._report_site()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_updates.wait(), self.settings.update_interval_s)

    async def stop(self, grace: float | None = None) -> None:
        self._stop_updates.set()
        if self._updates is not None:
            self._updates.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._updates
        await self.host.stop(grace)
        if self._registry_channel is not None:
            await self._registry_channel.close(None)
