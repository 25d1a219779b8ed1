"""The router's decision, as pure functions: no I/O, no clock, no gRPC.

Two steps, each a function of facts:

- ``plan_escalation``: the policy verdict, the classifier's scores and the caller's
  constraints -> which items the cloud should serve, and why each item is where it is;
- ``settle``: the plan and what actually happened (the edge's answer or failure, every
  cloud attempt: refused, sent and failed, sent and answered, cancelled) -> each item's
  tier and reason, ``degraded``, the items owed to the cloud (the outbox), whether data
  left the site, the items billed, and the explanation.

Every field of the decision record is derived here from the same facts, so they cannot
disagree with each other or with what was sent (``tests/test_router_decision.py``
checks the invariants over the whole matrix of preferences, privacy, breaker states and
tier failures).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from hybridmesh.common.v1 import decision_pb2, routing_pb2
from router_service.policy import PolicyVerdict, Reason, RequestConstraints

EDGE, CLOUD = routing_pb2.TIER_EDGE, routing_pb2.TIER_CLOUD
Tier: TypeAlias = routing_pb2.Tier.ValueType

# The caller's rules that take the cloud off the table for every item.
CALLER_EXCLUDED_CLOUD = frozenset(
    {
        decision_pb2.DECISION_REASON_PRIVACY_SENSITIVE,
        decision_pb2.DECISION_REASON_PREFERENCE_EDGE_ONLY,
    }
)
# Reasons that are the caller's own choice: keeping the edge answer is not a degradation.
CALLER_CHOSEN = frozenset({*CALLER_EXCLUDED_CLOUD, decision_pb2.DECISION_REASON_COST_CEILING})
# The cloud should have answered these items but could not: they are owed to the cloud.
CLOUD_UNREACHABLE = frozenset(
    {
        decision_pb2.DECISION_REASON_CLOUD_BREAKER_OPEN,
        decision_pb2.DECISION_REASON_CLOUD_FAILED_EDGE_FALLBACK,
    }
)
# Reasons an item may carry when the cloud served it.
CLOUD_SERVED_REASONS = frozenset(
    {
        decision_pb2.DECISION_REASON_ESCALATED_HARD_CASE,
        decision_pb2.DECISION_REASON_ESCALATED_QUALITY_TARGET,
        decision_pb2.DECISION_REASON_PREFERENCE_CLOUD_ONLY,
        decision_pb2.DECISION_REASON_EDGE_FAILED_CLOUD_FALLBACK,
    }
)


class Purpose(enum.Enum):
    """Why a cloud call was made; the value is the audit log's ``purpose``."""

    CLOUD_ONLY = "cloud-only"
    HEDGE = "hedge"
    ESCALATION = "escalation"
    EDGE_FALLBACK = "edge-fallback"


class AttemptResult(enum.Enum):
    ANSWERED = "answered"
    # Sent, and the call failed or timed out.
    FAILED = "failed"
    # Not sent: the breaker refused it, or the cloud's health check says it is down.
    REFUSED = "refused"
    # A hedge the edge answer made unnecessary, cancelled after it was sent.
    CANCELLED = "cancelled"
    # Not sent: too little of the budget was left for the cloud to answer in time.
    NO_TIME = "no-time"
    # Not sent: the cloud could not be reached at all (name, connection or TLS failure),
    # or the transfer could not be audited.
    NOT_SENT = "not-sent"


NOT_SENT = frozenset({AttemptResult.REFUSED, AttemptResult.NO_TIME, AttemptResult.NOT_SENT})


@dataclass(frozen=True)
class CloudAttempt:
    """One call to the cloud (at most one per request, or a hedge plus its use).

    ``sent``: the request's bytes went out (the audit log has a record of them).
    ``rows``: item index -> row of the cloud's answer, for the items it now serves.
    """

    purpose: Purpose
    items_sent: tuple[int, ...]
    result: AttemptResult
    detail: str = ""
    rows: tuple[tuple[int, int], ...] = ()

    @property
    def sent(self) -> bool:
        return self.result not in NOT_SENT


@dataclass(frozen=True)
class EscalationPlan:
    """The decision step's output for a batch whose edge answer is known."""

    scores: tuple[float, ...]
    # Per item: the reason it stays on the edge, or why it should go to the cloud.
    reasons: tuple[Reason, ...]
    # Items the router wants from the cloud (the classifier, the quality target, or
    # CLOUD_ONLY), whether or not the policy lets the cloud serve them.
    wanted: tuple[int, ...]
    # The subset to send now: ``wanted`` when the policy allows the cloud, else empty.
    escalate: tuple[int, ...]
    # Why the cloud may not serve (the policy's verdict), if it may not.
    blocked: Reason | None
    threshold: float
    policy_version: str


def plan_escalation(  # noqa: PLR0917 (the decision's inputs, each named in the docstring)
    verdict: PolicyVerdict,
    constraints: RequestConstraints,
    scores: npt.NDArray[np.float32],
    top1_probability: npt.NDArray[np.float32],
    threshold: float,
    policy_version: str,
    *,
    cloud_already_failed: bool = False,
) -> EscalationPlan:
    """Which items should the cloud serve?

    ``scores``/``top1_probability``: [n] float32 from the classifier and the edge model.
    An item is wanted when its score is at or above ``threshold`` (a hard case), when
    the edge's error estimate 1 - top1 exceeds the caller's ``max_error_probability``,
    or always under CLOUD_ONLY. ``cloud_already_failed``: a CLOUD_ONLY call already
    failed, so nothing more is sent (one attempt per tier; no retry to the same tier).
    """
    max_error = constraints.max_error_probability
    cloud_only = constraints.preference == routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY
    reasons: list[Reason] = []
    wanted: list[int] = []
    for index, score in enumerate(scores.tolist()):
        if cloud_only:
            reasons.append(decision_pb2.DECISION_REASON_PREFERENCE_CLOUD_ONLY)
            wanted.append(index)
        elif score >= threshold:
            reasons.append(decision_pb2.DECISION_REASON_ESCALATED_HARD_CASE)
            wanted.append(index)
        elif max_error is not None and 1.0 - float(top1_probability[index]) > max_error:
            reasons.append(decision_pb2.DECISION_REASON_ESCALATED_QUALITY_TARGET)
            wanted.append(index)
        else:
            reasons.append(decision_pb2.DECISION_REASON_EDGE_CONFIDENT)
    blocked = verdict.cloud_blocked_reason
    if blocked in CALLER_EXCLUDED_CLOUD:
        # The cloud was never an option: every item is explained by the caller's rule.
        reasons = [blocked] * len(reasons)
    elif blocked is not None:
        for index in wanted:
            reasons[index] = blocked
    escalate = tuple(wanted) if blocked is None and not cloud_already_failed else ()
    return EscalationPlan(
        scores=tuple(float(s) for s in scores.tolist()),
        reasons=tuple(reasons),
        wanted=tuple(wanted),
        escalate=escalate,
        blocked=blocked,
        threshold=threshold,
        policy_version=policy_version,
    )


@dataclass(frozen=True)
class ItemDecision:
    tier: Tier
    reason: Reason
    score: float
    # Row of the cloud answer that serves this item (CLOUD items only).
    cloud_row: int = -1


@dataclass(frozen=True)
class Settlement:
    """Every field of the decision record, derived from one set of facts."""

    items: tuple[ItemDecision, ...]
    degraded: bool
    # Items the cloud should have answered and could not: stored for reconciliation.
    owed: tuple[int, ...]
    data_left_site: bool
    # Items whose data was sent to the cloud (what the cloud bills), answered or not.
    cloud_items_billed: int
    explanation: str
    # The attempt whose answer serves the CLOUD items, if any.
    answered_by: CloudAttempt | None

    @property
    def served_by(self) -> Tier:
        tiers = {item.tier for item in self.items}
        return tiers.pop() if len(tiers) == 1 else routing_pb2.TIER_EDGE_AND_CLOUD

    @property
    def reason(self) -> Reason:
        """The request's reason: the first cloud-served item's, else the first item's."""
        return next((i.reason for i in self.items if i.tier == CLOUD), self.items[0].reason)


@dataclass(frozen=True)
class EdgeFailure:
    detail: str


def settle(
    batch: int,
    constraints: RequestConstraints,
    plan: EscalationPlan | None,
    attempts: Sequence[CloudAttempt],
    *,
    edge_failure: EdgeFailure | None = None,
    hedged: str = "",
) -> Settlement:
    """Each item's tier and reason, and the request's flags, from what happened.

    ``plan`` is None when the edge did not answer (then a cloud attempt answered every
    item, or the request failed before this is called). ``attempts`` in call order.
    ``hedged``: why the cloud was called beside the edge ("" when it was not).
    """
    answered = next((a for a in attempts if a.result is AttemptResult.ANSWERED), None)
    cloud_rows = dict(answered.rows) if answered is not None else {}
    unanswered = [a for a in attempts if a.result is not AttemptResult.ANSWERED]
    failure = next((a for a in unanswered if a.result is not AttemptResult.CANCELLED), None)
    sensitive = constraints.privacy_class == routing_pb2.PRIVACY_CLASS_SENSITIVE
    items: list[ItemDecision] = []
    owed: list[int] = []
    degraded = edge_failure is not None
    for index in range(batch):
        score = plan.scores[index] if plan is not None else 0.0
        planned = plan.reasons[index] if plan is not None else None
        if index in cloud_rows:
            assert answered is not None
            reason = _cloud_reason(answered.purpose, planned)
            items.append(ItemDecision(CLOUD, reason, score, cloud_rows[index]))
            continue
        assert plan is not None and planned is not None, "an item no tier answered"
        wanted = index in plan.wanted
        reason = planned
        if wanted and plan.blocked is None:
            reason = _unserved_reason(failure)
        items.append(ItemDecision(EDGE, reason, score))
        if wanted and reason not in CALLER_CHOSEN and reason not in CLOUD_SERVED_REASONS:
            degraded = True
        if wanted and reason in CLOUD_UNREACHABLE and not sensitive:
            owed.append(index)
    billed = sum(len(a.items_sent) for a in attempts if a.sent)
    settlement = Settlement(
        items=tuple(items),
        degraded=degraded,
        owed=tuple(owed),
        data_left_site=any(a.sent for a in attempts),
        cloud_items_billed=billed,
        explanation="",
        answered_by=answered,
    )
    text = _explain(settlement, plan, attempts, edge_failure, hedged)
    return Settlement(**{**settlement.__dict__, "explanation": text})


def _unserved_reason(failure: CloudAttempt | None) -> Reason:
    """Why an item the cloud was allowed and wanted to serve stayed on the edge."""
    if failure is not None and failure.result is AttemptResult.REFUSED:
        return decision_pb2.DECISION_REASON_CLOUD_BREAKER_OPEN
    if failure is not None and failure.result is AttemptResult.NO_TIME:
        return decision_pb2.DECISION_REASON_DEADLINE_TOO_SHORT
    return decision_pb2.DECISION_REASON_CLOUD_FAILED_EDGE_FALLBACK


def _cloud_reason(purpose: Purpose, planned: Reason | None) -> Reason:
    if purpose is Purpose.CLOUD_ONLY:
        return decision_pb2.DECISION_REASON_PREFERENCE_CLOUD_ONLY
    if purpose is Purpose.EDGE_FALLBACK or planned is None:
        return decision_pb2.DECISION_REASON_EDGE_FAILED_CLOUD_FALLBACK
    return planned  # an escalation (direct or through the hedge): the plan's reason


def _explain(
    settled: Settlement,
    plan: EscalationPlan | None,
    attempts: Sequence[CloudAttempt],
    edge_failure: EdgeFailure | None,
    hedged: str,
) -> str:
    parts: list[str] = []
    if hedged:
        parts.append(f"hedged: cloud called beside the edge ({hedged})")
    cloud_only = next((a for a in attempts if a.purpose is Purpose.CLOUD_ONLY), None)
    if cloud_only is not None:
        parts.append(
            "CLOUD_ONLY requested; the cloud answered"
            if cloud_only.result is AttemptResult.ANSWERED
            else f"CLOUD_ONLY requested but the cloud did not answer ({cloud_only.detail})"
        )
    if edge_failure is not None:
        parts.append(f"edge node failed ({edge_failure.detail}); the cloud answered")
    if plan is not None and not (cloud_only and cloud_only.result is AttemptResult.ANSWERED):
        text = (
            f"escalation score {max(plan.scores):.3f} vs threshold {plan.threshold:.3f} "
            f"(policy {plan.policy_version})"
        )
        if plan.escalate:
            text += f": escalating {len(plan.escalate)} of {len(plan.scores)} item(s)"
        elif plan.blocked is not None and (plan.wanted or plan.blocked in CALLER_EXCLUDED_CLOUD):
            text += f": the cloud may not serve ({decision_pb2.DecisionReason.Name(plan.blocked)})"
        elif cloud_only is None:
            text += ": edge answer kept"
        parts.append(text)
    for attempt in attempts:
        if attempt.purpose in (Purpose.CLOUD_ONLY, Purpose.EDGE_FALLBACK):
            continue
        if attempt.result is AttemptResult.CANCELLED:
            parts.append("hedged cloud call cancelled")
        elif attempt.result is not AttemptResult.ANSWERED and plan is not None and plan.escalate:
            parts.append(f"the cloud did not answer ({attempt.detail}), edge answer kept")
    if settled.owed:
        parts.append(f"{len(settled.owed)} item(s) owed to the cloud")
    return "; ".join(parts)


def edge_first_settlement(plan: EscalationPlan, items_already_sent: int = 0) -> Settlement:
    """The progressive stream's first answer: every item as the edge answered it, before
    the cloud's answer; nothing owed yet. ``items_already_sent``: a hedge already took
    the data out (and is billed), so the first message says so too."""
    return Settlement(
        items=tuple(
            ItemDecision(EDGE, reason, score)
            for reason, score in zip(plan.reasons, plan.scores, strict=True)
        ),
        degraded=False,
        owed=(),
        data_left_site=items_already_sent > 0,
        cloud_items_billed=items_already_sent,
        explanation=(
            f"edge answer first; escalating {len(plan.escalate)} of {len(plan.scores)} "
            f"item(s) (score {max(plan.scores):.3f} vs threshold {plan.threshold:.3f}, "
            f"policy {plan.policy_version})"
        ),
        answered_by=None,
    )
