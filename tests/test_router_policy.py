"""router_service.policy: hard rules, pure, no sockets."""

from __future__ import annotations

import pytest

from hybridmesh.common.v1 import decision_pb2, routing_pb2
from router_service.policy import RequestConstraints, Situation, evaluate
from services.errors import FailedPreconditionError, InvalidArgumentError

CALM = Situation(
    remaining_budget_s=1.0, cloud_p95_s=0.05, cloud_breaker_open=False, cloud_cost_micros=1500
)


def _constraints(**hints: object) -> RequestConstraints:
    return RequestConstraints.from_hints(routing_pb2.RoutingHints(**hints))  # type: ignore[arg-type]


def test_unspecified_hints_mean_internal_and_auto() -> None:
    constraints = _constraints()
    assert constraints.privacy_class == routing_pb2.PRIVACY_CLASS_INTERNAL
    assert constraints.preference == routing_pb2.ROUTE_PREFERENCE_AUTO
    assert constraints.requires_anonymiser
    assert constraints.max_cost_micros is None and constraints.max_error_probability is None
    verdict = evaluate(constraints, CALM)
    assert verdict.cloud_allowed and not verdict.cloud_first


@pytest.mark.parametrize(
    ("hints", "situation", "reason"),
    [
        (
            {"privacy_class": routing_pb2.PRIVACY_CLASS_SENSITIVE},
            CALM,
            decision_pb2.DECISION_REASON_PRIVACY_SENSITIVE,
        ),
        (
            {"preference": routing_pb2.ROUTE_PREFERENCE_EDGE_ONLY},
            CALM,
            decision_pb2.DECISION_REASON_PREFERENCE_EDGE_ONLY,
        ),
        ({"max_cost_micros": 1499}, CALM, decision_pb2.DECISION_REASON_COST_CEILING),
        (
            {},
            Situation(0.04, 0.05, cloud_breaker_open=False, cloud_cost_micros=1500),
            decision_pb2.DECISION_REASON_DEADLINE_TOO_SHORT,
        ),
        (
            {},
            Situation(1.0, 0.05, cloud_breaker_open=True, cloud_cost_micros=1500),
            decision_pb2.DECISION_REASON_CLOUD_BREAKER_OPEN,
        ),
        (
            # Privacy outranks everything else that also applies.
            {"privacy_class": routing_pb2.PRIVACY_CLASS_SENSITIVE, "max_cost_micros": 0},
            Situation(0.0, 0.05, cloud_breaker_open=True, cloud_cost_micros=1500),
            decision_pb2.DECISION_REASON_PRIVACY_SENSITIVE,
        ),
    ],
)
def test_each_rule_blocks_the_cloud_with_its_reason(
    hints: dict[str, object], situation: Situation, reason: int
) -> None:
    verdict = evaluate(_constraints(**hints), situation)
    assert not verdict.cloud_allowed
    assert verdict.cloud_blocked_reason == reason
    assert not verdict.cloud_first


def test_cost_ceiling_equal_to_price_allows_the_cloud() -> None:
    assert evaluate(_constraints(max_cost_micros=1500), CALM).cloud_allowed


def test_unknown_p95_does_not_block() -> None:
    situation = Situation(0.001, None, cloud_breaker_open=False, cloud_cost_micros=1)
    assert evaluate(_constraints(), situation).cloud_allowed


def test_cloud_only_goes_cloud_first_unless_blocked() -> None:
    cloud_only = _constraints(
        preference=routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY,
        privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC,
    )
    assert evaluate(cloud_only, CALM).cloud_first
    assert not cloud_only.requires_anonymiser
    open_breaker = Situation(1.0, 0.05, cloud_breaker_open=True, cloud_cost_micros=1500)
    verdict = evaluate(cloud_only, open_breaker)
    assert not verdict.cloud_first
    assert verdict.cloud_blocked_reason == decision_pb2.DECISION_REASON_CLOUD_BREAKER_OPEN


def test_sensitive_cloud_only_is_refused_naming_the_field() -> None:
    with pytest.raises(FailedPreconditionError) as refused:
        _constraints(
            privacy_class=routing_pb2.PRIVACY_CLASS_SENSITIVE,
            preference=routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY,
        )
    assert refused.value.field == "hints.preference"


@pytest.mark.parametrize(
    ("hints", "field"),
    [
        ({"privacy_class": 42}, "hints.privacy_class"),
        ({"preference": 17}, "hints.preference"),
        ({"max_cost_micros": -1}, "hints.max_cost_micros"),
        ({"max_error_probability": 1.5}, "hints.max_error_probability"),
    ],
)
def test_bad_hints_are_invalid_arguments_naming_the_field(
    hints: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as invalid:
        _constraints(**hints)
    assert invalid.value.field == field
