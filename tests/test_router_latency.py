"""RollingLatency: quantiles of the recent window, refreshed every few samples."""

from __future__ import annotations

import pytest

from router_service.latency import RollingLatency


def test_no_quantile_until_enough_samples() -> None:
    latency = RollingLatency(capacity=50, minimum_samples=5)
    for _ in range(4):
        latency.observe(0.01)
    assert latency.p95 is None
    latency.observe(0.01)
    assert latency.p95 == pytest.approx(0.01)


def test_the_quantile_follows_the_window_within_refresh_every_samples() -> None:
    latency = RollingLatency(capacity=20, minimum_samples=5, refresh_every=4)
    for _ in range(20):
        latency.observe(0.010)
    assert latency.p95 == pytest.approx(0.010)
    # The target slows down: the cached figure may lag, but by fewer than refresh_every
    # samples, and the window forgets the old ones entirely.
    for count in range(1, 21):
        latency.observe(0.100)
        if count == 4:
            p95 = latency.p95
            assert p95 is not None and p95 > 0.010, "moved after refresh_every samples"
    assert latency.p95 == pytest.approx(0.100)
    assert latency.quantile(0.0) == pytest.approx(0.100)


def test_a_refresh_uses_every_sample_in_the_window() -> None:
    latency = RollingLatency(capacity=100, minimum_samples=1, refresh_every=1)
    for milliseconds in range(1, 101):
        latency.observe(milliseconds / 1000)
    assert latency.quantile(0.5) == pytest.approx(0.0505)
    assert latency.p95 == pytest.approx(0.09505)


def test_old_samples_expire_so_a_burst_of_slow_calls_cannot_refuse_a_tier_for_good() -> None:
    """A few 2 s calls made the cloud's p95 2 s; the router then refused it
    (DEADLINE_TOO_SHORT) and added no samples: with an age limit the figure expires."""
    clock = [0.0]
    latency = RollingLatency(
        capacity=200, minimum_samples=20, refresh_every=10, max_age_s=30.0, clock=lambda: clock[0]
    )
    for _ in range(30):
        latency.observe(0.04)
    for _ in range(4):
        latency.observe(2.0)
    p95 = latency.p95
    assert p95 is not None and p95 > 1.0
    clock[0] = 29.0
    assert latency.p95 == p95  # still within the age limit
    clock[0] = 31.0
    assert latency.p95 is None  # nothing recent: unknown, so the tier is tried again
