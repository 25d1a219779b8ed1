"""Router + edge node + cloud service + real Triton, all real servers on loopback."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cloud_inference.app import CloudNode
from cloud_inference.auth import token_sha256
from cloud_inference.config import CloudSettings
from edge_node.app import EdgeNode
from hybridmesh.common.v1 import routing_pb2
from hybridmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
from localmesh.triton import TritonServer
from router_service.app import RouterNode, pairs_from_catalog
from router_service.config import RouterSettings
from router_service.escalation import EscalationClassifier, latest_policy
from router_service.features import router_features
from services.classification import softmax
from services.config import ServiceSettings
from services.server import ServiceHost, ServiceRegistration
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
    router_spans: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)
    router_metrics: InMemoryMetricReader = field(default_factory=InMemoryMetricReader)

    def router_counter(self, name: str) -> int:
        """Sum over every attribute set of one of the router's counters."""
        data = self.router_metrics.get_metrics_data()
        total = 0
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        total += sum(
                            int(point.value)
                            for point in metric.data.data_points
                            if isinstance(point, NumberDataPoint)
                        )
        return total


def router_settings(edge: str, cloud: str, **overrides: object) -> RouterSettings:
    values: dict[str, object] = {
        "port": 0,
        "edge_target": edge,
        "cloud_target": cloud,
        "cloud_site_token": TOKEN,
        "policies_dir": POLICY_ROOT.parent,
        "catalog": REPO / "models" / "catalog.toml",
        "shutdown_grace_seconds": 0.0,
    }
    # Each router gets its own outbox and audit log (tests pass their own to share them).
    state = Path(tempfile.mkdtemp(prefix="hybridmesh-router-"))
    values["outbox_path"] = state / "outbox.sqlite"
    values["audit_log_path"] = state / "audit.log"
    values.update(overrides)
    return RouterSettings.model_validate(values)


async def start_cloud(triton_url: str, spans: InMemorySpanExporter, port: int = 0) -> CloudNode:
    cloud = CloudNode(
        CloudSettings(
            port=port,
            triton_url=triton_url,
            model_store=STORE,
            site_token_sha256={"site": token_sha256(TOKEN)},
            health_poll_s=0.1,
            shutdown_grace_seconds=0.0,
        ),
        create_telemetry("cloud", span_processors=[SimpleSpanProcessor(spans)], export_otlp=False),
        TRITON_MODELS,
    )
    await cloud.start()
    await cloud.wait_ready()
    return cloud


async def start_mesh(triton_url: str, **router_overrides: object) -> Mesh:
    """``edge_mode="in-process"``: the router runs the edge model itself (co-located)."""
    edge_mode = str(router_overrides.pop("edge_mode", "remote"))
    colocated = edge_mode == "in-process"
    edge: EdgeNode | None = None
    if not colocated:
        edge = EdgeNode(edge_settings(), create_telemetry("edge", export_otlp=False))
        await edge.start()
    cloud_spans = InMemorySpanExporter()
    cloud = await start_cloud(triton_url, cloud_spans)
    settings = router_settings(
        edge.host.address if edge is not None else "127.0.0.1:1",
        cloud.host.address,
        edge_mode=edge_mode,
        **router_overrides,
    )
    router_spans, router_metrics = InMemorySpanExporter(), InMemoryMetricReader()
    router = RouterNode(
        settings,
        create_telemetry(
            "router",
            span_processors=[SimpleSpanProcessor(router_spans)],
            metric_readers=[router_metrics],
            export_otlp=False,
        ),
        pairs_from_catalog(settings.catalog),
        edge_settings=edge_settings() if colocated else None,
    )
    await router.start()
    if router.colocated_edge is not None:
        edge = router.colocated_edge
    assert edge is not None
    channel = grpc.aio.insecure_channel(router.host.address)
    return Mesh(
        router,
        edge,
        cloud,
        cloud_spans,
        channel,
        router_service_pb2_grpc.RouterServiceStub(channel),
        router_spans,
        router_metrics,
    )


async def stop_mesh(mesh: Mesh) -> None:
    await mesh.channel.close(None)
    await mesh.router.stop(0)
    await mesh.cloud.stop(0)
    if mesh.edge is not mesh.router.colocated_edge:
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


@pytest_asyncio.fixture(loop_scope="module", params=["remote", "in-process"])
async def any_edge_mesh(
    mesh_triton: TritonServer, request: pytest.FixtureRequest
) -> AsyncIterator[Mesh]:
    """The mesh with a remote edge node, then with the edge co-located in the router."""
    running = await start_mesh(mesh_triton.grpc_url, edge_mode=str(request.param))
    await wait_until(lambda: running.router.tier_up["edge"] and running.router.tier_up["cloud"])
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


def hard_by_agreement(
    images: npt.NDArray[np.uint8], hard: list[int]
) -> tuple[list[int], list[int]]:
    """Split hard items into those where the cloud model corrects the edge model's top-1
    and those where both agree (both models run here in onnxruntime, as in Triton)."""
    import onnxruntime as ort

    top1 = {}
    for name in ("fashion-edge", "fashion-cloud"):
        session = ort.InferenceSession(str(STORE / name / "1" / "model.onnx"))
        (logits,) = session.run(["logits"], {"image": images[hard]})
        top1[name] = np.asarray(logits).argmax(axis=1)
    differ = top1["fashion-edge"] != top1["fashion-cloud"]
    return [i for i, d in zip(hard, differ, strict=True) if d], [
        i for i, d in zip(hard, differ, strict=True) if not d
    ]


async def restart_cloud(mesh: Mesh, triton_url: str) -> None:
    """A new cloud service on the port the router already points at (an outage ends)."""
    port = int(mesh.cloud.host.address.rsplit(":", 1)[1])
    mesh.cloud = await start_cloud(triton_url, mesh.cloud_spans, port)


CLOUD_SERVICE_NAME = "hybridmesh.cloud.v1.CloudService"


async def start_health_only_cloud() -> ServiceHost:
    """A real gRPC server that serves only grpc.health.v1 under the cloud service's name:
    for tests of the router's health watch, where no request reaches the cloud."""
    cloud = ServiceHost(
        ServiceSettings(port=0, shutdown_grace_seconds=0),
        [ServiceRegistration(CLOUD_SERVICE_NAME, lambda server: None)],
    )
    await cloud.start()
    return cloud
