"""Assembles the cloud service: auth, Triton client, model cache, health that follows Triton."""

from __future__ import annotations

import asyncio
import contextlib

from cloud_inference.admission import Admission
from cloud_inference.auth import SiteAuthenticator, SiteAuthInterceptor, load_site_hashes
from cloud_inference.config import CloudSettings
from cloud_inference.dedupe import AnswerCache
from cloud_inference.inference import CloudInference
from cloud_inference.intake import INTAKE_STREAM, IntakeLog
from cloud_inference.labels import ModelFacts, facts_from_repository, facts_from_store
from cloud_inference.model_health import ModelHealth, ModelHealthConfig
from cloud_inference.servicer import CloudServicer
from cloud_inference.triton_client import TritonClient, TritonModel
from hybridmesh.cloud.v1 import cloud_service_pb2_grpc
from services.admission import observe_admission
from services.errors import InternalError, ServiceError, UnavailableError
from services.logging import get_logger
from services.records import RecordSink
from services.rpc_metrics import seconds_histogram
from services.server import ServiceHost, ServiceRegistration
from services.telemetry import Telemetry, observe_info

CLOUD_SERVICE_NAME = "hybridmesh.cloud.v1.CloudService"

_log = get_logger("cloud_inference")


def model_facts(settings: CloudSettings, models: list[TritonModel]) -> dict[str, ModelFacts]:
    if settings.labels_source == "triton_repository":
        if settings.triton_repository is None:
            raise ValueError("labels_source=triton_repository needs triton_repository set")
        return facts_from_repository(settings.triton_repository, [m.name for m in models])
    return facts_from_store(settings.model_store, [(m.name, m.served_version) for m in models])


class CloudNode:
    """The cloud service process: SERVING while Triton is live and its models are ready."""

    def __init__(self, settings: CloudSettings, telemetry: Telemetry, models: list[str]) -> None:
        self.settings = settings
        self._telemetry = telemetry
        self._model_names = list(models)
        self.model_health = ModelHealth(
            self._model_names,
            ModelHealthConfig(settings.model_internal_threshold, settings.model_probe_interval_s),
        )
        self.triton = TritonClient(
            settings.triton_url, settings.retry_after_ms, observer=self._observe_infer
        )
        self._inference: CloudInference | None = None
        self._models: dict[str, TritonModel] = {}
        self._triton_ready = False
        # Why it is not serving; None until the first check (so the first reason is logged).
        self._not_ready_reason: str | None = None
        self._published: dict[str, bool] = {}
        self._publish_lock = asyncio.Lock()
        self._publishing: set[asyncio.Task[None]] = set()
        # Kept across Triton restarts, like the admission limit.
        self._answers = AnswerCache(settings.answer_cache_size)
        # Written whatever the log level (services/records.py); off when no path is set.
        self._intake_sink = (
            RecordSink.open(
                settings.intake_log_path,
                INTAKE_STREAM,
                fsync=settings.intake_fsync,
                meter=telemetry.meter("hybridmesh.cloud_inference"),
            )
            if settings.intake_log_path is not None
            else None
        )
        self._intake = IntakeLog(self._intake_sink) if self._intake_sink else None
        # One admission limit for the process, kept across Triton restarts.
        self._admission = Admission(
            settings.max_in_flight, settings.max_queued_requests, settings.retry_after_ms
        )
        meter = telemetry.meter("hybridmesh.cloud_inference")
        self._latency = seconds_histogram(
            meter,
            "hybridmesh.cloud.inference.duration",
            "Triton call time per request, by model and version",
        )
        observe_info(
            meter,
            "hybridmesh.cloud.model.info",
            "The model versions Triton serves behind this service (value 1)",
            lambda: [
                {"model": model.name, "version": model.served_version}
                for model in list(self._models.values())
            ],
        )
        observe_admission(meter, "hybridmesh.cloud", lambda: self._admission)
        site_hashes = load_site_hashes(settings.site_token_sha256, settings.site_tokens_file)
        if not site_hashes:
            _log.warning("no site tokens configured: every call will be refused")
        servicer = CloudServicer(self.inference, lambda: self._triton_ready)
        interceptors = telemetry.server_interceptors(tracing=settings.tracing_enabled)
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
            # Metrics and tracing see every call, refusals included (an attack shows up
            # as UNAUTHENTICATED in the RPC metric); an unauthenticated call gets no
            # further than the authentication that follows them.
            interceptors=[*interceptors, SiteAuthInterceptor(SiteAuthenticator(site_hashes))],
        )
        self._watch: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._triton_ready

    def inference(self) -> CloudInference:
        if self._inference is None:
            raise UnavailableError(
                self._not_ready_reason
                or f"Triton at {self.settings.triton_url} has not been ready yet"
            )
        return self._inference

    async def start(self) -> int:
        port = await self.host.start()
        await self._publish_health()
        self._watch = asyncio.create_task(self._watch_triton())
        return port

    async def stop(self, grace: float | None = None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.host.stop(grace)
        await self.triton.close()
        if self._intake_sink is not None:
            self._intake_sink.close()

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self._triton_ready:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"Triton at {self.settings.triton_url} not ready")
            await asyncio.sleep(0.05)

    async def _watch_triton(self) -> None:
        """Readiness follows Triton: live, and every configured model ready."""
        while True:
            try:
                await self._check_triton()
                await self._probe_unhealthy_models()
            except Exception:
                # A bug here must not freeze health at its last value.
                _log.exception("triton readiness check failed")
                await self._publish(False, "triton readiness check failed (see the error above)")
            await asyncio.sleep(self.settings.health_poll_s)

    async def _check_triton(self) -> None:
        reason = await self.triton.not_ready_reason(
            self._model_names, self.settings.health_check_timeout_s
        )
        ready = not reason
        if ready and not self._triton_ready:
            # (Re)load the model metadata on every return: a restarted Triton may serve
            # other versions or tensors than the one before.
            try:
                models = [
                    await self.triton.model(name, self.settings.health_check_timeout_s)
                    for name in self._model_names
                ]
            except ServiceError as error:
                _log.warning("model metadata unavailable", error=str(error))
                ready = False
                reason = f"model metadata unavailable: {error}"
            else:
                facts = await asyncio.to_thread(model_facts, self.settings, models)
                self._models = {m.name: m for m in models}
                self._inference = CloudInference(
                    self.settings,
                    self.triton,
                    {m.name: m for m in models},
                    facts,
                    self._telemetry.tracer("hybridmesh.cloud_inference"),
                    admission=self._admission,
                    answers=self._answers,
                    intake=self._intake,
                    latency=self._latency,
                )
                _log.info(
                    "triton models",
                    models=[f"{m.name}:{m.served_version}" for m in models],
                    labelled=sorted(facts),
                )
        await self._publish(ready, reason)

    async def _publish(self, ready: bool, reason: str) -> None:
        """Readiness follows Triton; each change of it, or of the reason it is not
        serving, is logged once with the reason (not at every poll)."""
        if ready != self._triton_ready or reason != self._not_ready_reason:
            if ready:
                _log.info("serving: triton ready", triton=self.settings.triton_url)
            else:
                _log.warning("not serving", reason=reason, triton=self.settings.triton_url)
        self._triton_ready = ready
        self._not_ready_reason = reason
        await self._publish_health()

    def _observe_infer(self, model: str, error: ServiceError | None) -> None:
        """Every Triton inference's outcome (model_health.py decides what it means)."""
        if self.model_health.record(model, isinstance(error, InternalError)):
            _log.warning(
                "model unhealthy: NOT_SERVING until a probe succeeds",
                model=model,
                consecutive_internal=self.model_health.config.internal_threshold,
                error=str(error),
            )
            task = asyncio.get_running_loop().create_task(self._publish_health())
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

    async def _probe_unhealthy_models(self) -> None:
        if not self._triton_ready:
            return  # Triton's own readiness decides first; probes need its metadata
        for name in self.model_health.due_probes():
            model = self._models.get(name)
            if model is None:
                continue
            error = await self.triton.probe(model, self.settings.health_check_timeout_s)
            if self.model_health.probe_result(name, error is None):
                _log.info("model healthy again: probe answered", model=name)
                await self._publish_health()
            elif error is not None:
                _log.info("model probe failed", model=name, error=str(error))

    async def _publish_health(self) -> None:
        """Health entries: ``<service>/<model>`` per model (Triton ready and the model
        healthy), the service (all of them), and so the server's "" (the router's)."""
        async with self._publish_lock:
            wanted = {
                f"{CLOUD_SERVICE_NAME}/{name}": self._triton_ready
                and self.model_health.healthy(name)
                for name in self._model_names
            }
            wanted[CLOUD_SERVICE_NAME] = self._triton_ready and self.model_health.all_healthy
            for name, serving in wanted.items():
                if self._published.get(name) != serving:
                    self._published[name] = serving
                    await self.host.set_serving(name, serving)
