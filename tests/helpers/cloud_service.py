"""The cloud service under test: a real Triton repository with the
committed cloud model plus toy python-backend models that are slow, refuse to load or load
forever, the cloud service started in process, and process-group inspection."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import tritonclient.grpc.aio as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cloud_inference.app import CloudNode
from cloud_inference.auth import token_sha256
from cloud_inference.config import CloudSettings
from hybridmesh.cloud.v1 import cloud_service_pb2_grpc
from localmesh.triton import TritonServer
from services.telemetry import create_telemetry
from tests.helpers.paths import STORE
from tests.helpers.requests import CLOUD_MODEL
from workload.fashion_mnist import load_split
from workload.triton_repository import write_repository

# Toy models with the cloud model's contract (image UINT8 [n,1,28,28] -> logits FP32 [n,10]).
SLOW_MODEL = "slow"  # 1 s per execution, one request at a time, unbounded queue
SHORT_QUEUE_MODEL = "slow-short-queue"  # the same, but Triton queues at most one request
SLOW_SECONDS = 1.0
TOKEN = "site-a-secret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
IMAGES = load_split("test").images

# Runs in Triton's python backend stub. Importing triton_python_backend_utils first matters:
# the launcher's copy of it puts this venv's site-packages first on the stub's path, so the
# numpy imported next is the venv's 1.x, not the base Python's 2.x (whose arrays the stub
# turns into empty tensors).
TOY_MODEL_PY = """
import json
import os
import time

import triton_python_backend_utils as pb_utils  # noqa: I001 (first: it fixes sys.path)
import numpy as np


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        value = lambda key: parameters.get(key, {}).get("string_value", "")
        if value("initialize_error"):
            raise RuntimeError(value("initialize_error"))
        time.sleep(float(value("initialize_delay_s") or 0))
        self.delay_s = float(value("execute_delay_s") or 0)
        self.fail_while_exists = value("fail_while_exists")
        self.executions_log = value("executions_log")

    def execute(self, requests):
        if self.executions_log:
            with open(self.executions_log, "a") as log:
                print("executing", file=log)
        if self.fail_while_exists and os.path.exists(self.fail_while_exists):
            raise RuntimeError("failing on purpose: " + self.fail_while_exists)
        time.sleep(self.delay_s)
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
            logits = np.zeros((image.shape[0], 10), np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits)]))
        return responses
"""


def write_toy_model(
    repository: Path,
    name: str,
    *,
    execute_delay_s: float = 0.0,
    initialize_delay_s: float = 0.0,
    initialize_error: str = "",
    fail_while_exists: Path | None = None,
    max_batch_size: int = 1,
    scheduling: str = "dynamic_batching { max_queue_delay_microseconds: 0 }",
) -> None:
    version = repository / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.py").write_text(TOY_MODEL_PY)
    parameters = {
        # One line per execution, written as it starts (outside the repository: Triton
        # must not see a change there).
        "executions_log": repository.parent / f"{name}.executions",
        "execute_delay_s": execute_delay_s,
        "initialize_delay_s": initialize_delay_s,
        "initialize_error": initialize_error,
        "fail_while_exists": fail_while_exists or "",
    }
    (repository / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
        'input [ { name: "image" data_type: TYPE_UINT8 dims: [1, 28, 28] } ]\n'
        'output [ { name: "logits" data_type: TYPE_FP32 dims: [10] } ]\n'
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        f"{scheduling}\n"
        + "".join(
            f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
            for key, value in parameters.items()
        )
    )


def write_cloud_repository(repository: Path) -> None:
    """The committed cloud model (python backend running onnxruntime) plus the slow toys."""
    write_repository(STORE, repository, "local", [CLOUD_MODEL])
    write_toy_model(repository, SLOW_MODEL, execute_delay_s=SLOW_SECONDS)
    write_toy_model(
        repository,
        SHORT_QUEUE_MODEL,
        execute_delay_s=SLOW_SECONDS,
        scheduling="dynamic_batching { max_queue_delay_microseconds: 0 "
        "default_queue_policy { max_queue_size: 1 } }",
    )


SERVED_MODELS = [CLOUD_MODEL, SLOW_MODEL, SHORT_QUEUE_MODEL]


def toy_executions(repository: Path, name: str) -> int:
    """How many executions of toy model ``name`` have started in Triton (its own log)."""
    log = repository.parent / f"{name}.executions"
    return len(log.read_text().splitlines()) if log.exists() else 0


def triton_checks(node: CloudNode, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Counts, from now on, the readiness checks of Triton ``node``'s health watch has made."""
    made = 0
    check = node.triton.not_ready_reason

    async def counted(models: list[str], timeout_s: float = 1.0) -> str:
        nonlocal made
        try:
            return await check(models, timeout_s)
        finally:
            made += 1

    monkeypatch.setattr(node.triton, "not_ready_reason", counted)
    return lambda: made


def cloud_settings(triton_url: str, **overrides: object) -> CloudSettings:
    values: dict[str, object] = {
        "port": 0,
        "triton_url": triton_url,
        "model_store": STORE,
        "site_token_sha256": {"site-a": token_sha256(TOKEN)},
        "health_poll_s": 0.1,
        "health_check_timeout_s": 0.5,
        "shutdown_grace_seconds": 0.0,
    }
    values.update(overrides)
    return CloudSettings.model_validate(values)


@dataclass
class RunningCloud:
    node: CloudNode
    channel: grpc.aio.Channel
    stub: cloud_service_pb2_grpc.CloudServiceAsyncStub
    spans: InMemorySpanExporter

    async def health(self) -> int:
        reply = await health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2
        )
        return int(reply.status)

    async def health_is(self, status: int) -> bool:
        try:
            return await self.health() == status
        except grpc.aio.AioRpcError:
            return False

    async def stop(self) -> None:
        await self.channel.close(None)
        await self.node.stop(0)


async def start_cloud(
    settings: CloudSettings, models: list[str] | None = None, *, wait_ready: bool = True
) -> RunningCloud:
    spans = InMemorySpanExporter()
    telemetry = create_telemetry(
        "cloud-test", span_processors=[SimpleSpanProcessor(spans)], export_otlp=False
    )
    node = CloudNode(settings, telemetry, models or SERVED_MODELS)
    await node.start()
    if wait_ready:
        await node.wait_ready(timeout_s=20)
    channel = grpc.aio.insecure_channel(node.host.address)
    return RunningCloud(node, channel, cloud_service_pb2_grpc.CloudServiceStub(channel), spans)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cloud_triton(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TritonServer]:
    """One real Triton per test module (seconds to start) serving write_cloud_repository.
    Tests must not kill or stop it; fault tests start their own."""
    base = tmp_path_factory.mktemp("cloud-triton")
    write_cloud_repository(base / "repository")
    async with TritonServer(base / "repository", base / "run") as server:
        yield server


async def triton_requests(triton: TritonServer, model: str) -> int:
    """Requests Triton has received for ``model`` (its own statistics)."""
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    try:
        stats = await client.get_inference_statistics(model, as_json=True, client_timeout=5)
    finally:
        await client.close()
    inference = stats["model_stats"][0].get("inference_stats", {})
    return sum(int(inference.get(kind, {}).get("count", 0)) for kind in ("success", "fail"))


@pytest_asyncio.fixture(loop_scope="module")
async def cloud(cloud_triton: TritonServer) -> AsyncIterator[RunningCloud]:
    """The cloud service (all served models) in front of the module's ``cloud_triton``."""
    running = await start_cloud(cloud_settings(cloud_triton.grpc_url))
    yield running
    await running.stop()
