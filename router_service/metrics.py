"""Router metrics: routes by reason, cloud share, cost and saving against all-cloud,
tier latency, and gauges read at scrape time (breaker state, policy versions)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from opentelemetry import metrics

from hybridmesh.common.v1 import decision_pb2, routing_pb2
from router_service.breaker import BreakerState
from router_service.drain_rate import DrainRateController
from router_service.escalation import ScoringPolicy
from services.rpc_metrics import seconds_histogram

# hybridmesh.router.breaker.state: one number per state, so a dashboard can plot it.
BREAKER_STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class RouterMetrics:
    def __init__(self, meter: metrics.Meter) -> None:
        self._requests = meter.create_counter(
            "hybridmesh.router.requests", description="Routed requests by tier and reason"
        )
        self._items = meter.create_counter(
            "hybridmesh.router.items", description="Routed items by the tier that served them"
        )
        self._cost = meter.create_counter(
            "hybridmesh.router.cost",
            unit="uUSD",
            description="Cost of served requests (shadow=true: shadow checks of kept answers)",
        )
        self._saved = meter.create_counter(
            "hybridmesh.router.saved", unit="uUSD", description="Saving against all-cloud"
        )
        self._latency = seconds_histogram(
            meter,
            "hybridmesh.router.latency",
            "Router latency per request",
        )
        self._tier_latency = seconds_histogram(
            meter,
            "hybridmesh.router.tier.duration",
            "Time spent in each tier's call, as the router saw it (edge, cloud)",
        )
        self._served_items = 0
        self._cloud_items = 0
        meter.create_observable_gauge(
            "hybridmesh.router.cloud_share",
            callbacks=[self._observe_cloud_share],
            description="Share of items served by the cloud since the router started",
        )

    def _observe_cloud_share(self, _options: metrics.CallbackOptions) -> list[metrics.Observation]:
        share = self._cloud_items / self._served_items if self._served_items else 0.0
        return [metrics.Observation(share)]

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
        self._served_items += len(tiers)
        self._cloud_items += sum(1 for tier in tiers if tier == routing_pb2.TIER_CLOUD)
        spent = decision.cost.edge_micros + decision.cost.cloud_micros
        self._cost.add(spent, {"shadow": False})
        self._saved.add(max(decision.cost.all_cloud_micros - spent, 0))
        self._latency.record(decision.timings.total.ToNanoseconds() / 1e9)
        timings = decision.timings
        if timings.HasField("edge"):
            self._tier_latency.record(timings.edge.ToNanoseconds() / 1e9, {"tier": "edge"})
        if timings.HasField("cloud"):
            self._tier_latency.record(timings.cloud.ToNanoseconds() / 1e9, {"tier": "cloud"})

    def record_shadow(self, micros: int, pair: str) -> None:
        """A shadow check's cost: billed, but no request's (router_service/shadow.py)."""
        self._cost.add(micros, {"shadow": True, "pair": pair})


def observe_router_state(
    meter: metrics.Meter,
    breaker_states: Mapping[str, BreakerState],
    policies: Callable[[], Mapping[str, ScoringPolicy]],
) -> None:
    """Gauges read at scrape time: each breaker's state (kept by the breakers' state-change
    callback on the event loop; never read from the breaker in the scrape thread, where
    reading may move it) and each pair's policy version as an info metric."""

    def breakers(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        for target, state in dict(breaker_states).items():
            yield metrics.Observation(BREAKER_STATE_VALUES[state], {"target": target})

    def policy_info(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        for pair, policy in policies().items():
            yield metrics.Observation(
                1, {"pair": pair, "version": policy.version, "kind": policy.metadata.kind}
            )

    meter.create_observable_gauge(
        "hybridmesh.router.breaker.state",
        callbacks=[breakers],
        description="Each tier's circuit breaker: 0 closed, 1 half-open, 2 open",
    )
    meter.create_observable_gauge(
        "hybridmesh.router.policy.info",
        callbacks=[policy_info],
        description="The router policy version each pair is served with (value 1)",
    )


def observe_drain_rate(meter: metrics.Meter, controller: DrainRateController) -> None:
    """The outbox drain's adaptive rate state, read at scrape time (plain numbers the
    controller keeps; reading them changes nothing)."""

    def gauge(name: str, unit: str, read: Callable[[], float], description: str) -> None:
        meter.create_observable_gauge(
            name,
            unit=unit,
            callbacks=[lambda _options: [metrics.Observation(read())]],
            description=description,
        )

    gauge(
        "hybridmesh.outbox.drain.rate",
        "1/s",
        lambda: controller.rate_per_s,
        "Reconciliation calls per second the drain allows now (adaptive, AIMD)",
    )
    gauge(
        "hybridmesh.outbox.drain.latency",
        "s",
        lambda: controller.latency_s,
        "Median reconciliation latency of the drain's last decided window",
    )
    gauge(
        "hybridmesh.outbox.drain.latency_baseline",
        "s",
        lambda: controller.baseline_s,
        "Lowest recent window median: the drain slows above tolerance x this",
    )

    def counter(name: str, read: Callable[[], int], description: str) -> None:
        meter.create_observable_counter(
            name,
            callbacks=[lambda _options: [metrics.Observation(read())]],
            description=description,
        )

    counter(
        "hybridmesh.outbox.drain.pushbacks",
        lambda: controller.pushbacks,
        "Reconciliation calls the cloud shed (RESOURCE_EXHAUSTED)",
    )
    counter(
        "hybridmesh.outbox.drain.decreases",
        lambda: controller.decreases,
        "Times the drain rate was cut (latency over target, timeout or pushback)",
    )
