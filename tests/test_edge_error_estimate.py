"""The online edge-error estimate (pure): converges on a scripted stream of shadow-check
outcomes, its Jeffreys interval covers the truth about as often as it says, its window
forgets, and it can be read for the answers a lower threshold keeps."""

from __future__ import annotations

import numpy as np
import pytest

from router_service.edge_error_estimate import EdgeErrorEstimator, jeffreys_interval


def test_the_estimate_converges_on_a_scripted_stream_and_follows_a_step() -> None:
    rng = np.random.default_rng(18)
    estimator = EdgeErrorEstimator(window=1000)
    for wrong in rng.random(5000) < 0.06:
        estimator.observe(bool(wrong), 0.1)
    before = estimator.estimate()
    assert before.samples == 1000 and before.total == 5000
    assert before.lower < 0.06 < before.upper
    assert abs(before.estimate - 0.06) <= 0.02
    # The edge gets worse: after a window of new checks only they count.
    for wrong in rng.random(1000) < 0.15:
        estimator.observe(bool(wrong), 0.1)
    after = estimator.estimate()
    assert after.lower < 0.15 < after.upper
    assert after.lower > before.upper


def test_the_interval_covers_the_truth_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(7)
    covered = 0
    for _ in range(400):
        errors = int(rng.binomial(200, 0.04))
        lower, upper = jeffreys_interval(errors, 200, 0.95)
        covered += lower <= 0.04 <= upper
    assert 0.91 <= covered / 400 <= 0.99


def test_the_interval_matches_the_beta_posterior_and_its_edges() -> None:
    assert jeffreys_interval(0, 0, 0.95) == (0.0, 1.0)
    lower, upper = jeffreys_interval(0, 100, 0.95)
    assert lower == 0.0 and 0.0 < upper < 0.03
    lower, upper = jeffreys_interval(100, 100, 0.95)
    assert upper == 1.0 and 0.97 < lower < 1.0
    # 5 of 50: the Beta(5.5, 45.5) quantiles, about [0.040, 0.206].
    lower, upper = jeffreys_interval(5, 50, 0.95)
    assert lower == pytest.approx(0.0405, abs=0.002) and upper == pytest.approx(0.2055, abs=0.003)
    with pytest.raises(ValueError):
        jeffreys_interval(5, 4, 0.95)


def test_read_below_a_threshold_counts_only_the_checks_it_keeps() -> None:
    estimator = EdgeErrorEstimator(window=100)
    for _ in range(30):
        estimator.observe(False, 0.05)
    for _ in range(10):
        estimator.observe(True, 0.25)
    assert estimator.estimate().samples == 40
    assert estimator.estimate().estimate == pytest.approx(0.25)
    kept = estimator.estimate(below=0.2)
    assert kept.samples == 30 and kept.estimate == 0.0 and kept.total == 40


@pytest.mark.parametrize("bad", [{"window": 0}, {"confidence": 1.0}, {"confidence": 0.0}])
def test_bad_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        EdgeErrorEstimator(**bad)  # type: ignore[arg-type]
