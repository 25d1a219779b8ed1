"""Assembles the cloud service: auth, Triton client, model cache, health watch."""

from __future__ import annotations

import asyncio
import contextlib

from cloud_inference.auth import SiteAuthenticator, SiteAuthInterceptor, load_site_hashes
from cloud_inference.config import CloudSettings
from cloud_inference.inference import CloudInference
from cloud_inference.servicer import CloudServicer
from cloud_inference.triton_client import TritonClient
from hybridmesh.cloud.v1 import cloud_service_pb2_grpc
from services.errors import ServiceError, UnavailableError
from services.logging import get_logger
from services.server import ServiceHost, ServiceRegistration
from services.telemetry import Telemetry
from workload.model_store import ModelStoreError, latest_versions, load_verified

CLOUD_SERVICE_NAME = "hybridmesh.cloud.v1.CloudService"

_log = get_logger("cloud_inference")


def _store_labels(settings: CloudSettings) -> dict[str, tuple[str, ...]]:
    try:
        return {
            manifest.name: manifest.labels
            for manifest in (load_verified(d) for d in latest_versions(settings.model_store))
        }
    except ModelStoreError as error:
        _log.warning("no labels from the model store", error=str(error))
        return {}


class CloudNode:
    """The cloud service process: SERVING while Triton is live and its models are ready."""

    def __init__(self, settings: CloudSettings, telemetry: Telemetry, models: list[str]) -> None:
        self.settings = settings
        self._telemetry = telemetry
        self._model_names = models
        self.triton = TritonClient(settings.triton_url)
        self._inference: CloudInference | None = None
        self._triton_ready = False
        authenticator = SiteAuthenticator(
            load_site_hashes(settings.site_token_sha256, settings.site_tokens_file)
        )
        servicer = CloudServicer(self.inference, lambda: self._triton_ready)
        interceptors = telemetry.server_interceptors() if settings.tracing_enabled else []
        self.host = ServiceHost(
            settings,
            [
                ServiceRegistration(
                    CLOUD_SERVICE_NAME,
                    lambda server: cloud_service_pb2_grpc.add_CloudServiceServicer_to_server(
                        servicer, server
                    ),
                    serving_at_start=False,
                )
            ],
            # Authentication first: an unauthenticated call gets no further.
            interceptors=[SiteAuthInterceptor(authenticator), *interceptors],
        )
        self._watch: asyncio.Task[None] | None = None

    def inference(self) -> CloudInference:
        if self._inference is None:
            raise UnavailableError("Triton is not ready yet")
        return self._inference

    async def start(self) -> int:
        port = await self.host.start()
        self._watch = asyncio.create_task(self._watch_triton())
        return port

    async def stop(self, grace: float | None = None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.host.stop(grace)
        await self.triton.close()

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self._triton_ready:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("cloud service not ready")
            await asyncio.sleep(0.05)

    async def _watch_triton(self) -> None:
        """Readiness follows Triton: live, and every configured model ready."""
        while True:
            ready = await self.triton.is_ready(self._model_names)
            if ready and self._inference is None:
                try:
                    models = {name: await self.triton.model(name) for name in self._model_names}
                except ServiceError as error:
                    _log.warning("model metadata unavailable", error=str(error))
                    ready = False
                else:
                    self._inference = CloudInference(
                        self.settings,
                        self.triton,
                        models,
                        _store_labels(self.settings),
                        self._telemetry.tracer("hybridmesh.cloud_inference"),
                    )
            if ready != self._triton_ready:
                self._triton_ready = ready
                await self.host.set_serving(CLOUD_SERVICE_NAME, ready)
                _log.info("triton readiness", ready=ready, models=self._model_names)
            await asyncio.sleep(self.settings.health_poll_s)
