"""router_service.breaker: the resilience spec, driven by a fake clock (pure logic)."""

from __future__ import annotations

import grpc
import pytest

from router_service.breaker import (
    BreakerConfig,
    BreakerState,
    CallOutcome,
    CircuitBreaker,
    outcome_of,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _state(breaker: CircuitBreaker) -> BreakerState:
    # A call, not the property: mypy would narrow the property across calls.
    return breaker.state


def call_once(breaker: CircuitBreaker, outcome: CallOutcome, duration_s: float = 0.01) -> bool:
    permit = breaker.try_acquire()
    if permit is not None:
        breaker.record(permit, outcome, duration_s)
    return permit is not None


def test_failure_codes_follow_the_spec() -> None:
    for code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "RESOURCE_EXHAUSTED"):
        assert outcome_of(grpc.StatusCode[code]) is CallOutcome.FAILURE, code
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED"):
        assert outcome_of(grpc.StatusCode[code]) is CallOutcome.IGNORED, code
    assert outcome_of(grpc.StatusCode.OK) is CallOutcome.SUCCESS


def test_stays_closed_below_minimum_calls(clock: FakeClock) -> None:
    config = BreakerConfig(consecutive_failures_to_open=1000)
    breaker = CircuitBreaker("cloud", config, clock)
    for _ in range(config.minimum_calls - 1):
        call_once(breaker, CallOutcome.FAILURE)
    assert _state(breaker) is BreakerState.CLOSED


def test_opens_at_half_failures_once_minimum_calls_reached(clock: FakeClock) -> None:
    breaker = CircuitBreaker("cloud", BreakerConfig(consecutive_failures_to_open=1000), clock)
    for _ in range(10):
        call_once(breaker, CallOutcome.SUCCESS)
    for _ in range(9):
        call_once(breaker, CallOutcome.FAILURE)
    assert _state(breaker) is BreakerState.CLOSED  # 9 of 19: below the minimum anyway
    call_once(breaker, CallOutcome.FAILURE)
    assert _state(breaker) is BreakerState.OPEN  # 10 of 20 = 50 %
    assert breaker.try_acquire() is None


def test_49_percent_failures_keep_it_closed(clock: FakeClock) -> None:
    breaker = CircuitBreaker("cloud", BreakerConfig(consecutive_failures_to_open=1000), clock)
    for _ in range(51):
        call_once(breaker, CallOutcome.SUCCESS)
    for _ in range(49):
        call_once(breaker, CallOutcome.FAILURE)
    assert _state(breaker) is BreakerState.CLOSED


def test_opens_on_slow_calls(clock: FakeClock) -> None:
    breaker = CircuitBreaker("cloud", BreakerConfig(slow_call_s=0.2), clock)
    for index in range(20):
        call_once(breaker, CallOutcome.SUCCESS, 0.5 if index < 16 else 0.01)
    assert _state(breaker) is BreakerState.OPEN


def test_consecutive_failures_open_despite_a_window_of_successes(clock: FakeClock) -> None:
    breaker = CircuitBreaker("cloud", BreakerConfig(), clock)
    for _ in range(200):
        call_once(breaker, CallOutcome.SUCCESS)
    for _ in range(4):
        call_once(breaker, CallOutcome.FAILURE)
    assert _state(breaker) is BreakerState.CLOSED
    call_once(breaker, CallOutcome.FAILURE)
    assert _state(breaker) is BreakerState.OPEN


def test_old_calls_leave_the_window(clock: FakeClock) -> None:
    breaker = CircuitBreaker("cloud", BreakerConfig(consecutive_failures_to_open=1000), clock)
    for _ in range(15):
        call_once(breaker, CallOutcome.FAILURE)
        call_once(breaker, CallOutcome.SUCCESS)
        clock.advance(0.0)
    assert _state(breaker) is BreakerState.OPEN
    # Fresh breaker: failures older than the window no longer count.
    breaker = CircuitBreaker("cloud", BreakerConfig(consecutive_failures_to_open=1000), clock)
    for _ in range(19):
        call_once(breaker, CallOutcome.FAILURE)
        call_once(breaker, CallOutcome.SUCCESS)
        call_once(breaker, CallOutcome.SUCCESS)
    clock.advance(11)
    for _ in range(19):
        call_once(breaker, CallOutcome.SUCCESS)
    call_once(breaker, CallOutcome.FAILURE)
    assert _state(breaker) is BreakerState.CLOSED


def test_caller_errors_are_ignored(clock: FakeClock) -> None:
    breaker = CircuitBreaker("cloud", BreakerConfig(), clock)
    for _ in range(100):
        call_once(breaker, CallOutcome.IGNORED)
    assert _state(breaker) is BreakerState.CLOSED


def test_half_open_after_the_open_period_then_closes_after_three_probes(
    clock: FakeClock,
) -> None:
    transitions: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        "cloud", BreakerConfig(), clock, lambda _n, old, new: transitions.append((old, new))
    )
    for _ in range(5):
        call_once(breaker, CallOutcome.FAILURE)
    assert _state(breaker) is BreakerState.OPEN
    clock.advance(4.9)
    assert breaker.try_acquire() is None
    clock.advance(0.2)
    assert _state(breaker) is BreakerState.HALF_OPEN
    # Three probes at once, no fourth.
    permits = [breaker.try_acquire() for _ in range(4)]
    assert [permit is not None for permit in permits] == [True, True, True, False]
    for permit in permits[:3]:
        assert permit is not None
        breaker.record(permit, CallOutcome.SUCCESS, 0.01)
    assert _state(breaker) is BreakerState.CLOSED
    assert transitions == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_open_period_doubles_on_consecutive_reopens_up_to_the_cap(clock: FakeClock) -> None:
    breaker = CircuitBreaker("cloud", BreakerConfig(), clock)
    for _ in range(5):
        call_once(breaker, CallOutcome.FAILURE)
    periods = []
    for _ in range(6):
        periods.append(breaker.remaining_open_s())
        clock.advance(breaker.remaining_open_s())
        assert call_once(breaker, CallOutcome.FAILURE)  # a probe in half-open fails: re-open
    assert periods == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    # Recovery resets the backoff.
    clock.advance(breaker.remaining_open_s())
    for _ in range(3):
        assert call_once(breaker, CallOutcome.SUCCESS)
    assert _state(breaker) is BreakerState.CLOSED
    for _ in range(5):
        call_once(breaker, CallOutcome.FAILURE)
    assert breaker.remaining_open_s() == 5.0


def test_slow_probe_reopens(clock: FakeClock) -> None:
    breaker = CircuitBreaker("cloud", BreakerConfig(slow_call_s=0.1), clock)
    for _ in range(5):
        call_once(breaker, CallOutcome.FAILURE)
    clock.advance(5)
    assert call_once(breaker, CallOutcome.SUCCESS, 0.3)
    assert _state(breaker) is BreakerState.OPEN


def test_ignored_probe_returns_its_slot(clock: FakeClock) -> None:
    breaker = CircuitBreaker("cloud", BreakerConfig(), clock)
    for _ in range(5):
        call_once(breaker, CallOutcome.FAILURE)
    clock.advance(5)
    probes = [breaker.try_acquire() for _ in range(3)]
    assert all(probe is not None and probe.probe for probe in probes)
    assert breaker.try_acquire() is None
    assert probes[0] is not None
    breaker.record(probes[0], CallOutcome.IGNORED)
    assert breaker.try_acquire() is not None
