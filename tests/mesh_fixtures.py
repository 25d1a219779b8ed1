"""Router + edge node + cloud service + real Triton, all real servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest_asyncio
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cloud_inference.app import CloudNode
from cloud_inference.auth import token_sha256
from cloud_inference.config import CloudSettings
from cloud_inference.triton_launcher import TritonServer
from edge_node.app import EdgeNode
from hybridmesh.common.v1 import routing_pb2
from hybridmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
from router_service.app import RouterNode, pairs_from_catalog
from router_service.config import RouterSettings
from router_service.escalation import EscalationClassifier, latest_policy
from router_service.features import router_features
from services.classification import softmax
from services.telemetry import create_telemetry
from services.tensors import encode_tensor
from tests.edge_fixtures import edge_settings
from tests.triton_fixtures import STORE, TRITON_MODELS

REPO = Path(__file__).resolve().parent.parent
POLICY_ROOT = REPO / "models" / "policies" / "fashion-mnist"
TOKEN = "site-token"


@dataclass
class Mesh:
    router: RouterNode
    edge: EdgeNode
    cloud: CloudNode
    cloud_spans: InMemorySpanExporter
    channel: grpc.aio.Channel
    stub: router_service_pb2_grpc.RouterServiceAsyncStub


def router_settings(edge: str, cloud: str, **overrides: object) -> RouterSettings:
    values: dict[str, object] = {
        "port": 0,
        "edge_target": edge,
        "cloud_target": cloud,
        "cloud_site_token": TOKEN,
        "policy_root": POLICY_ROOT,
        "catalog": REPO / "models" / "catalog.toml",
        "shutdown_grace_seconds": 0.0,
    }
    values.update(overrides)
    return RouterSettings.model_validate(values)


async def start_mesh(triton_url: str, **router_overrides: object) -> Mesh:
    edge = EdgeNode(edge_settings(), create_telemetry("edge", export_otlp=False))
    await edge.start()
    cloud_spans = InMemorySpanExporter()
    cloud = CloudNode(
        CloudSettings(
            port=0,
            triton_url=triton_url,
            model_store=STORE,
            site_token_sha256={"site": token_sha256(TOKEN)},
            health_poll_s=0.1,
            shutdown_grace_seconds=0.0,
        ),
        create_telemetry(
            "cloud", span_processors=[SimpleSpanProcessor(cloud_spans)], export_otlp=False
        ),
        TRITON_MODELS,
    )
    await cloud.start()
    await cloud.wait_ready()
    settings = router_settings(edge.host.address, cloud.host.address, **router_overrides)
    router = RouterNode(
        settings,
        create_telemetry("router", export_otlp=False),
        pairs_from_catalog(settings.catalog),
    )
    await router.start()
    channel = grpc.aio.insecure_channel(router.host.address)
    return Mesh(
        router,
        edge,
        cloud,
        cloud_spans,
        channel,
        router_service_pb2_grpc.RouterServiceStub(channel),
    )


async def stop_mesh(mesh: Mesh) -> None:
    await mesh.channel.close(None)
    await mesh.router.stop(0)
    await mesh.cloud.stop(0)
    await mesh.edge.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh_triton(tmp_path_factory: object) -> AsyncIterator[TritonServer]:
    import pytest

    assert isinstance(tmp_path_factory, pytest.TempPathFactory)
    from workload.triton_repository import write_repository

    base = tmp_path_factory.mktemp("mesh-triton")
    write_repository(STORE, base / "repository", "local", TRITON_MODELS)
    async with TritonServer(base / "repository", base / "run") as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module")
async def mesh(mesh_triton: TritonServer) -> AsyncIterator[Mesh]:
    running = await start_mesh(mesh_triton.grpc_url)
    yield running
    await stop_mesh(running)


def infer_request(
    image: npt.NDArray[np.uint8],
    privacy: int = routing_pb2.PRIVACY_CLASS_PUBLIC,
    preference: int = routing_pb2.ROUTE_PREFERENCE_AUTO,
) -> router_service_pb2.InferRequest:
    return router_service_pb2.InferRequest(
        model="fashion-mnist",
        inputs=[encode_tensor("image", image)],
        hints=routing_pb2.RoutingHints(privacy_class=privacy, preference=preference),  # type: ignore[arg-type]
        top_k=3,
    )


def easy_and_hard(images: npt.NDArray[np.uint8], count: int) -> tuple[list[int], list[int]]:
    """Indices of the items the committed policy scores lowest and highest."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(STORE / "fashion-edge" / "1" / "model.onnx"))
    (logits,) = session.run(["logits"], {"image": images})
    classifier = EscalationClassifier(latest_policy(POLICY_ROOT))
    scores = classifier.score(router_features(softmax(np.asarray(logits)), images))
    order = np.argsort(scores)
    return order[:count].tolist(), order[-count:].tolist()


async def wait_until(condition: object, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)
