"""router_service.breaker: the resilience spec, driven by a fake clock (pure logic)."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from pydantic import ValidationError

from router_service.breaker import (
    BreakerConfig,
    BreakerState,
    CallOutcome,
    CircuitBreaker,
    Permit,
    outcome_of,
)
from router_service.config import CloudBreakerSettings, EdgeBreakerSettings, RouterSettings
from router_service.tier_api import TierUnavailableError
from router_service.tiers import guarded_call
from tests.helpers.breaker import FakeClock, call_once


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _state(breaker: CircuitBreaker) -> BreakerState:
    # A call, not the property: mypy would narrow the property across calls.
    return breaker.state


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


# --- Epochs: an outcome counts only in the state that admitted its call -----------------


def _tripped(clock: FakeClock) -> tuple[CircuitBreaker, list[Permit]]:
    """Three slow calls admitted while CLOSED are still in flight when five failures open
    the breaker and the health check half-opens it (the field fault, issue 15)."""
    breaker = CircuitBreaker("cloud", BreakerConfig(), clock)
    stale = [breaker.try_acquire() for _ in range(3)]
    for _ in range(5):
        call_once(breaker, CallOutcome.FAILURE)
    clock.advance(0.5)
    breaker.health_restored()
    assert _state(breaker) is BreakerState.HALF_OPEN
    return breaker, [permit for permit in stale if permit is not None]


def test_stale_successes_do_not_close_a_half_open_breaker(clock: FakeClock) -> None:
    breaker, stale = _tripped(clock)
    for permit in stale:
        breaker.record(permit, CallOutcome.SUCCESS, 0.4)
    assert _state(breaker) is BreakerState.HALF_OPEN  # no probe has been sent yet
    for _ in range(breaker.config.half_open_probes):
        assert call_once(breaker, CallOutcome.SUCCESS)
    assert _state(breaker) is BreakerState.CLOSED  # its own probes close it


def test_stale_outcomes_free_no_probe_slots(clock: FakeClock) -> None:
    breaker, stale = _tripped(clock)
    probes = [breaker.try_acquire() for _ in range(3)]
    assert all(probe is not None and probe.probe for probe in probes)
    for permit in stale:
        breaker.record(permit, CallOutcome.IGNORED)  # e.g. cancelled
    extra = sum(breaker.try_acquire() is not None for _ in range(10))
    assert extra == 0
    assert breaker.probes_in_flight == 3


def test_a_stale_failure_does_not_reopen_a_half_open_breaker(clock: FakeClock) -> None:
    breaker, stale = _tripped(clock)
    period, epoch = breaker.open_for_s, breaker.epoch
    breaker.record(stale[0], CallOutcome.FAILURE, 0.01)
    assert _state(breaker) is BreakerState.HALF_OPEN
    assert breaker.open_for_s == period == 5.0
    assert breaker.epoch == epoch


def test_a_stale_probe_failure_from_an_earlier_half_open_is_ignored(clock: FakeClock) -> None:
    breaker = CircuitBreaker("cloud", BreakerConfig(), clock)
    for _ in range(5):
        call_once(breaker, CallOutcome.FAILURE)
    clock.advance(5)
    late_probe, failing_probe = breaker.try_acquire(), breaker.try_acquire()
    assert late_probe is not None and failing_probe is not None
    breaker.record(failing_probe, CallOutcome.FAILURE)  # re-opens: 10 s next time
    assert _state(breaker) is BreakerState.OPEN
    assert breaker.open_for_s == 10.0
    clock.advance(10)
    assert _state(breaker) is BreakerState.HALF_OPEN  # a new half-open epoch
    breaker.record(late_probe, CallOutcome.FAILURE)  # from the previous half-open
    assert _state(breaker) is BreakerState.HALF_OPEN
    assert breaker.open_for_s == 10.0  # not doubled
    assert breaker.probes_in_flight == 0
    # And the real probe failing does double it once.
    assert call_once(breaker, CallOutcome.FAILURE)
    assert breaker.remaining_open_s() == 20.0


def test_stale_outcomes_do_not_count_in_a_later_closed_window(clock: FakeClock) -> None:
    config = BreakerConfig(minimum_calls=4, consecutive_failures_to_open=3)
    breaker = CircuitBreaker("cloud", config, clock)
    stale = [breaker.try_acquire() for _ in range(6)]
    for _ in range(3):
        call_once(breaker, CallOutcome.FAILURE)  # opens (epoch 1)
    clock.advance(5)
    for _ in range(3):
        assert call_once(breaker, CallOutcome.SUCCESS)  # probes close it (epoch 3)
    assert _state(breaker) is BreakerState.CLOSED
    call_once(breaker, CallOutcome.FAILURE)
    call_once(breaker, CallOutcome.SUCCESS)
    # From the first CLOSED epoch: counted, these successes would dilute the window and
    # the failures be three in a row (open). Neither counts.
    for permit in stale[:2]:
        assert permit is not None
        breaker.record(permit, CallOutcome.SUCCESS, 0.01)
    for permit in stale[2:5]:
        assert permit is not None
        breaker.record(permit, CallOutcome.FAILURE, 0.01)
    assert _state(breaker) is BreakerState.CLOSED
    call_once(breaker, CallOutcome.FAILURE)
    assert _state(breaker) is BreakerState.CLOSED  # 2 of 3 fresh calls: below minimum
    call_once(breaker, CallOutcome.SUCCESS)
    assert _state(breaker) is BreakerState.OPEN  # 2 of 4 fresh calls failed: 50 %


def test_every_transition_starts_a_new_epoch(clock: FakeClock) -> None:
    breaker = CircuitBreaker("cloud", BreakerConfig(), clock)
    assert breaker.epoch == 0
    for _ in range(5):
        call_once(breaker, CallOutcome.FAILURE)
    assert breaker.epoch == 1  # OPEN
    clock.advance(5)
    assert breaker.epoch == 2  # HALF_OPEN (the open period ran out)
    for _ in range(3):
        call_once(breaker, CallOutcome.SUCCESS)
    assert breaker.epoch == 3  # CLOSED


# --- Background work and half-open probes --------------------------------------------


def test_background_work_is_refused_while_half_open(clock: FakeClock) -> None:
    breaker = CircuitBreaker("cloud", BreakerConfig(), clock)
    background = breaker.try_acquire(background=True)
    assert background is not None and not background.probe  # CLOSED: allowed
    for _ in range(5):
        call_once(breaker, CallOutcome.FAILURE)
    assert breaker.try_acquire(background=True) is None  # OPEN
    clock.advance(5)
    for _ in range(10):
        assert breaker.try_acquire(background=True) is None  # HALF_OPEN
    assert breaker.probes_in_flight == 0  # refusals take no slot
    probes = [breaker.try_acquire() for _ in range(3)]
    assert all(probe is not None and probe.probe for probe in probes)
    for probe in probes:
        assert probe is not None
        breaker.record(probe, CallOutcome.SUCCESS, 0.01)
    assert breaker.try_acquire(background=True) is not None  # CLOSED again


def test_never_more_probes_in_flight_than_allowed_whatever_the_interleaving() -> None:
    """A seeded random walk over acquisitions (live and background), records of any
    outstanding permit (stale or not) with any outcome, clock steps and health
    checks. (hypothesis is not installed here; 300 walks of 200 steps instead.)"""
    outcomes = list(CallOutcome)
    for seed in range(300):
        rng = random.Random(seed)
        clock = FakeClock()
        probes = rng.randint(1, 4)
        config = BreakerConfig(
            minimum_calls=4, consecutive_failures_to_open=3, half_open_probes=probes
        )
        breaker = CircuitBreaker("cloud", config, clock)
        outstanding: list[Permit] = []
        for _ in range(200):
            action = rng.random()
            before_state, before_epoch = _state(breaker), breaker.epoch
            recorded: Permit | None = None
            if action < 0.4:
                permit = breaker.try_acquire(background=rng.random() < 0.3)
                if permit is not None:
                    outstanding.append(permit)
            elif action < 0.8 and outstanding:
                recorded = outstanding.pop(rng.randrange(len(outstanding)))
                breaker.record(recorded, rng.choice(outcomes), rng.choice([0.01, 1.0]))
            elif action < 0.9:
                clock.advance(rng.choice([0.5, 5.0, 30.0]))
            else:
                breaker.health_restored()
            current = breaker.epoch
            live_probes = [p for p in outstanding if p.probe and p.epoch == current]
            assert len(live_probes) <= probes, seed
            assert breaker.probes_in_flight == len(live_probes), seed
            if before_state is BreakerState.HALF_OPEN and _state(breaker) is not before_state:
                # Only a probe admitted in this half-open epoch decides it.
                assert recorded is not None and recorded.probe, seed
                assert recorded.epoch == before_epoch, seed


# --- guarded_call: the tier call path uses permits ---------------------------------------


async def test_guarded_refuses_background_work_while_half_open(clock: FakeClock) -> None:
    breaker = CircuitBreaker("cloud", BreakerConfig(), clock)
    for _ in range(5):
        call_once(breaker, CallOutcome.FAILURE)
    clock.advance(5)
    sent: list[bool] = []

    async def send() -> str:
        sent.append(True)
        return "answer"

    with pytest.raises(TierUnavailableError, match="half-open"):
        await guarded_call("cloud", breaker, send, background=True)
    assert sent == []
    assert (await guarded_call("cloud", breaker, send))[0] == "answer"  # a live probe goes


async def test_guarded_returns_a_cancelled_probe_slot(clock: FakeClock) -> None:
    breaker = CircuitBreaker("cloud", BreakerConfig(half_open_probes=1), clock)
    for _ in range(5):
        call_once(breaker, CallOutcome.FAILURE)
    clock.advance(5)
    started = asyncio.Event()

    async def hang() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    task = asyncio.create_task(guarded_call("cloud", breaker, hang))
    await started.wait()
    assert breaker.probes_in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.probes_in_flight == 0
    assert _state(breaker) is BreakerState.HALF_OPEN


# --- Settings ------------------------------------------------------------------------


def test_breaker_settings_default_to_the_spec_per_tier() -> None:
    settings = RouterSettings()
    assert settings.breaker_edge.config() == BreakerConfig(slow_call_s=0.1)
    assert settings.breaker_cloud.config() == BreakerConfig(slow_call_s=0.5)


def test_breaker_settings_from_env_keep_the_tier_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HYBRIDMESH_ROUTER_BREAKER_EDGE__WINDOW_S", "5")
    monkeypatch.setenv("HYBRIDMESH_ROUTER_BREAKER_CLOUD__HALF_OPEN_PROBES", "1")
    monkeypatch.setenv("HYBRIDMESH_ROUTER_BREAKER_CLOUD__SLOW_CALL_S", "0.3")
    settings = RouterSettings()
    assert settings.breaker_edge.window_s == 5.0
    assert settings.breaker_edge.slow_call_s == 0.1  # the edge's default, not the cloud's
    assert settings.breaker_cloud.half_open_probes == 1
    assert settings.breaker_cloud.slow_call_s == 0.3


@pytest.mark.parametrize(
    "overrides",
    [
        {"failure_rate_to_open": 0.0},
        {"failure_rate_to_open": 1.5},
        {"slow_call_rate_to_open": 0.0},
        {"window_s": 0.0},
        {"slow_call_s": -1.0},
        {"open_base_s": 0.0},
        {"open_base_s": 10.0, "open_max_s": 5.0},
        {"half_open_probes": 0},
        {"minimum_calls": 0},
        {"consecutive_failures_to_open": 0},
    ],
)
def test_invalid_breaker_thresholds_are_refused(overrides: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        CloudBreakerSettings(**overrides)
    with pytest.raises(ValueError):
        BreakerConfig(**overrides)  # type: ignore[arg-type]


def test_a_rate_of_one_and_a_cap_equal_to_the_base_are_valid() -> None:
    settings = EdgeBreakerSettings(failure_rate_to_open=1.0, open_base_s=5.0, open_max_s=5.0)
    assert settings.config().failure_rate_to_open == 1.0


def test_the_deprecated_permitless_api_still_counts_outcomes_only_in_their_epoch() -> None:
    """allow_request()/record(outcome) (no permit): outcomes settle the oldest admission,
    so calls admitted while CLOSED and finished after a re-open change nothing."""
    clock = FakeClock()
    breaker = CircuitBreaker("cloud", BreakerConfig(), clock=clock)
    stale = [breaker.allow_request() for _ in range(3)]
    assert all(stale)
    for _ in range(5):
        assert breaker.allow_request()
        breaker.record(CallOutcome.FAILURE, 0.01)
    assert breaker.state is BreakerState.OPEN
    breaker.health_restored()
    for _ in stale:
        breaker.record(CallOutcome.SUCCESS, 0.4)
    assert breaker.state.value == "half_open"  # (not narrowed: state changes)
    assert sum(breaker.allow_request() for _ in range(10)) == 3  # only the probes
    for _ in range(3):
        breaker.record(CallOutcome.SUCCESS, 0.01)
    assert breaker.state.value == "closed"
