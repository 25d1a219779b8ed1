"""Over-the-air updates with real processes: edge nodes (python -m edge_node) polling a
real registry gRPC server, signed artifacts, the committed model and versions made from
it. The registry runs in the test's process so its metrics can be read in memory."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from bench.load import ServerProcess
from hybridmesh.common.v1 import model_pb2
from hybridmesh.edge.v1 import (
    edge_admin_pb2,
    edge_admin_pb2_grpc,
    edge_service_pb2,
    edge_service_pb2_grpc,
)
from hybridmesh.registry.v1 import registry_service_pb2 as registry_pb
from hybridmesh.registry.v1 import registry_service_pb2_grpc
from ota.artifacts import ArtifactRef
from registry.app import RegistryNode
from registry.config import RegistrySettings
from registry.signing import PublisherKey, generate_key, sign_promotion
from services.access_rules import OPERATOR, site_identity
from services.telemetry import create_telemetry
from services.tensors import encode_tensor
from tests.helpers.credentials import Credentials, make_credentials, token_channel
from tests.helpers.ota_site import COMMITTED_STORE, golden_set, make_version, worse_model_bytes
from tests.helpers.paths import EDGE_MODEL
from tests.helpers.waiting import eventually

pytestmark = pytest.mark.slow
GOLDEN = golden_set()


@dataclass
class Fleet:
    root: Path
    registry: RegistryNode
    metrics: InMemoryMetricReader
    key: PublisherKey
    channel: grpc.aio.Channel
    edges: dict[str, ServerProcess]
    credentials: Credentials

    def operator_channel(self, address: str) -> grpc.aio.Channel:
        return token_channel(address, self.credentials.token(OPERATOR))

    @property
    def stub(self) -> registry_service_pb2_grpc.RegistryServiceAsyncStub:
        return registry_service_pb2_grpc.RegistryServiceStub(self.channel)

    async def publish(self, version: int, model_bytes: bytes | None = None) -> Path:
        directory = make_version(self.root / "publisher-store", version, model_bytes)
        ref = ArtifactRef("model", EDGE_MODEL, version)
        self.registry.store.publish(directory, ref, self.key)
        sequence = self.registry.store.channel("model", EDGE_MODEL).sequence + 1
        signed = sign_promotion(self.key, "model", EDGE_MODEL, version, sequence, "promote")
        await self.stub.Promote(
            registry_pb.PromoteRequest(
                artifact=registry_pb.ArtifactRef(
                    kind=registry_pb.ARTIFACT_KIND_MODEL, name=EDGE_MODEL, version=version
                ),
                promotion=registry_pb.SignedPromotion(
                    statement=signed.statement, signature=signed.signature
                ),
            ),
            timeout=5,
        )
        return self.registry.store.root / "model" / EDGE_MODEL / str(version)

    async def start_edge(self, site: str) -> ServerProcess:
        store = self.root / site / "store"
        shutil.copytree(COMMITTED_STORE / EDGE_MODEL / "1", store / EDGE_MODEL / "1")
        GOLDEN.save(self.root / site / "golden.npz")
        edge = ServerProcess(
            ["-m", "edge_node"],
            env={
                "HYBRIDMESH_EDGE_PORT": "{port}",
                "HYBRIDMESH_EDGE_MODEL_STORE": str(store),
                "HYBRIDMESH_EDGE_SERVED_MODELS": json.dumps([EDGE_MODEL]),
                "HYBRIDMESH_EDGE_REGISTRY_TARGET": self.registry.host.address,
                "HYBRIDMESH_EDGE_SITE_ID": site,
                "HYBRIDMESH_EDGE_REGISTRY_TOKEN_FILE": str(
                    self.credentials.token_file(site_identity(site))
                ),
                "HYBRIDMESH_EDGE_ADMIN_TOKEN_SHA256": json.dumps(
                    self.credentials.hashes([OPERATOR])
                ),
                "HYBRIDMESH_EDGE_TRUSTED_KEYS": json.dumps(
                    [str(self.root / "operator" / "publisher.pub")]
                ),
                "HYBRIDMESH_EDGE_GOLDEN_SET": str(self.root / site / "golden.npz"),
                "HYBRIDMESH_EDGE_UPDATE_STAGING": str(self.root / site / "staging"),
                # Updates only when the test asks (CheckForUpdates): deterministic steps.
                "HYBRIDMESH_EDGE_UPDATE_INTERVAL_S": "3600",
                "HYBRIDMESH_EDGE_LOG_LEVEL": "warning",
            },
        )
        self.edges[site] = edge
        await edge.wait_serving()
        return edge


@pytest_asyncio.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    metrics = InMemoryMetricReader()
    telemetry = create_telemetry("registry", metric_readers=[metrics], export_otlp=False)
    credentials = make_credentials(tmp_path / "credentials", ("site-a", "site-b"))
    registry = RegistryNode(
        RegistrySettings(
            port=0,
            root=tmp_path / "registry",
            shutdown_grace_seconds=0,
            token_sha256=credentials.hashes(),
        ),
        telemetry,
    )
    await registry.start()
    key = generate_key(tmp_path / "operator")
    registry.store.publish(
        COMMITTED_STORE / EDGE_MODEL / "1", ArtifactRef("model", EDGE_MODEL, 1), key
    )
    registry.store.promote("model", EDGE_MODEL, 1, key)
    shutil.copytree(
        COMMITTED_STORE / EDGE_MODEL / "1", tmp_path / "publisher-store" / EDGE_MODEL / "1"
    )
    channel = token_channel(registry.host.address, credentials.token(OPERATOR))
    fleet = Fleet(tmp_path, registry, metrics, key, channel, {}, credentials)
    try:
        yield fleet
    finally:
        for edge in fleet.edges.values():
            edge.stop()
        await channel.close(None)
        await registry.stop(0)


def admin(channel: grpc.aio.Channel) -> edge_admin_pb2_grpc.EdgeAdminServiceAsyncStub:
    return edge_admin_pb2_grpc.EdgeAdminServiceStub(channel)


def infer_request() -> edge_service_pb2.InferRequest:
    return edge_service_pb2.InferRequest(
        model=model_pb2.ModelRef(name=EDGE_MODEL),
        inputs=[encode_tensor("image", GOLDEN.images[:1])],
    )


async def test_a_signed_update_under_load_switches_with_zero_failed_requests(fleet: Fleet) -> None:
    edge = await fleet.start_edge("site-a")
    versions: list[str] = []
    failures: list[str] = []
    stop = asyncio.Event()
    async with fleet.operator_channel(edge.address) as channel:
        stub = edge_service_pb2_grpc.EdgeServiceStub(channel)

        async def caller() -> None:
            while not stop.is_set():
                try:
                    reply = await stub.Infer(infer_request(), timeout=5)
                except grpc.aio.AioRpcError as error:
                    failures.append(error.code().name)
                    continue
                versions.append(reply.model.version)

        callers = [asyncio.create_task(caller()) for _ in range(8)]
        # Under load before the update: answers from version 1 are coming in.
        await eventually(lambda: len(versions) >= len(callers), 30)
        await fleet.publish(2)
        check = await admin(channel).CheckForUpdates(
            edge_admin_pb2.CheckForUpdatesRequest(), timeout=30
        )
        # Under load after the switch, for the 50 answers from version 2 asserted below.
        await eventually(lambda: versions.count("2") > 50, 30)
        stop.set()
        await asyncio.gather(*callers)
    assert failures == []
    (event,) = check.events
    assert (event.outcome, event.version, event.previous_version) == ("switched", 2, "1")
    assert set(event.timings_ms) >= {"download", "verify", "load", "canary", "switch"}
    switched_at = versions.index("2")
    assert switched_at > 0 and set(versions[:switched_at]) == {"1"}
    assert set(versions[switched_at:]) == {"2"}, "never back to the old version"
    assert len(versions) - switched_at > 50, "load went on after the switch"


async def test_tampered_and_worse_versions_are_refused_and_rollback_restores(fleet: Fleet) -> None:
    edge = await fleet.start_edge("site-a")
    async with fleet.operator_channel(edge.address) as channel:
        edge_admin = admin(channel)
        check = edge_admin_pb2.CheckForUpdatesRequest()
        await fleet.publish(2)
        (switched,) = (await edge_admin.CheckForUpdates(check, timeout=30)).events
        tampered = await fleet.publish(3)
        model = tampered / "model.onnx"
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0x01
        model.write_bytes(bytes(data))
        (refused,) = (await edge_admin.CheckForUpdates(check, timeout=30)).events
        await fleet.publish(4, worse_model_bytes())
        (canaried,) = (await edge_admin.CheckForUpdates(check, timeout=30)).events
        rollback = await edge_admin.Rollback(
            edge_admin_pb2.RollbackRequest(model=EDGE_MODEL), timeout=30
        )
        after = await edge_admin.CheckForUpdates(check, timeout=30)
        status = await edge_admin.GetUpdateStatus(
            edge_admin_pb2.GetUpdateStatusRequest(), timeout=5
        )
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await edge_admin.Rollback(edge_admin_pb2.RollbackRequest(model="nope"), timeout=5)
        served = await edge_service_pb2_grpc.EdgeServiceStub(channel).Infer(
            infer_request(), timeout=5
        )
    assert switched.outcome == "switched"
    assert (refused.outcome, refused.version) == ("refused", 3)
    assert "sha256 differs" in refused.reason
    assert (canaried.outcome, canaried.version) == ("refused", 4)
    assert canaried.reason.startswith("canary: accuracy regressed")
    assert (rollback.event.outcome, rollback.event.version) == ("rolled-back", 1)
    assert rollback.event.previous_version == "2"
    assert list(after.events) == [], "refused and rolled-back versions are not retried"
    (model_status,) = status.models
    assert model_status.serving_version == "1" and served.model.version == "1"
    assert list(model_status.refused_versions) == [2, 3, 4]
    assert [e.outcome for e in status.recent_events] == [
        "switched",
        "refused",
        "refused",
        "rolled-back",
    ]
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model" in (unknown.value.details() or "")


async def test_two_sites_on_different_versions_are_visible_in_the_registry(fleet: Fleet) -> None:
    site_a = await fleet.start_edge("site-a")
    await fleet.start_edge("site-b")
    await fleet.publish(2)
    async with fleet.operator_channel(site_a.address) as channel:
        await admin(channel).CheckForUpdates(edge_admin_pb2.CheckForUpdatesRequest(), timeout=30)

    async def fleet_view() -> dict[str, int]:
        reply = await fleet.stub.ListSites(registry_pb.ListSitesRequest(), timeout=5)
        return {s.site: s.served[0].artifact.version for s in reply.sites}

    # The site reports are asynchronous to the update.
    async def reported() -> bool:
        return await fleet_view() == {"site-a": 2, "site-b": 1}

    await eventually(reported, 5)
    assert await fleet_view() == {"site-a": 2, "site-b": 1}
    data = fleet.metrics.get_metrics_data()
    assert data is not None
    points = {
        (point.attributes["name"], point.attributes["version"]): point.value
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "hybridmesh.registry.sites_serving"
        for point in metric.data.data_points
        if isinstance(point, NumberDataPoint) and point.attributes is not None
    }
    assert points == {(EDGE_MODEL, "1"): 1, (EDGE_MODEL, "2"): 1}
