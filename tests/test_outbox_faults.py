"""Offline autonomy and privacy under faults, with every part a real process (LocalMesh:
Triton, cloud service, Envoy with mTLS and the emulated WAN, edge node, router).

- a cloud outage under load: no request fails, every would-be escalation is queued, all
  are reconciled after recovery and the disagreements are published as corrections;
- kill -9 of the router or the edge node with items in the outbox loses none, and each
  is reconciled exactly once (counted on the cloud side);
- SENSITIVE data under every fault combination never reaches Envoy or the cloud
  service (asserted from Envoy's access log and the cloud's intake log).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from hybridmesh.common.v1 import decision_pb2, routing_pb2
from hybridmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
from localmesh.launcher import LocalMesh, MeshOptions, MeshState
from router_service.outbox import read_stats
from tests.helpers.item_difficulty import easy_and_hard, hard_by_agreement
from tests.helpers.requests import router_request
from tests.helpers.waiting import eventually
from workload.fashion_mnist import load_split

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
REPO = Path(__file__).resolve().parent.parent
IMAGES = load_split("test").images[:300]
EASY, HARD = easy_and_hard(IMAGES, 12)
CORRECTED, CONFIRMED = hard_by_agreement(IMAGES, HARD)
OUTAGE_S = 3.0
CLOUD_UNREACHABLE = (
    decision_pb2.DECISION_REASON_CLOUD_FAILED_EDGE_FALLBACK,
    decision_pb2.DECISION_REASON_CLOUD_BREAKER_OPEN,
)
PUBLIC, SENSITIVE = routing_pb2.PRIVACY_CLASS_PUBLIC, routing_pb2.PRIVACY_CLASS_SENSITIVE


class RunningMesh:
    def __init__(self, mesh: LocalMesh, state: MeshState) -> None:
        self.mesh = mesh
        self.state = state
        self.channel = grpc.aio.insecure_channel(state.endpoints["router"])
        self.stub = router_service_pb2_grpc.RouterServiceStub(self.channel)

    @property
    def outbox(self) -> Path:
        return Path(self.state.outbox)

    def log(self, name: str) -> list[dict[str, Any]]:
        path = Path(self.state.audit_logs[name])
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def queued_ids(self) -> set[str]:
        with sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True) as db:
            return {row[0] for row in db.execute("SELECT request_id FROM outbox")}

    def reconciled(self) -> list[tuple[str, int, int, int]]:
        with sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True) as db:
            return list(
                db.execute("SELECT request_id, item_index, edge_class, cloud_class FROM reconciled")
            )

    def replays_received(self) -> Counter[str]:
        """Reconciliation requests the cloud service received, by request id."""
        return Counter(
            line["request_id"] for line in self.log("cloud_intake") if line["reconciliation"]
        )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningMesh]:
    mesh = LocalMesh(
        MeshOptions(
            state_dir=tmp_path_factory.mktemp("mesh"),
            repository_root=REPO,
            random_ports=True,
            wan_delay_ms=40,
            router_environment={
                # Recovery in seconds, not minutes: short backoff, quick idle polls.
                "HYBRIDMESH_ROUTER_DRAIN_BACKOFF_BASE_S": "0.2",
                "HYBRIDMESH_ROUTER_DRAIN_BACKOFF_MAX_S": "1.0",
                "HYBRIDMESH_ROUTER_DRAIN_IDLE_S": "0.1",
                "HYBRIDMESH_ROUTER_DRAIN_RATE_PER_S": "100",
                # Hedge (cloud beside the edge) when a call has under 300 ms left.
                "HYBRIDMESH_ROUTER_HEDGE_BELOW_BUDGET_S": "0.3",
            },
        )
    )
    state = await mesh.up()
    running = RunningMesh(mesh, state)
    yield running
    await running.channel.close(None)
    await mesh.down()


def request(index: int, request_id: str, privacy: int = PUBLIC) -> router_service_pb2.InferRequest:
    message = router_request(IMAGES[index : index + 1], privacy=privacy)
    message.request_id = request_id
    return message


async def edge_serves_again(running: RunningMesh, timeout_s: float = 30) -> None:
    """After an edge restart the router's edge breaker stays open for a while; wait until
    an easy item is answered by the edge again."""

    async def edge_answers() -> bool:
        try:
            reply = await running.stub.Infer(request(EASY[0], ""), timeout=5)
        except grpc.aio.AioRpcError:
            return False
        return reply.decision.served_by == routing_pb2.TIER_EDGE

    await eventually(edge_answers, timeout_s, "the edge does not serve again")


async def status_output(state: MeshState) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "localmesh.cli",
        "--state-dir",
        state.state_dir,
        "status",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    return out.decode()


Replies = dict[str, tuple[int, router_service_pb2.InferResponse]]


async def load_through_an_outage(
    running: RunningMesh,
) -> tuple[Replies, list[tuple[str, grpc.StatusCode]], str]:
    """Four clients send a mix of easy and hard items while the cloud service is killed
    for OUTAGE_S and restarted. Returns the replies, the failures, and what
    `hybridmesh status` printed during the outage."""
    mesh = running.mesh
    mix = [EASY[0], CORRECTED[0], EASY[1], CONFIRMED[0], EASY[2], CORRECTED[1]]
    replies: Replies = {}
    failures: list[tuple[str, grpc.StatusCode]] = []
    stop = asyncio.Event()

    async def client(worker: int) -> None:
        sent = 0
        while not stop.is_set():
            index, request_id = mix[sent % len(mix)], f"load-{worker}-{sent}"
            try:
                replies[request_id] = (
                    index,
                    await running.stub.Infer(request(index, request_id), timeout=5),
                )
            except grpc.aio.AioRpcError as error:
                failures.append((request_id, error.code()))
            sent += 1
            await asyncio.sleep(0.02)  # a bounded load: ~4 x 30 requests/s

    def cloud_answered(after: set[str]) -> bool:
        return any(
            reply.decision.served_by == routing_pb2.TIER_CLOUD
            for request_id, (_, reply) in replies.items()
            if request_id not in after
        )

    clients = [asyncio.create_task(client(worker)) for worker in range(4)]
    # Under load before the outage: the cloud answers escalations.
    await eventually(lambda: cloud_answered(set()), 30, "the cloud answers before the outage")
    await mesh.kill("cloud")
    # The outage lasts OUTAGE_S by design; status is read two thirds into it.
    await asyncio.sleep(OUTAGE_S * 2 / 3)
    during = await status_output(running.state)
    await asyncio.sleep(OUTAGE_S / 3)
    await mesh.restart("cloud")
    # Under load after the outage, until the restarted cloud answers escalations again.
    before_restart = set(replies)
    await eventually(lambda: cloud_answered(before_restart), 30, "the cloud answers again")
    stop.set()
    await asyncio.gather(*clients)
    return replies, failures, during


@MODULE_LOOP
async def test_cloud_outage_under_load_fails_nothing_and_reconciles_everything(
    running: RunningMesh,
) -> None:
    replies, failures, during = await load_through_an_outage(running)
    assert failures == []
    queued = {
        rid for rid, (_, reply) in replies.items() if reply.decision.queued_for_reconciliation
    }
    for request_id, (index, reply) in replies.items():
        decision = reply.decision
        # A would-be escalation the cloud did not answer is queued, and only those are.
        unanswered = index in HARD and decision.served_by == routing_pb2.TIER_EDGE
        assert unanswered == (request_id in queued), (request_id, decision)
        if unanswered:
            assert decision.degraded and decision.reason in CLOUD_UNREACHABLE
    assert len(queued) >= 10, "the outage produced would-be escalations"
    assert "outbox" in during and " 0 queued" not in during, during

    await eventually(lambda: read_stats(running.outbox).depth == 0, 30, "outbox drained")
    reconciled = [row for row in running.reconciled() if row[0].startswith("load-")]
    assert sorted(row[0] for row in reconciled) == sorted(queued)  # each item once
    replays = running.replays_received()
    assert all(replays[request_id] == 1 for request_id in queued), replays
    disagreements = {row[0] for row in reconciled if row[2] != row[3]}
    assert disagreements == {rid for rid in queued if replies[rid][0] in CORRECTED}
    assert disagreements, "corrections are expected for the items the cloud corrects"
    watch = running.stub.WatchCorrections(
        router_service_pb2.WatchCorrectionsRequest(include_recorded=True)
    )
    corrected: set[str] = set()
    while len(corrected) < len(disagreements):
        message = await asyncio.wait_for(watch.read(), 5)
        assert isinstance(message, router_service_pb2.WatchCorrectionsResponse)
        if message.correction.request_id.startswith("load-"):
            corrected.add(message.correction.request_id)
    watch.cancel()
    assert corrected == disagreements
    after = await status_output(running.state)
    assert " 0 queued" in after and "correction" in after, after


@MODULE_LOOP
@pytest.mark.parametrize("part", ["router", "edge"])
async def test_kill_9_with_items_in_the_outbox_loses_none_and_reconciles_once(
    running: RunningMesh, part: str
) -> None:
    mesh = running.mesh
    await mesh.kill("cloud")
    ids = [f"kill-{part}-{n}" for n in range(4)]
    for request_id, index in zip(ids, HARD, strict=False):
        reply = await running.stub.Infer(request(index, request_id), timeout=5)
        assert reply.decision.queued_for_reconciliation, reply.decision
    assert set(ids) <= running.queued_ids()
    await mesh.kill(part)  # SIGKILL, as a crash: the outbox has no chance to close
    await mesh.restart(part)
    await edge_serves_again(running)
    assert set(ids) <= running.queued_ids(), "nothing lost"
    await mesh.restart("cloud")
    await eventually(lambda: not set(ids) & running.queued_ids(), 30, "items reconciled")
    rows = Counter(row[0] for row in running.reconciled())
    assert all(rows[request_id] == 1 for request_id in ids), rows
    replays = running.replays_received()
    assert all(replays[request_id] == 1 for request_id in ids), replays


@MODULE_LOOP
async def test_sensitive_data_never_reaches_envoy_or_the_cloud_under_any_fault(
    running: RunningMesh,
) -> None:
    mesh, wan = running.mesh, running.mesh.wan
    hard = HARD[0]
    sensitive_ids: list[str] = []
    public_ids: list[str] = []

    async def send(
        fault: str, *, deadline_s: float = 5.0, attempts: int = 1, unanswerable: int | None = None
    ) -> None:
        """One SENSITIVE and one PUBLIC hard request, each retried with its id;
        ``unanswerable``: the privacy class no tier may answer (UNAVAILABLE)."""
        for privacy, ids in ((SENSITIVE, sensitive_ids), (PUBLIC, public_ids)):
            request_id = f"{'sens' if privacy == SENSITIVE else 'pub'}-{fault}"
            ids.append(request_id)
            for _ in range(attempts):
                try:
                    reply = await running.stub.Infer(
                        request(hard, request_id, privacy), timeout=deadline_s
                    )
                except grpc.aio.AioRpcError as error:
                    # The edge is down: SENSITIVE has no other tier (PUBLIC neither when
                    # the cloud is down too).
                    assert privacy in (SENSITIVE, unanswerable), (fault, error)
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    continue
                if privacy == SENSITIVE:
                    assert not reply.decision.data_left_site
                    assert not reply.decision.queued_for_reconciliation

    await send("healthy")
    wan.set_delay(400)  # slow WAN; a tight deadline hedges PUBLIC, never SENSITIVE
    await send("slow-wan", deadline_s=0.25)
    await send("slow-wan-retried", deadline_s=0.25, attempts=3)
    wan.set_delay(40)
    wan.set_failure_percent(100)  # the WAN drops everything: retries, outbox
    await send("wan-failing-retried", attempts=3)
    wan.set_failure_percent(0)
    await mesh.kill("cloud")
    await send("cloud-down", attempts=2)
    await mesh.kill("edge")
    await send("cloud-and-edge-down", attempts=2, unanswerable=PUBLIC)
    await mesh.restart("cloud")
    # The replay of what was queued meanwhile succeeds once the cloud's breaker lets
    # calls through again: from then on PUBLIC requests can fall back to the cloud.
    await eventually(lambda: read_stats(running.outbox).depth == 0, 30, "outbox drained")
    await send("edge-down", attempts=2, unanswerable=SENSITIVE)
    await mesh.restart("edge")
    await edge_serves_again(running)
    # CLOUD_ONLY for SENSITIVE is refused outright.
    cloud_only = request(hard, "sens-cloud-only", SENSITIVE)
    cloud_only.hints.preference = routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stub.Infer(cloud_only, timeout=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    sensitive_ids.append("sens-cloud-only")

    # Envoy flushes its access log within a second; the PUBLIC ids prove it is written.
    await eventually(
        lambda: (
            {"pub-healthy", "pub-edge-down"}
            <= {line["request_id"] for line in running.log("envoy_access")}
        ),
        10,
        "Envoy's access log has the PUBLIC requests",
    )
    envoy_lines = running.log("envoy_access")
    for name, lines in (
        ("envoy_access", envoy_lines),
        ("cloud_intake", running.log("cloud_intake")),
        ("router_audit", running.log("router_audit")),
    ):
        seen = {line["request_id"] for line in lines}
        assert not seen & set(sensitive_ids), (name, seen & set(sensitive_ids))
        assert {"pub-healthy", "pub-edge-down"} <= seen, name
        assert all(line.get("privacy_class") != "PRIVACY_CLASS_SENSITIVE" for line in lines)
    # The PUBLIC requests queued during the cloud outage reached the cloud by replay.
    assert running.replays_received()["pub-cloud-down"] == 1


@MODULE_LOOP
async def test_kill_9_of_the_router_in_the_middle_of_a_drain_loses_and_repeats_nothing(
    running: RunningMesh,
) -> None:
    mesh, wan = running.mesh, running.mesh.wan
    await edge_serves_again(running)
    await mesh.kill("cloud")
    ids = [f"mid-drain-{n}" for n in range(24)]
    for n, request_id in enumerate(ids):
        reply = await running.stub.Infer(request(HARD[n % len(HARD)], request_id), timeout=5)
        assert reply.decision.queued_for_reconciliation
    wan.set_delay(500)  # each replay now takes half a second: the drain takes seconds
    try:
        await mesh.restart("cloud")

        def drain_under_way() -> bool:
            done = {row[0] for row in running.reconciled()} & set(ids)
            return 0 < len(done) < len(ids)

        await eventually(drain_under_way, 30, "part of the backlog reconciled")
        await mesh.kill("router")  # replays in flight, items half done
        await mesh.restart("router")
    finally:
        wan.set_delay(40)
    await eventually(lambda: not set(ids) & running.queued_ids(), 30, "backlog reconciled")
    rows = Counter(row[0] for row in running.reconciled())
    assert all(rows[request_id] == 1 for request_id in ids), rows
