"""An open breaker and the target's own health check: recovery without waiting out the
open period, while the probes still decide."""

from __future__ import annotations

from router_service.breaker import BreakerConfig, BreakerState, CallOutcome, CircuitBreaker
from tests.helpers.breaker import FakeClock, call_once


def state_of(breaker: CircuitBreaker) -> BreakerState:
    # A call, not the property: mypy would narrow the property across calls.
    return breaker.state


def opened(clock: FakeClock, opens: int) -> CircuitBreaker:
    """A breaker opened ``opens`` times in a row (its open period doubled each time)."""
    breaker = CircuitBreaker(
        "cloud", BreakerConfig(consecutive_failures_to_open=2, open_base_s=5.0), clock
    )
    for index in range(opens):
        if index:
            clock.advance(breaker.open_for_s)
            assert call_once(breaker, CallOutcome.FAILURE)  # a half-open probe
        else:
            for _ in range(2):
                assert call_once(breaker, CallOutcome.FAILURE)
    assert state_of(breaker) is BreakerState.OPEN
    return breaker


def test_health_restored_half_opens_an_open_breaker_at_once() -> None:
    clock = FakeClock()
    breaker = opened(clock, opens=3)
    assert breaker.remaining_open_s() == 20.0  # 5 s doubled twice
    breaker.health_restored()
    assert state_of(breaker) is BreakerState.HALF_OPEN
    for _ in range(breaker.config.half_open_probes):
        assert call_once(breaker, CallOutcome.SUCCESS, 0.01)
    assert state_of(breaker) is BreakerState.CLOSED


def test_a_failed_probe_after_health_restored_reopens_for_longer() -> None:
    clock = FakeClock()
    breaker = opened(clock, opens=2)
    breaker.health_restored()
    assert call_once(breaker, CallOutcome.FAILURE)
    assert state_of(breaker) is BreakerState.OPEN
    assert breaker.remaining_open_s() == 20.0


def test_health_restored_leaves_closed_and_half_open_breakers_alone() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("cloud", BreakerConfig(), clock)
    breaker.health_restored()
    assert state_of(breaker) is BreakerState.CLOSED
    breaker = opened(clock, opens=1)
    clock.advance(breaker.open_for_s)
    assert state_of(breaker) is BreakerState.HALF_OPEN
    assert breaker.try_acquire() is not None
    breaker.health_restored()  # does not hand out a second set of probe slots
    allowed = sum(breaker.try_acquire() is not None for _ in range(10))
    assert allowed == breaker.config.half_open_probes - 1
