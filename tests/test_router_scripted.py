"""The router's sequencing and fault paths, exactly, against scripted tiers.

A real ``RouterNode`` (channels, breakers, health watch, outbox, audit log) in front of
scripted edge and cloud gRPC servers (``tests/helpers/scripted_tiers.py``); no Triton, and no
sleep is used to synchronise: tests wait on the calls themselves.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from hybridmesh.common.v1 import decision_pb2, routing_pb2
from hybridmesh.router.v1 import router_service_pb2
from router_service.breaker import BreakerState, CallOutcome
from tests.helpers.scripted_tiers import CONFIDENT, HARD, ScriptedMesh, fail, hang, request
from tests.helpers.waiting import eventually

PUBLIC = routing_pb2.PRIVACY_CLASS_PUBLIC
SENSITIVE = routing_pb2.PRIVACY_CLASS_SENSITIVE
AUTO = routing_pb2.ROUTE_PREFERENCE_AUTO
CLOUD_ONLY = routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY
R = decision_pb2


async def test_confident_items_stay_on_the_edge(scripted: ScriptedMesh) -> None:
    reply = await scripted.stub.Infer(request([CONFIDENT], scripted, request_id="c1"), timeout=2)
    assert reply.decision.served_by == routing_pb2.TIER_EDGE
    assert reply.decision.reason == R.DECISION_REASON_EDGE_CONFIDENT
    assert not reply.decision.data_left_site and reply.decision.cost.cloud_micros == 0
    assert scripted.cloud.tier.calls == []


async def test_a_batch_is_split_and_only_hard_items_are_sent(scripted: ScriptedMesh) -> None:
    reply = await scripted.stub.Infer(
        request([CONFIDENT, HARD, CONFIDENT, HARD], scripted, request_id="split"), timeout=2
    )
    assert reply.decision.served_by == routing_pb2.TIER_EDGE_AND_CLOUD
    tiers = [p.served_by for p in reply.predictions]
    assert tiers == [routing_pb2.TIER_EDGE, routing_pb2.TIER_CLOUD] * 2
    # The cloud's rows (class 7) replaced the edge's (class 3) for the hard items only.
    assert [p.classification.top_k[0].class_index for p in reply.predictions] == [3, 7, 3, 7]
    assert [c.items for c in scripted.cloud.tier.calls] == [2]
    assert reply.decision.cost.cloud_micros == 2 * 1500
    assert len(scripted.audited("split")) == 1


async def test_edge_error_falls_back_to_the_cloud(scripted: ScriptedMesh) -> None:
    scripted.edge.tier.script(fail(grpc.StatusCode.UNAVAILABLE, "edge down"))
    reply = await scripted.stub.Infer(request([CONFIDENT], scripted, request_id="e1"), timeout=2)
    assert reply.decision.served_by == routing_pb2.TIER_CLOUD
    assert reply.decision.reason == R.DECISION_REASON_EDGE_FAILED_CLOUD_FALLBACK
    assert reply.decision.degraded and reply.decision.data_left_site


async def test_a_hung_edge_costs_its_cap_and_the_cloud_answers(scripted: ScriptedMesh) -> None:
    """Issue 15 #2: a frozen edge no longer eats the 2 s deadline."""
    for index in range(25):  # an edge latency history for the cap
        await scripted.stub.Infer(request([CONFIDENT], scripted, request_id=f"w{index}"), timeout=2)
    scripted.edge.tier.script(hang())
    reply = await scripted.stub.Infer(request([CONFIDENT], scripted, request_id="hung"), timeout=2)
    assert reply.decision.served_by == routing_pb2.TIER_CLOUD
    assert reply.decision.reason == R.DECISION_REASON_EDGE_FAILED_CLOUD_FALLBACK
    assert "cap" in reply.decision.explanation
    # Answered by the cloud while the edge was still hanging, then the edge call cancelled.
    assert await asyncio.wait_for(scripted.edge.tier.calls[-1].outcome, 2) == "cancelled"
    assert reply.decision.timings.total.ToTimedelta().total_seconds() < 1.0


async def test_an_edge_its_health_check_reports_down_is_skipped(scripted: ScriptedMesh) -> None:
    await scripted.edge.set_serving(False)
    await eventually(lambda: scripted.router.router.edge.health.known_down)
    calls_before = len(scripted.edge.tier.calls)
    reply = await scripted.stub.Infer(request([CONFIDENT], scripted, request_id="down"), timeout=2)
    assert reply.decision.served_by == routing_pb2.TIER_CLOUD
    assert "health check" in reply.decision.explanation
    assert len(scripted.edge.tier.calls) == calls_before
    # Known down opens the edge's breaker (Envoy-style ejection): SENSITIVE data, with
    # nowhere else to go, is refused at once, naming each tier and why.
    assert scripted.router.router.edge.breaker.state is BreakerState.OPEN
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await scripted.stub.Infer(
            request([CONFIDENT], scripted, request_id="down-s", privacy=SENSITIVE), timeout=2
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    details = refused.value.details() or ""
    assert "edge: edge circuit breaker is open" in details
    assert "PRIVACY_SENSITIVE" in details
    assert len(scripted.edge.tier.calls) == calls_before
    # SERVING again: half-open, probes decide, the edge answers again.
    await scripted.edge.set_serving(True)
    await eventually(lambda: not scripted.router.router.edge.health.known_down)
    back = await scripted.stub.Infer(request([CONFIDENT], scripted, request_id="back"), timeout=2)
    assert back.decision.served_by == routing_pb2.TIER_EDGE


async def test_a_cloud_its_health_check_reports_down_is_not_called(
    scripted: ScriptedMesh,
) -> None:
    await scripted.cloud.set_serving(False)
    await eventually(lambda: scripted.router.router.cloud.health.known_down)
    reply = await scripted.stub.Infer(request([HARD], scripted, request_id="cdown"), timeout=2)
    assert reply.decision.served_by == routing_pb2.TIER_EDGE
    assert reply.predictions[0].reason == R.DECISION_REASON_CLOUD_BREAKER_OPEN
    assert not reply.decision.data_left_site and reply.decision.queued_for_reconciliation
    assert not [c for c in scripted.cloud.tier.calls if c.request_id == "cdown"]


async def test_when_no_tier_can_answer_the_error_names_each(scripted: ScriptedMesh) -> None:
    scripted.edge.tier.script(fail(grpc.StatusCode.UNAVAILABLE, "edge gone"))
    scripted.cloud.tier.script(fail(grpc.StatusCode.INTERNAL, "cloud broke"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await scripted.stub.Infer(request([CONFIDENT], scripted, request_id="none"), timeout=2)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "edge: edge gone" in (raised.value.details() or "")
    assert "cloud: cloud broke" in (raised.value.details() or "")


async def test_cloud_error_keeps_the_edge_answer_and_owes_the_item(scripted: ScriptedMesh) -> None:
    scripted.cloud.tier.script(fail(grpc.StatusCode.UNAVAILABLE, "wan cut"))
    reply = await scripted.stub.Infer(request([HARD], scripted, request_id="ce"), timeout=2)
    decision = reply.decision
    assert decision.served_by == routing_pb2.TIER_EDGE
    assert decision.reason == R.DECISION_REASON_CLOUD_FAILED_EDGE_FALLBACK
    assert decision.degraded and decision.queued_for_reconciliation
    assert decision.data_left_site and decision.cost.cloud_micros == 1500


async def test_a_hung_cloud_ends_inside_the_deadline_with_the_edge_answer(
    scripted: ScriptedMesh,
) -> None:
    scripted.cloud.tier.script(hang())
    reply = await scripted.stub.Infer(request([HARD], scripted, request_id="ch"), timeout=0.5)
    assert reply.decision.served_by == routing_pb2.TIER_EDGE
    assert reply.decision.reason == R.DECISION_REASON_CLOUD_FAILED_EDGE_FALLBACK
    assert reply.decision.degraded and reply.decision.queued_for_reconciliation


async def test_cloud_only_with_the_breaker_open_bills_nothing_and_says_why(
    scripted: ScriptedMesh,
) -> None:
    """Issue 15 #4: the record agrees with what was sent (nothing)."""
    breaker = scripted.router.router.cloud.breaker
    for _ in range(breaker.config.consecutive_failures_to_open):  # five failed calls
        permit = breaker.try_acquire()
        assert permit is not None
        breaker.record(permit, CallOutcome.FAILURE, 0.01)
    assert breaker.state is BreakerState.OPEN
    sent = len(scripted.cloud.tier.calls)
    reply = await scripted.stub.Infer(
        request([CONFIDENT, HARD], scripted, request_id="co", preference=CLOUD_ONLY), timeout=2
    )
    decision = reply.decision
    assert decision.served_by == routing_pb2.TIER_EDGE
    assert {p.reason for p in reply.predictions} == {R.DECISION_REASON_CLOUD_BREAKER_OPEN}
    assert decision.degraded and decision.queued_for_reconciliation
    assert not decision.data_left_site and decision.cost.cloud_micros == 0
    assert len(scripted.cloud.tier.calls) == sent and scripted.audited("co") == []


async def test_cloud_only_failing_is_not_retried_on_the_cloud(scripted: ScriptedMesh) -> None:
    scripted.cloud.tier.script(fail(grpc.StatusCode.UNAVAILABLE, "refused"))
    reply = await scripted.stub.Infer(
        request([HARD, HARD], scripted, request_id="co2", preference=CLOUD_ONLY), timeout=2
    )
    assert [c.items for c in scripted.cloud.tier.calls] == [2]  # one attempt, never two
    assert reply.decision.cost.cloud_micros == 2 * 1500  # billed once: what was sent
    assert reply.decision.degraded and reply.decision.data_left_site
    assert {p.reason for p in reply.predictions} == {R.DECISION_REASON_CLOUD_FAILED_EDGE_FALLBACK}


async def test_hedge_race_confident_edge_cancels_the_cloud(scripted: ScriptedMesh) -> None:
    scripted.router.router._settings = scripted.router.settings.model_copy(
        update={"hedge_below_budget_s": 10.0}
    )
    scripted.cloud.tier.script(hang())
    reply = await scripted.stub.Infer(request([CONFIDENT], scripted, request_id="hr"), timeout=2)
    assert reply.decision.served_by == routing_pb2.TIER_EDGE
    assert "hedged cloud call cancelled" in reply.decision.explanation
    assert await asyncio.wait_for(scripted.cloud.tier.calls[-1].outcome, 2) == "cancelled"
    # The bytes went out before the edge won: said and billed.
    assert reply.decision.data_left_site and reply.decision.cost.cloud_micros == 1500


async def test_hedge_race_hard_item_takes_the_cloud_answer(scripted: ScriptedMesh) -> None:
    scripted.router.router._settings = scripted.router.settings.model_copy(
        update={"hedge_below_budget_s": 10.0}
    )
    reply = await scripted.stub.Infer(request([HARD], scripted, request_id="hh"), timeout=2)
    assert reply.decision.served_by == routing_pb2.TIER_CLOUD
    assert reply.decision.reason == R.DECISION_REASON_ESCALATED_HARD_CASE
    assert len(scripted.cloud.tier.calls) == 1


async def test_stream_gives_the_edge_answer_then_the_cloud_one(scripted: ScriptedMesh) -> None:
    call = scripted.stub.InferStream(
        router_service_pb2.InferStreamRequest(request=request([HARD], scripted, request_id="s1")),
        timeout=2,
    )
    messages = [message async for message in call]
    assert [m.final for m in messages] == [False, True]
    assert messages[0].response.decision.served_by == routing_pb2.TIER_EDGE
    assert messages[1].response.decision.served_by == routing_pb2.TIER_CLOUD
    assert messages[1].supersedes_previous


@pytest.mark.parametrize("kind", ["unary", "stream"])
async def test_a_caller_that_leaves_cancels_the_escalation(
    scripted: ScriptedMesh, kind: str
) -> None:
    """Issue 15 #1: the request's lifetime bounds its work (the cloud call is cancelled
    on the wire, not left to run on), and nothing is counted as a cloud failure."""
    scripted.cloud.tier.script(hang())
    scripted.cloud.tier.call_started.clear()
    rpc = request([HARD], scripted, request_id=f"leave-{kind}")
    if kind == "stream":
        call = scripted.stub.InferStream(
            router_service_pb2.InferStreamRequest(request=rpc), timeout=5
        )
        first = await call.read()
        assert isinstance(first, router_service_pb2.InferStreamResponse) and not first.final
    else:
        call = scripted.stub.Infer(rpc, timeout=5)  # type: ignore[assignment]
    await scripted.cloud.tier.call_started.wait()
    call.cancel()
    assert await asyncio.wait_for(scripted.cloud.tier.calls[-1].outcome, 1) == "cancelled"
    breaker = scripted.router.router.cloud.breaker
    assert breaker.state is BreakerState.CLOSED
