"""An open breaker follows the target's own health: when the cloud reports SERVING again,
the router probes it at once instead of waiting out the (doubling) open period.

The router, the edge node and their gRPC health protocol are real. The "cloud" here is a
real gRPC server that serves only grpc.health.v1 (flipped by the test), because the
router's health watch is the only thing this test exercises; the whole recovery under
load, with the real cloud process killed and restarted, is in ``make bench``.
"""

from __future__ import annotations

from edge_node.app import EdgeNode
from router_service.app import RouterNode, pairs_from_catalog
from router_service.breaker import BreakerState, CallOutcome, CircuitBreaker
from services.telemetry import create_telemetry
from tests.helpers.edge_node import edge_settings
from tests.helpers.router_node import router_settings
from tests.helpers.scripted_tiers import CLOUD_SERVICE, start_health_only_cloud
from tests.helpers.waiting import eventually


def state_of(breaker: CircuitBreaker) -> BreakerState:
    # A call, not the property: mypy would narrow the property across awaits.
    return breaker.state


async def test_an_open_cloud_breaker_half_opens_when_the_cloud_is_healthy_again() -> None:
    edge = EdgeNode(edge_settings(), create_telemetry("edge", export_otlp=False))
    await edge.start()
    cloud = await start_health_only_cloud()
    settings = router_settings(edge.host.address, cloud.address)
    router = RouterNode(
        settings,
        create_telemetry("router", export_otlp=False),
        pairs_from_catalog(settings.catalog),
    )
    await router.start()
    breaker = router.router.cloud.breaker
    try:
        await eventually(lambda: router.tier_up["cloud"])
        for _ in range(breaker.config.consecutive_failures_to_open):
            permit = breaker.try_acquire()
            assert permit is not None
            breaker.record(permit, CallOutcome.FAILURE)
        assert state_of(breaker) is BreakerState.OPEN
        assert breaker.remaining_open_s() > 4.0
        await cloud.set_serving(CLOUD_SERVICE, False)
        await eventually(lambda: not router.tier_up["cloud"])
        # Known down: the health watch has seen it down twice and told the breaker so.
        await eventually(lambda: router.router.cloud.health.known_down)
        assert state_of(breaker) is BreakerState.OPEN, "down: the breaker stays open"
        await cloud.set_serving(CLOUD_SERVICE, True)
        await eventually(lambda: router.tier_up["cloud"], timeout_s=3.0)
        assert state_of(breaker) is BreakerState.HALF_OPEN, "healthy again: probe now"
    finally:
        await router.stop(0)
        await cloud.stop(0)
        await edge.stop(0)
