"""Issue 15 #4: the decision record agrees with itself and with what was sent, for every
combination of preference, privacy, breaker state, tier failure and hedge.

Property-based (hypothesis) over a real router in front of scripted tiers: each example
sets the cloud breaker's state through its public API, scripts what each tier does with
the request, sends it, then checks the answer against the audit log (what left the
site) and the calls the scripted cloud received.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridmesh.common.v1 import routing_pb2
from router_service.breaker import CallOutcome, CircuitBreaker
from tests.helpers.decision_invariants import (
    check_decision,
    check_policy_refusal,
    policy_forbids,
    transfers,
)
from tests.helpers.scripted_tiers import CONFIDENT, HARD, ScriptedMesh, answer, fail, hang, request

CLOUD_PRICE = 1500
EDGE_LABEL, CLOUD_LABEL = 3, 7
STEPS = {
    "answer": answer(),
    "unavailable": fail(grpc.StatusCode.UNAVAILABLE, "scripted unavailable"),
    "internal": fail(grpc.StatusCode.INTERNAL, "scripted internal"),
    "hang": hang(),
}


@dataclass(frozen=True)
class Case:
    kinds: list[int]
    privacy: int
    preference: int
    breaker: str  # closed | open | half_open | half_open_full
    edge: str
    cloud: str
    hedge: bool


cases = st.builds(
    Case,
    kinds=st.lists(st.sampled_from([CONFIDENT, HARD]), min_size=1, max_size=4),
    privacy=st.sampled_from(
        [
            routing_pb2.PRIVACY_CLASS_PUBLIC,
            routing_pb2.PRIVACY_CLASS_INTERNAL,
            routing_pb2.PRIVACY_CLASS_SENSITIVE,
        ]
    ),
    preference=st.sampled_from(
        [
            routing_pb2.ROUTE_PREFERENCE_AUTO,
            routing_pb2.ROUTE_PREFERENCE_EDGE_ONLY,
            routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY,
        ]
    ),
    breaker=st.sampled_from(["closed", "open", "half_open", "half_open_full"]),
    edge=st.sampled_from(list(STEPS)),
    cloud=st.sampled_from(list(STEPS)),
    hedge=st.booleans(),
)


def _fresh_breakers(mesh: ScriptedMesh, state: str) -> list[Any]:
    """New breakers for both tiers; the cloud's put in ``state`` through its public API.
    Returns the probe permits held, so 'half_open_full' keeps every slot taken."""
    router = mesh.router.router
    router.edge.breaker = CircuitBreaker("edge", router.edge.breaker.config)
    cloud = router.cloud.breaker = CircuitBreaker("cloud", router.cloud.breaker.config)
    held: list[Any] = []
    if state == "closed":
        return held
    for _ in range(cloud.config.consecutive_failures_to_open):
        permit = cloud.try_acquire()
        assert permit is not None
        cloud.record(permit, CallOutcome.FAILURE, 0.01)
    if state in ("half_open", "half_open_full"):
        cloud.health_restored()
    if state == "half_open_full":
        held = [cloud.try_acquire() for _ in range(cloud.config.half_open_probes)]
    return held


@pytest.mark.slow
@settings(
    max_examples=70,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases)
async def test_every_decision_agrees_with_itself_and_with_what_was_sent(
    scripted: ScriptedMesh, case: Case
) -> None:
    mesh = scripted
    held = _fresh_breakers(mesh, case.breaker)
    mesh.router.router._settings = mesh.router.settings.model_copy(
        update={"hedge_below_budget_s": 10.0 if case.hedge else 0.0}
    )
    mesh.edge.tier.steps.clear()
    mesh.cloud.tier.steps.clear()
    mesh.edge.tier.script(STEPS[case.edge])
    mesh.cloud.tier.script(STEPS[case.cloud])
    rid = f"inv-{id(case)}-{len(mesh.cloud.tier.calls)}"
    rpc = request(
        case.kinds, mesh, request_id=rid, privacy=case.privacy, preference=case.preference
    )
    try:
        reply = await mesh.stub.Infer(rpc, timeout=0.6)
    except grpc.aio.AioRpcError as error:
        _check_refusal(mesh, case, rid, error)
        return
    finally:
        del held
    audited = transfers(mesh.audited(rid))
    received = [c for c in mesh.cloud.tier.calls if c.request_id == rid and not c.reconciliation]
    check_decision(
        reply,
        audited=audited,
        privacy=case.privacy,
        preference=case.preference,
        cloud_price_micros=CLOUD_PRICE,
    )
    # What the scripted cloud received, and which answer each item carries.
    assert len(received) <= len(audited)
    if case.breaker in ("open", "half_open_full"):
        assert not audited  # the breaker sent nothing
    for prediction in reply.predictions:
        label = prediction.classification.top_k[0].class_index
        cloud = prediction.served_by == routing_pb2.TIER_CLOUD
        assert label == (CLOUD_LABEL if cloud else EDGE_LABEL)


def _check_refusal(mesh: ScriptedMesh, case: Case, rid: str, error: grpc.aio.AioRpcError) -> None:
    """A request fails only when policy forbids it or no tier could answer."""
    sensitive = case.privacy == routing_pb2.PRIVACY_CLASS_SENSITIVE
    if policy_forbids(case.privacy, case.preference):
        check_policy_refusal(error.code(), error.details() or "")
        return
    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert case.edge != "answer" or case.cloud == "hang", error.details()
    if sensitive:
        assert not mesh.audited(rid)


def test_the_strategy_covers_the_matrix() -> None:
    """The generated cases reach every breaker state and tier behaviour."""
    seen: set[tuple[str, str, str]] = set()

    @settings(max_examples=300, derandomize=True, database=None)
    @given(case=cases)
    def collect(case: Case) -> None:
        seen.add((case.breaker, case.edge, case.cloud))

    collect()
    assert {b for b, _, _ in seen} == {"closed", "open", "half_open", "half_open_full"}
    assert {e for _, e, _ in seen} == set(STEPS) == {c for _, _, c in seen}
