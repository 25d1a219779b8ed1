"""The decision invariants (issue 15 #4), checked on one answer against what was sent.

Shared by the property-based test over scripted tiers
(``tests/test_router_decision_invariants.py``) and the chaos test on the real local mesh
(``tests/test_chaos.py``): both hand in the answer, the request's hints and the router's
audit records for its request id (what left the site).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message

from hybridmesh.common.v1 import decision_pb2, routing_pb2
from hybridmesh.router.v1 import router_service_pb2
from router_service.decision import CLOUD_SERVED_REASONS, CLOUD_UNREACHABLE

R = decision_pb2
# Reasons that say an item is not where the policy wanted it.
DEGRADING = frozenset(
    {
        R.DECISION_REASON_CLOUD_BREAKER_OPEN,
        R.DECISION_REASON_CLOUD_FAILED_EDGE_FALLBACK,
        R.DECISION_REASON_DEADLINE_TOO_SHORT,
        R.DECISION_REASON_EDGE_FAILED_CLOUD_FALLBACK,
    }
)
AuditRecord = Mapping[str, object]


def _line(message: Message) -> str:
    return str(text_format.MessageToString(message, as_one_line=True))[:600]


def transfers(records: Sequence[AuditRecord]) -> list[AuditRecord]:
    """The transfers a request's own routing made (outbox replays are not its): its
    "off-site transfer" records, less those a "not sent" record of the same span says
    never left (the cloud could not be reached at all)."""
    not_sent = {r.get("span_id") for r in records if r.get("event") == "off-site transfer not sent"}
    return [
        r
        for r in records
        if r.get("event") == "off-site transfer"
        and r.get("purpose") != "reconciliation"
        and r.get("span_id") not in not_sent
    ]


def check_decision(
    reply: router_service_pb2.InferResponse,
    *,
    audited: Sequence[AuditRecord],
    privacy: int,
    preference: int,
    cloud_price_micros: int,
) -> None:
    """Every decision field agrees with the others and with ``audited`` (the router's
    audit records for this request id, replays excluded)."""
    decision, predictions = reply.decision, list(reply.predictions)
    sensitive = privacy == routing_pb2.PRIVACY_CLASS_SENSITIVE
    items_sent = sum(int(str(a["items"])) for a in audited)

    said = _line(decision)

    # What left the site: said, billed and audited alike.
    assert decision.data_left_site == bool(audited), (
        f"data_left_site={decision.data_left_site} with {len(audited)} audit record(s): {said}"
    )
    assert decision.cost.cloud_micros == cloud_price_micros * items_sent, (
        f"billed {decision.cost.cloud_micros} micros for {items_sent} item(s) sent: {said}"
    )
    assert decision.cost.cloud_micros <= decision.cost.all_cloud_micros, f"over all-cloud: {said}"
    if sensitive or preference == routing_pb2.ROUTE_PREFERENCE_EDGE_ONLY:
        assert not audited, f"sent though the policy keeps it on the edge: {audited}"
    # Each item's tier and reason agree.
    tiers = {p.served_by for p in predictions}
    assert decision.served_by == (
        tiers.pop() if len(tiers) == 1 else routing_pb2.TIER_EDGE_AND_CLOUD
    ), f"served_by disagrees with the items': {said}"
    for prediction in predictions:
        item = _line(prediction)
        if prediction.served_by == routing_pb2.TIER_CLOUD:
            assert prediction.reason in CLOUD_SERVED_REASONS, f"cloud item, edge reason: {item}"
        else:
            assert prediction.served_by == routing_pb2.TIER_EDGE, f"no tier: {item}"
            assert prediction.reason not in CLOUD_SERVED_REASONS, f"edge item, cloud reason: {item}"
        if sensitive:
            assert prediction.reason == R.DECISION_REASON_PRIVACY_SENSITIVE, f"SENSITIVE: {item}"
    cloud_served = [p for p in predictions if p.served_by == routing_pb2.TIER_CLOUD]
    assert decision.reason == (cloud_served or predictions)[0].reason, f"reason: {said}"
    assert bool(decision.cloud_model.name) == bool(cloud_served), f"cloud_model: {said}"
    assert decision.degraded == any(p.reason in DEGRADING for p in predictions), (
        f"degraded={decision.degraded} disagrees with the items' reasons: {said}"
    )
    owed = [p for p in predictions if p.reason in CLOUD_UNREACHABLE]
    assert decision.queued_for_reconciliation == (bool(owed) and not sensitive), (
        f"queued_for_reconciliation={decision.queued_for_reconciliation} with {len(owed)} "
        f"item(s) owed: {said}"
    )


def policy_forbids(privacy: int, preference: int) -> bool:
    """SENSITIVE data asked to go to the cloud: refused whatever the tiers do."""
    return (
        privacy == routing_pb2.PRIVACY_CLASS_SENSITIVE
        and preference == routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY
    )


def check_policy_refusal(code: grpc.StatusCode, details: str) -> None:
    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)


def check_no_tier_could_answer(code: grpc.StatusCode, details: str) -> None:
    """UNAVAILABLE naming each tier and why."""
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    assert "no tier could answer" in details, details
    assert "edge:" in details and "cloud:" in details, details
