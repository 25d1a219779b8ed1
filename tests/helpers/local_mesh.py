"""Router + edge node + cloud service + real Triton, all real servers on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cloud_inference.app import CloudNode
from cloud_inference.auth import token_sha256
from cloud_inference.config import CloudSettings
from edge_node.app import EdgeNode
from hybridmesh.router.v1 import router_service_pb2_grpc
from localmesh.triton import TritonServer
from router_service.app import RouterNode, pairs_from_catalog
from services.telemetry import create_telemetry
from tests.helpers.edge_node import edge_settings
from tests.helpers.paths import STORE
from tests.helpers.router_node import TOKEN, router_settings
from tests.helpers.triton import TRITON_MODELS
from tests.helpers.waiting import eventually


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


async def start_cloud(
    triton_url: str, spans: InMemorySpanExporter, port: int = 0, **overrides: object
) -> CloudNode:
    """``overrides``: CloudSettings fields (e.g. its admission limits)."""
    values: dict[str, object] = {
        "port": port,
        "triton_url": triton_url,
        "model_store": STORE,
        "site_token_sha256": {"site": token_sha256(TOKEN)},
        "health_poll_s": 0.1,
        "shutdown_grace_seconds": 0.0,
        **overrides,
    }
    cloud = CloudNode(
        CloudSettings.model_validate(values),
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
    await eventually(lambda: running.router.tier_up["edge"] and running.router.tier_up["cloud"])
    yield running
    await stop_mesh(running)


async def restart_cloud(mesh: Mesh, triton_url: str, **overrides: object) -> None:
    """A new cloud service on the port the router already points at (an outage ends)."""
    port = int(mesh.cloud.host.address.rsplit(":", 1)[1])
    mesh.cloud = await start_cloud(triton_url, mesh.cloud_spans, port, **overrides)
