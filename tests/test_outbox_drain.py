"""The outbox drain after an outage on the in-process mesh (real router, edge node, cloud
service and Triton): the adaptive rate honours the real cloud's shedding
(RESOURCE_EXHAUSTED with gRFC A6 retry pushback), and the backlog drains with nothing
lost or reconciled twice; during an outage queued escalations do not each wake the
reconciliation worker."""

from __future__ import annotations

import time

import pytest
from opentelemetry.sdk.metrics.export import Gauge

from hybridmesh.router.v1 import router_service_pb2
from localmesh.triton import TritonServer
from router_service.config import CloudBreakerSettings
from router_service.outbox import read_stats
from router_service.reconciler import MAX_ROUNDS_PER_S
from tests.helpers.item_difficulty import easy_and_hard
from tests.helpers.local_mesh import Mesh, restart_cloud, start_mesh, stop_mesh
from tests.helpers.requests import router_request
from tests.helpers.waiting import eventually
from workload.fashion_mnist import load_split

pytestmark = pytest.mark.asyncio(loop_scope="module")

IMAGES = load_split("test").images[:300]
_, HARD = easy_and_hard(IMAGES, 20)
BACKLOG = 40
PUSHBACK_MS = 300


def named(index: int, request_id: str) -> router_service_pb2.InferRequest:
    request = router_request(IMAGES[index : index + 1])
    request.request_id = request_id
    return request


def gauge(mesh: Mesh, name: str) -> float | None:
    data = mesh.router_metrics.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name and isinstance(metric.data, Gauge):
                    return float(metric.data.data_points[0].value)
    return None


async def test_a_backlog_drains_through_the_clouds_pushback_and_nothing_is_lost(
    mesh_triton: TritonServer,
) -> None:
    mesh = await start_mesh(
        mesh_triton.grpc_url,
        drain_backoff_base_s=0.1,
        drain_backoff_max_s=0.5,
        drain_idle_s=0.1,
        drain_rate_per_s=50.0,
        # A short open period, so the breaker the outage opened does not set the pace.
        breaker_cloud=CloudBreakerSettings(open_base_s=0.3, open_max_s=1.0),
    )
    try:
        await mesh.cloud.stop(0)  # the outage
        ids = [f"backlog-{n}" for n in range(BACKLOG)]
        for n, request_id in enumerate(ids):
            reply = await mesh.stub.Infer(named(HARD[n % len(HARD)], request_id), timeout=5)
            assert reply.decision.queued_for_reconciliation, request_id
        outbox = mesh.router.outbox
        assert outbox.depth == BACKLOG
        rate = mesh.router.reconciler.rate
        started_at = rate.rate_per_s

        # The cloud comes back with room for one call and no queue, and the test holds
        # that one slot: every replay is shed with the cloud's own pushback.
        await restart_cloud(
            mesh,
            mesh_triton.grpc_url,
            max_in_flight=1,
            max_queued_requests=0,
            retry_after_ms=PUSHBACK_MS,
        )
        admission = mesh.cloud._admission  # the real cloud service's own limit
        async with admission.slot():
            await eventually(lambda: rate.pushbacks >= 1, timeout_s=15)
            assert rate.rate_per_s < started_at
            assert outbox.depth == BACKLOG  # shed replays stay queued
        await eventually(lambda: outbox.depth == 0, timeout_s=60)

        # Each queued request reconciled exactly once, every item of it recorded.
        examples = outbox.reconciled()
        assert sorted(e.request_id for e in examples) == sorted(ids)
        stats = outbox.stats()
        assert (stats.depth, stats.reconciled_items) == (0, BACKLOG)
        assert read_stats(outbox.path) == stats
        shed = [
            span.attributes
            for span in mesh.router_spans.get_finished_spans()
            if span.name == "router.reconcile"
            and span.attributes
            and "hybridmesh.retry_pushback_ms" in span.attributes
        ]
        assert shed and all(a["hybridmesh.retry_pushback_ms"] == PUSHBACK_MS for a in shed)
        assert mesh.router_counter("hybridmesh.outbox.reconciled_items") == BACKLOG
        assert mesh.router_counter("hybridmesh.outbox.drain.pushbacks") == rate.pushbacks
        assert gauge(mesh, "hybridmesh.outbox.drain.rate") == rate.rate_per_s
    finally:
        await stop_mesh(mesh)


async def test_queued_escalations_during_an_outage_do_not_each_wake_the_worker(
    mesh_triton: TritonServer,
) -> None:
    """Issue 21 #4: the worker's rounds (each a drain attempt and maybe an age read) are
    bounded in rate, not one per queued escalation as before."""
    mesh = await start_mesh(mesh_triton.grpc_url, drain_idle_s=0.5)
    try:
        reconciler = mesh.router.reconciler
        rounds = 0
        refresh_age = reconciler._refresh_age

        async def counted_round() -> None:  # a spy on the real round: once per round
            nonlocal rounds
            rounds += 1
            await refresh_age()

        reconciler._refresh_age = counted_round  # type: ignore[method-assign]
        await mesh.cloud.stop(0)  # the outage
        started = time.monotonic()
        for n in range(BACKLOG):
            reply = await mesh.stub.Infer(named(HARD[n % len(HARD)], f"quiet-{n}"), timeout=5)
            assert reply.decision.queued_for_reconciliation
        elapsed = time.monotonic() - started
        assert mesh.router.outbox.depth == BACKLOG
        assert rounds <= elapsed * MAX_ROUNDS_PER_S + 2, (rounds, elapsed)
        assert rounds < BACKLOG / 2, (rounds, elapsed)
    finally:
        await stop_mesh(mesh)
