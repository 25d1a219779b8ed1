"""Hard routing policy: what the constraints of a request allow, before any model runs.

Pure: takes the request's hints and a snapshot of the situation (deadline left, cloud
latency, breaker, prices) and says which tiers may serve it. The learned classifier
only ever chooses among what this allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from hybridmesh.common.v1 import decision_pb2, routing_pb2
from services.errors import FailedPreconditionError, InvalidArgumentError

Reason: TypeAlias = decision_pb2.DecisionReason.ValueType
# Built once: the enums' ``values()`` makes a new list on every call.
_PRIVACY_CLASSES = frozenset(routing_pb2.PrivacyClass.values())
_PREFERENCES = frozenset(routing_pb2.RoutePreference.values())


@dataclass(frozen=True)
class RequestConstraints:
    """The caller's hints, with UNSPECIFIED resolved to the documented defaults."""

    privacy_class: routing_pb2.PrivacyClass.ValueType
    preference: routing_pb2.RoutePreference.ValueType
    max_cost_micros: int | None
    max_error_probability: float | None

    @classmethod
    def from_hints(cls, hints: routing_pb2.RoutingHints) -> RequestConstraints:
        privacy = hints.privacy_class or routing_pb2.PRIVACY_CLASS_INTERNAL
        if privacy not in _PRIVACY_CLASSES:
            raise InvalidArgumentError(f"unknown value {privacy}", field="hints.privacy_class")
        preference = hints.preference or routing_pb2.ROUTE_PREFERENCE_AUTO
        if preference not in _PREFERENCES:
            raise InvalidArgumentError(f"unknown value {preference}", field="hints.preference")
        max_cost = hints.max_cost_micros if hints.HasField("max_cost_micros") else None
        if max_cost is not None and max_cost < 0:
            raise InvalidArgumentError("must not be negative", field="hints.max_cost_micros")
        max_error = hints.max_error_probability if hints.HasField("max_error_probability") else None
        if max_error is not None and not 0.0 <= max_error <= 1.0:
            raise InvalidArgumentError("must be within [0, 1]", field="hints.max_error_probability")
        if (
            privacy == routing_pb2.PRIVACY_CLASS_SENSITIVE
            and preference == routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY
        ):
            raise FailedPreconditionError(
                "CLOUD_ONLY is impossible for SENSITIVE data, which never leaves the site",
                field="hints.preference",
            )
        return cls(privacy, preference, max_cost, max_error)

    @property
    def requires_anonymiser(self) -> bool:
        return self.privacy_class == routing_pb2.PRIVACY_CLASS_INTERNAL


@dataclass(frozen=True)
class Situation:
    """What the router knows right now about time, the cloud and money."""

    remaining_budget_s: float
    # Rolling p95 of cloud calls (None until enough calls were seen).
    cloud_p95_s: float | None
    # Read without taking a half-open probe slot; the slot is taken at call time.
    cloud_breaker_open: bool
    cloud_cost_micros: int


@dataclass(frozen=True)
class PolicyVerdict:
    """Whether the cloud may serve and, if not, why. The edge may always answer: it is
    where the data already is. A CLOUD_ONLY request whose cloud is blocked (cost,
    deadline, breaker) is answered by the edge and marked degraded by the router."""

    cloud_blocked_reason: Reason | None
    # CLOUD_ONLY and allowed: go to the cloud without running the edge first.
    cloud_first: bool

    @property
    def cloud_allowed(self) -> bool:
        return self.cloud_blocked_reason is None


def evaluate(constraints: RequestConstraints, situation: Situation) -> PolicyVerdict:
    """First matching rule wins, most binding first: privacy, preference, cost, time, health."""
    blocked: Reason | None = None
    if constraints.privacy_class == routing_pb2.PRIVACY_CLASS_SENSITIVE:
        blocked = decision_pb2.DECISION_REASON_PRIVACY_SENSITIVE
    elif constraints.preference == routing_pb2.ROUTE_PREFERENCE_EDGE_ONLY:
        blocked = decision_pb2.DECISION_REASON_PREFERENCE_EDGE_ONLY
    elif (
        constraints.max_cost_micros is not None
        and situation.cloud_cost_micros > constraints.max_cost_micros
    ):
        blocked = decision_pb2.DECISION_REASON_COST_CEILING
    elif situation.cloud_p95_s is not None and situation.remaining_budget_s < situation.cloud_p95_s:
        blocked = decision_pb2.DECISION_REASON_DEADLINE_TOO_SHORT
    elif situation.cloud_breaker_open:
        blocked = decision_pb2.DECISION_REASON_CLOUD_BREAKER_OPEN
    cloud_first = (
        blocked is None and constraints.preference == routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY
    )
    return PolicyVerdict(cloud_blocked_reason=blocked, cloud_first=cloud_first)
