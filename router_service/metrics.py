"""Router metrics: routes by reason, cloud share, cost and saving against all-cloud."""

from __future__ import annotations

from opentelemetry import metrics

from hybridmesh.common.v1 import decision_pb2, routing_pb2


class RouterMetrics:
    def __init__(self, meter: metrics.Meter) -> None:
        self._requests = meter.create_counter(
            "hybridmesh.router.requests", description="Routed requests by tier and reason"
        )
        self._items = meter.create_counter(
            "hybridmesh.router.items", description="Routed items by the tier that served them"
        )
        self._cost = meter.create_counter(
            "hybridmesh.router.cost", unit="uUSD", description="Cost of served requests"
        )
        self._saved = meter.create_counter(
            "hybridmesh.router.saved", unit="uUSD", description="Saving against all-cloud"
        )
        self._latency = meter.create_histogram(
            "hybridmesh.router.latency", unit="s", description="Router latency per request"
        )

    def record(
        self, decision: decision_pb2.Decision, tiers: list[routing_pb2.Tier.ValueType]
    ) -> None:
        attributes: dict[str, str | bool] = {
            "served_by": routing_pb2.Tier.Name(decision.served_by),
            "reason": decision_pb2.DecisionReason.Name(decision.reason),
            "degraded": decision.degraded,
            "policy_version": decision.policy_version,
        }
        self._requests.add(1, attributes)
        for tier in tiers:
            self._items.add(1, {"served_by": routing_pb2.Tier.Name(tier)})
        spent = decision.cost.edge_micros + decision.cost.cloud_micros
        self._cost.add(spent)
        self._saved.add(max(decision.cost.all_cloud_micros - spent, 0))
        self._latency.record(decision.timings.total.ToNanoseconds() / 1e9)
