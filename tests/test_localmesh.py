"""The local mesh as real processes: one trace per request across every part, mTLS at the
cloud ingress, the emulated WAN switchable at run time, a killed part survived and
restarted, and the CLI's up/status/down."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from hybridmesh.cloud.v1 import cloud_service_pb2, cloud_service_pb2_grpc
from hybridmesh.common.v1 import decision_pb2, routing_pb2
from hybridmesh.edge.v1 import edge_admin_pb2, edge_admin_pb2_grpc
from hybridmesh.registry.v1 import registry_service_pb2 as reg
from hybridmesh.registry.v1 import registry_service_pb2_grpc
from hybridmesh.router.v1 import router_service_pb2_grpc
from localmesh.launcher import LocalMesh, MeshOptions, MeshState, stop_process_group
from localmesh.otlp_receiver import OtlpReceiver
from ota.artifacts import ArtifactRef
from registry.signing import PRIVATE_KEY_FILE, load_private_key, sign_promotion
from registry.store import RegistryStore
from services.auth import read_token
from services.channels import ChannelFactory
from services.telemetry import Telemetry, create_telemetry
from tests.helpers.credentials import bearer
from tests.helpers.item_difficulty import easy_and_hard
from tests.helpers.ota_site import make_version
from tests.helpers.paths import SERVED_POLICY_VERSION
from tests.helpers.requests import router_request
from tests.helpers.waiting import eventually, eventually_sync
from workload.fashion_mnist import load_split

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
REPO = Path(__file__).resolve().parent.parent
IMAGES = load_split("test").images[:300]
EASY, HARD = easy_and_hard(IMAGES, 2)
TRACE_ATTEMPTS = 3


class RunningMesh:
    def __init__(self, mesh: LocalMesh, state: MeshState, receiver: OtlpReceiver) -> None:
        self.mesh = mesh
        self.state = state
        self.receiver = receiver


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningMesh]:
    receiver = OtlpReceiver()
    await receiver.start()
    mesh = LocalMesh(
        MeshOptions(
            state_dir=tmp_path_factory.mktemp("mesh"),
            repository_root=REPO,
            random_ports=True,
            wan_delay_ms=40,
            otlp_grpc_endpoint=receiver.grpc_endpoint,
            otlp_http_traces_url=receiver.http_traces_url,
        )
    )
    state = await mesh.up()
    yield RunningMesh(mesh, state, receiver)
    await mesh.down()
    await receiver.stop()


def client_telemetry(receiver: OtlpReceiver) -> Telemetry:
    exporter = OTLPSpanExporter(endpoint=receiver.grpc_endpoint, insecure=True)
    # Batch: the export runs in the processor's thread, so the receiver on this event
    # loop can answer it.
    return create_telemetry(
        "client", span_processors=[BatchSpanProcessor(exporter)], export_otlp=False
    )


@MODULE_LOOP
async def test_one_trace_per_request_across_every_part(running: RunningMesh) -> None:
    telemetry = client_telemetry(running.receiver)
    channel = ChannelFactory(telemetry.client_interceptors()).create(
        running.state.endpoints["router"]
    )
    replies = []
    try:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        # Triton joins ~97 % of incoming traces (docs/cloud.md); a few requests make a
        # random miss by Triton not fail the test, while every one is checked below.
        for _ in range(TRACE_ATTEMPTS):
            request = router_request(IMAGES[HARD[0] : HARD[0] + 1])
            replies.append(await stub.Infer(request, timeout=5))
    finally:
        await channel.close(None)
        await asyncio.to_thread(telemetry.shutdown)
    assert all(r.decision.served_by == routing_pb2.TIER_CLOUD for r in replies), replies
    trace_ids = [reply.decision.trace_id for reply in replies]
    ours = {"client", "router", "edge-node", "envoy-cloud-ingress", "cloud-inference"}
    expected = ours | {"triton"}

    def services(trace_id: str) -> set[str]:
        return {s.service for s in running.receiver.trace(trace_id)}

    await eventually(
        lambda: (
            any(services(t) == expected for t in trace_ids)
            and all(services(t) >= ours for t in trace_ids)
        ),
        15,
        lambda: [services(t) for t in trace_ids],
    )
    trace_id = next(t for t in trace_ids if services(t) == expected)
    spans = running.receiver.trace(trace_id)
    ids = {span.span_id for span in spans}
    roots = [span for span in spans if not span.parent_span_id]
    assert len(roots) == 1 and roots[0].service == "client"
    assert all(span.parent_span_id in ids for span in spans if span.parent_span_id)
    by_name = {(span.service, span.name): span for span in spans}
    decide = by_name[("router", "router.decide")]
    assert decide.attributes["hybridmesh.served_by"] == "TIER_CLOUD"
    assert decide.attributes["hybridmesh.data_left_site"] is True
    assert decide.attributes["hybridmesh.policy_version"] == SERVED_POLICY_VERSION
    # The cloud hop runs through Envoy: Envoy's span is the cloud service's parent.
    envoy = next(s for s in spans if s.service == "envoy-cloud-ingress")
    cloud_server = by_name[("cloud-inference", "/hybridmesh.cloud.v1.CloudService/Infer")]
    assert cloud_server.parent_span_id == envoy.span_id
    triton_request = by_name[("triton", "InferRequest")]
    assert (
        triton_request.parent_span_id == by_name[("cloud-inference", "cloud.triton_infer")].span_id
    )


@MODULE_LOOP
async def test_the_cloud_ingress_refuses_callers_without_a_client_certificate(
    running: RunningMesh,
) -> None:
    ca = (Path(running.state.state_dir) / "certs" / "ca.crt").read_bytes()
    request = cloud_service_pb2.InferRequest()
    async with grpc.aio.secure_channel(
        running.state.endpoints["envoy"], grpc.ssl_channel_credentials(ca)
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await cloud_service_pb2_grpc.CloudServiceStub(channel).Infer(request, timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails


@MODULE_LOOP
async def test_wan_delay_is_switchable_at_run_time(running: RunningMesh) -> None:
    async with grpc.aio.insecure_channel(running.state.endpoints["router"]) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        hard = router_request(IMAGES[HARD[1] : HARD[1] + 1])
        before = await stub.Infer(hard, timeout=5)
        await asyncio.to_thread(running.mesh.wan.set_delay, 400)
        try:
            slowed = await stub.Infer(hard, timeout=5)
        finally:
            await asyncio.to_thread(running.mesh.wan.set_delay, 40)
    assert before.decision.timings.cloud.ToMilliseconds() >= 40
    assert slowed.decision.timings.cloud.ToMilliseconds() >= 400


@MODULE_LOOP
async def test_a_router_with_the_edge_in_its_process_serves_beside_the_remote_one(
    running: RunningMesh,
) -> None:
    """The co-located edge mode on the same mesh (what `hybridmesh demo` runs by default):
    the extra router answers edge-kept images from the edge model in its own process
    (its edge port is its own, not the edge node's) and escalates hard ones to the same
    cloud; the remote router beside it is untouched."""
    mesh = running.mesh
    address = await mesh.add_router("router_colocated", "in-process")
    state = MeshState.read(Path(running.state.state_dir))
    assert state.endpoints["router_colocated"] == address
    colocated_pid = state.pids["router_colocated"]
    assert colocated_pid not in (state.pids["router"], state.pids["edge"])
    easy = router_request(IMAGES[EASY[0] : EASY[0] + 1])
    hard = router_request(IMAGES[HARD[0] : HARD[0] + 1])
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        kept = await stub.Infer(easy, timeout=5)
        escalated = await stub.Infer(hard, timeout=5)
    assert kept.decision.served_by == routing_pb2.TIER_EDGE, kept.decision.explanation
    assert kept.decision.edge_model.name == "fashion-edge"
    assert escalated.decision.served_by == routing_pb2.TIER_CLOUD, escalated.decision.explanation
    # The edge node process was not asked: its own router's answers are the same as before.
    async with grpc.aio.insecure_channel(running.state.endpoints["router"]) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        remote = await stub.Infer(easy, timeout=5)
    assert remote.decision.served_by == routing_pb2.TIER_EDGE
    assert remote.decision.escalation_score == pytest.approx(kept.decision.escalation_score)
    # Stopped like any part (down stops added routers first); here, by itself.
    process = mesh.processes.pop("router_colocated")
    await stop_process_group(process.pid, 5.0, process)
    assert not _exists(f"/proc/{colocated_pid}")


@MODULE_LOOP
async def test_a_killed_edge_node_is_survived_and_restarted(running: RunningMesh) -> None:
    mesh = running.mesh
    old_pid = mesh.processes["edge"].pid
    easy = router_request(IMAGES[EASY[0] : EASY[0] + 1])
    async with grpc.aio.insecure_channel(running.state.endpoints["router"]) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        assert (await stub.Infer(easy, timeout=5)).decision.served_by == routing_pb2.TIER_EDGE
        await mesh.kill("edge")
        assert not _exists(f"/proc/{old_pid}"), "killed and reaped"
        during = await stub.Infer(easy, timeout=5)
        await mesh.restart("edge")
        assert MeshState.read(Path(running.state.state_dir)).pids["edge"] != old_pid
        # The router's channel reconnects with backoff; the edge answers again soon.
        explanations: list[str] = []

        async def edge_answers() -> bool:
            after = await stub.Infer(easy, timeout=5)
            explanations.append(after.decision.explanation)
            return after.decision.served_by == routing_pb2.TIER_EDGE

        await eventually(edge_answers, 15, lambda: explanations[-1:])
    assert during.decision.served_by == routing_pb2.TIER_CLOUD
    assert during.decision.reason == decision_pb2.DECISION_REASON_EDGE_FAILED_CLOUD_FALLBACK


@MODULE_LOOP
async def test_the_site_takes_a_signed_edge_model_update_over_the_air(
    running: RunningMesh, tmp_path: Path
) -> None:
    state_dir = Path(running.state.state_dir)
    store = RegistryStore(state_dir / "registry")
    version = max(store.versions("model", "fashion-edge")) + 1
    source = make_version(tmp_path / "publisher", version)
    key = load_private_key(state_dir / "operator" / PRIVATE_KEY_FILE)
    await asyncio.to_thread(
        store.publish, source, ArtifactRef("model", "fashion-edge", version), key
    )
    store.promote("model", "fashion-edge", version, key)
    easy = router_request(IMAGES[EASY[0] : EASY[0] + 1])
    async with (
        grpc.aio.insecure_channel(running.state.endpoints["edge"]) as edge,
        grpc.aio.insecure_channel(running.state.endpoints["router"]) as router,
    ):
        check = await edge_admin_pb2_grpc.EdgeAdminServiceStub(edge).CheckForUpdates(
            edge_admin_pb2.CheckForUpdatesRequest(), timeout=30, metadata=_as(running, "operator")
        )
        reply = await router_service_pb2_grpc.RouterServiceStub(router).Infer(easy, timeout=5)
    (event,) = check.events
    assert (event.outcome, event.version) == ("switched", version), event.reason
    assert reply.decision.edge_model.version == str(version)
    assert (state_dir / "site" / "models" / "fashion-edge" / str(version)).is_dir()


def _as(running: RunningMesh, who: str) -> tuple[tuple[str, str], ...]:
    """The local mesh's operator or site credential (created under its state dir)."""
    return bearer(read_token(Path(running.state.credentials[f"{who}_token"])))


async def _code(call: object) -> grpc.StatusCode:
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@MODULE_LOOP
async def test_the_control_plane_refuses_strangers_and_sites(running: RunningMesh) -> None:
    """The mesh's own processes: without a credential nothing moves and nothing is
    downloaded; with the site's, no promotion, rollback (fleet or edge), fleet listing or
    report for another site. The operator's credential (the CLI's) works."""
    state_dir = Path(running.state.state_dir)
    key = load_private_key(state_dir / "operator" / PRIVATE_KEY_FILE)
    store = RegistryStore(state_dir / "registry")
    model = reg.ArtifactRef(kind=reg.ARTIFACT_KIND_MODEL, name="fashion-edge", version=1)
    sequence = store.channel("model", "fashion-edge").sequence + 1
    # Even a statement the operator signed cannot be pushed by anyone else.
    signed = sign_promotion(key, "model", "fashion-edge", 1, sequence, "promote")
    statement = reg.SignedPromotion(statement=signed.statement, signature=signed.signature)
    before = store.channel("model", "fashion-edge")
    results: dict[str, dict[str, grpc.StatusCode]] = {}
    async with (
        grpc.aio.insecure_channel(running.state.endpoints["registry"]) as registry_channel,
        grpc.aio.insecure_channel(running.state.endpoints["edge"]) as edge_channel,
    ):
        registry = registry_service_pb2_grpc.RegistryServiceStub(registry_channel)
        admin = edge_admin_pb2_grpc.EdgeAdminServiceStub(edge_channel)
        for who, metadata in (("nobody", ()), ("site", _as(running, "site"))):
            other = reg.ReportSiteStatusRequest(status=reg.SiteStatus(site="another-site"))
            results[who] = {
                "Promote": await _code(registry.Promote(
                    reg.PromoteRequest(artifact=model, promotion=statement),
                    timeout=5, metadata=metadata)),
                "Rollback": await _code(registry.Rollback(
                    reg.RollbackRequest(artifact=model), timeout=5, metadata=metadata)),
                "ListSites": await _code(registry.ListSites(
                    reg.ListSitesRequest(), timeout=5, metadata=metadata)),
                "ReportSiteStatus(another site)": await _code(registry.ReportSiteStatus(
                    other, timeout=5, metadata=metadata)),
                "EdgeAdmin.Rollback": await _code(admin.Rollback(
                    edge_admin_pb2.RollbackRequest(model="fashion-edge"),
                    timeout=5, metadata=metadata)),
                "EdgeAdmin.CheckForUpdates": await _code(admin.CheckForUpdates(
                    edge_admin_pb2.CheckForUpdatesRequest(), timeout=5, metadata=metadata)),
            }  # fmt: skip
        downloads = [
            await _code(registry.GetManifest(reg.GetManifestRequest(artifact=model), timeout=5)),
            await _code(
                registry.FetchFile(
                    reg.FetchFileRequest(artifact=model, path="model.onnx"), timeout=5
                )
            ),
        ]
        status = await admin.GetUpdateStatus(
            edge_admin_pb2.GetUpdateStatusRequest(), timeout=5, metadata=_as(running, "operator")
        )
    assert set(results["nobody"].values()) == {grpc.StatusCode.UNAUTHENTICATED}, results
    assert set(results["site"].values()) == {grpc.StatusCode.PERMISSION_DENIED}, results
    assert downloads == [grpc.StatusCode.UNAUTHENTICATED] * 2
    assert store.channel("model", "fashion-edge") == before, "nothing was promoted"
    assert [list(m.refused_versions) for m in status.models] == [[]], "nothing was refused"
    # The operator's credentials come from the state dir: $HYBRIDMESH_STATE_DIR, or
    # --state-dir given after the subcommand.
    sites_command = ["registry", "sites", "--registry", running.state.endpoints["registry"]]
    for environment, extra in (
        ({**os.environ, "HYBRIDMESH_STATE_DIR": str(state_dir)}, []),
        (dict(os.environ), ["--state-dir", str(state_dir)]),
    ):
        sites = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "localmesh.cli", *sites_command, *extra],
            cwd=REPO, env=environment, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert sites.returncode == 0, sites.stderr
        assert "site-local" in sites.stdout and "another-site" not in sites.stdout


def _exists(path: str) -> bool:
    return Path(path).exists()


def test_cli_up_detached_status_and_down(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}

    def hybridmesh(*arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "localmesh.cli", "--state-dir", str(tmp_path), *arguments],
            cwd=REPO,
            env=environment,
            check=check,
            timeout=120,
            capture_output=True,
            text=True,
        )

    # The co-located edge here (up's default is remote, which the other mesh tests run).
    hybridmesh("up", "--detach", "--random-ports", "--edge-mode", "in-process")
    state = json.loads((tmp_path / "state.json").read_text())
    assert set(state["endpoints"]) >= {"router", "edge", "cloud", "envoy", "triton", "registry"}
    pids = [*state["pids"].values(), state["supervisor_pid"]]
    try:
        # The background supervisor restarts a killed Triton; state.json and status follow.
        old_triton = state["pids"]["triton"]
        os.killpg(old_triton, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            status = hybridmesh("status", check=False)
            new_triton = json.loads((tmp_path / "state.json").read_text())["pids"]["triton"]
            if status.returncode == 0 and new_triton != old_triton:
                break
            assert time.monotonic() < deadline, f"Triton not back: {status.stdout}"
        pids.append(new_triton)
        assert f"pid {new_triton}" in status.stdout and "supervisor" in status.stdout
        assert status.stdout.count("SERVING") == 4 and "NOT SERVING" not in status.stdout
        assert "outbox   0 queued" in status.stdout, status.stdout
        # The co-located edge: no edge process; status says where the model runs.
        assert "edge" not in state["pids"] and "in the router's process" in status.stdout
    finally:
        hybridmesh("down")
    # Every process has exited and been reaped (a zombie still has its /proc entry).
    eventually_sync(
        lambda: all(not Path(f"/proc/{pid}").exists() for pid in pids), 5, "no orphan left"
    )
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids), "no orphan left"
    assert not (tmp_path / "state.json").exists()
