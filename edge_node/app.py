"""Assembles an edge node: server first (NOT_SERVING), then models, then SERVING."""

from __future__ import annotations

import asyncio

from edge_node.config import EdgeSettings
from edge_node.inference import EdgeInference
from edge_node.local_models import LocalModels
from edge_node.servicer import EdgeServicer
from hybridmesh.edge.v1 import edge_service_pb2_grpc
from services.errors import UnavailableError
from services.logging import get_logger
from services.server import ServiceHost, ServiceRegistration
from services.telemetry import Telemetry
from workload.model_store import ModelStoreError

EDGE_SERVICE_NAME = "hybridmesh.edge.v1.EdgeService"

_log = get_logger("edge_node")


class EdgeNode:
    def __init__(self, settings: EdgeSettings, telemetry: Telemetry) -> None:
        self.settings = settings
        self._telemetry = telemetry
        self._inference: EdgeInference | None = None
        self._not_ready_reason = "models are still loading"
        servicer = EdgeServicer(self.inference)
        self.host = ServiceHost(
            settings,
            [
                ServiceRegistration(
                    EDGE_SERVICE_NAME,
                    lambda server: edge_service_pb2_grpc.add_EdgeServiceServicer_to_server(
                        servicer, server
                    ),
                    serving_at_start=False,
                )
            ],
            interceptors=telemetry.server_interceptors() if settings.tracing_enabled else [],
        )

    @property
    def ready(self) -> bool:
        return self._inference is not None

    def inference(self) -> EdgeInference:
        if self._inference is None:
            raise UnavailableError(self._not_ready_reason)
        return self._inference

    async def start(self) -> int:
        """Start serving; health turns SERVING once every model is loaded and verified."""
        port = await self.host.start()
        try:
            models = await asyncio.to_thread(
                LocalModels.load,
                self.settings.model_store,
                self.settings.intra_op_threads,
                self.settings.served_models,
            )
        except ModelStoreError as error:
            # Stay up and NOT_SERVING with the reason, rather than crash-loop: the
            # operator sees why in health, in every refused call and in the log.
            self._not_ready_reason = f"model store refused: {error}"
            _log.error("model store refused", error=str(error))
            return port
        self._inference = EdgeInference(
            models, self.settings, self._telemetry.tracer("hybridmesh.edge_node")
        )
        await self.host.set_serving(EDGE_SERVICE_NAME, True)
        _log.info(
            "models loaded",
            models=[f"{m.name}:{m.version}" for m in models.all()],
            address=self.host.address,
        )
        return port

    async def stop(self, grace: float | None = None) -> None:
        await self.host.stop(grace)
