"""The outbox's adaptive drain rate (router_service.drain_rate) on scripted latency and
pushback streams, with a fake clock: AIMD within bounds, one decrease per window, the
cloud's pushback honoured, no rise while the rate is not used, no burst after idling."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from router_service.drain_rate import DrainRateConfig, DrainRateController

CONFIG = DrainRateConfig(
    initial_per_s=20.0,
    min_per_s=5.0,
    max_per_s=100.0,
    increase_per_s=10.0,
    decrease=0.5,
    window_s=0.5,
    baseline_quantile=0.0,  # the lowest window median
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def drain(
    controller: DrainRateController,
    clock: FakeClock,
    seconds: float,
    latency: Callable[[float], float],
) -> list[float]:
    """Send paced calls for ``seconds``, each answered after ``latency(rate)``; the rate
    after each call. (Calls overlap freely: only the pacing limits the sends.)"""
    rates = []
    end = clock.now + seconds
    while clock.now < end:
        clock.now += controller.wait_s()
        controller.observe(latency(controller.rate_per_s))
        rates.append(controller.rate_per_s)
    return rates


def test_the_rate_rises_by_a_step_per_window_up_to_the_maximum() -> None:
    clock = FakeClock()
    controller = DrainRateController(CONFIG, clock)
    rates = drain(controller, clock, 3.0, lambda _rate: 0.045)
    assert rates[0] == 20.0
    # Additive: every rate seen is the start plus whole steps, and it got going.
    assert all((rate - 20.0) % 10.0 == 0 for rate in rates)
    assert max(rates) > 40.0
    drain(controller, clock, 20.0, lambda _rate: 0.045)
    assert controller.rate_per_s == 100.0  # capped
    assert controller.baseline_s == pytest.approx(0.045)
    assert controller.decreases == 0


def test_latency_over_the_target_halves_the_rate_and_it_settles_below_the_knee() -> None:
    clock = FakeClock()
    controller = DrainRateController(CONFIG, clock)
    # The path queues above 60 items/s: latency doubles there (over 1.5x the baseline).
    rates = drain(controller, clock, 30.0, lambda rate: 0.04 if rate <= 60 else 0.09)
    assert controller.decreases >= 2
    late = rates[len(rates) // 2 :]
    assert max(late) <= 70.0  # one step past the knee at most, before it halves
    assert min(late) >= 25.0  # halved from what was sent, 60-70/s: never near the minimum
    assert controller.latency_s in (0.04, 0.09)
    assert controller.baseline_s == pytest.approx(0.04)


def test_the_rate_never_falls_below_the_minimum() -> None:
    clock = FakeClock()
    controller = DrainRateController(CONFIG, clock)
    drain(controller, clock, 1.0, lambda _rate: 0.04)
    drain(controller, clock, 10.0, lambda _rate: 1.0)  # badly congested from then on
    assert controller.rate_per_s == 5.0


def test_pushback_holds_every_send_and_counts_as_one_decrease_per_window() -> None:
    clock = FakeClock()
    controller = DrainRateController(CONFIG, clock)
    drain(controller, clock, 0.2, lambda _rate: 0.04)
    for _ in range(4):  # four calls sent together, all shed
        controller.pushback(0.75)
    assert controller.pushbacks == 4
    assert controller.decreases == 1
    assert controller.rate_per_s == 10.0
    assert controller.wait_s() == pytest.approx(0.75)
    # Without a pushback header: the configured default.
    clock.now += 1.0
    controller.pushback(None)
    assert controller.wait_s() == pytest.approx(CONFIG.default_pushback_s)


def test_a_timeout_is_congestion() -> None:
    clock = FakeClock()
    controller = DrainRateController(CONFIG, clock)
    controller.timed_out()
    assert controller.rate_per_s == 10.0


def test_no_rise_while_the_drain_does_not_use_the_rate() -> None:
    clock = FakeClock()
    controller = DrainRateController(CONFIG, clock)
    for _ in range(40):  # one call every 0.2 s: 5/s of the 20/s allowed
        clock.now += 0.2
        controller.wait_s()
        controller.observe(0.04)
    assert controller.rate_per_s == 20.0


def test_sends_are_spaced_by_the_rate_and_idle_time_is_not_saved_up() -> None:
    clock = FakeClock()
    controller = DrainRateController(CONFIG, clock)
    assert [controller.wait_s() for _ in range(3)] == pytest.approx([0.0, 0.05, 0.10])
    clock.now += 60.0
    assert [controller.wait_s() for _ in range(2)] == pytest.approx([0.0, 0.05])


@pytest.mark.parametrize(
    "change",
    [
        {"min_per_s": 0.0},
        {"initial_per_s": 1.0},
        {"max_per_s": 10.0},
        {"decrease": 1.0},
        {"tolerance": 0.9},
        {"window_s": 0.0},
        {"baseline_quantile": 1.0},
        {"windows_to_cut": 0},
    ],
)
def test_inconsistent_settings_are_refused(change: dict[str, float]) -> None:
    fields = {**CONFIG.__dict__, **change}
    with pytest.raises(ValueError, match=next(iter(change))):
        DrainRateConfig(**fields)


def test_a_cut_starts_from_what_was_sent_not_from_an_unused_allowance() -> None:
    clock = FakeClock()
    controller = DrainRateController(
        DrainRateConfig(initial_per_s=80.0, min_per_s=5.0, max_per_s=100.0, decrease=0.5),
        clock,
    )
    for _ in range(20):  # only 10/s sent (the backlog, not the rate, limited it)
        clock.now += 0.1
        controller.wait_s()
        controller.observe(0.04)
    controller.timed_out()
    assert controller.rate_per_s == pytest.approx(5.0)  # half of ~10/s sent, not of 80


def test_one_slow_window_is_noise_two_in_a_row_are_congestion() -> None:
    clock = FakeClock()
    controller = DrainRateController(CONFIG, clock)
    drain(controller, clock, 2.0, lambda _rate: 0.04)
    before = controller.rate_per_s
    # Slow for less than a window: at most one window's median is slow.
    drain(controller, clock, 0.3, lambda _rate: 0.2)
    drain(controller, clock, 1.0, lambda _rate: 0.04)
    assert controller.decreases == 0
    assert controller.rate_per_s >= before
    drain(controller, clock, 1.5, lambda _rate: 0.2)  # two windows in a row at least
    assert controller.decreases == 1
