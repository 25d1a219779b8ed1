"""Attempt timeouts (router_service/budget.py): pure, no clock."""

from __future__ import annotations

import pytest

from router_service.budget import AttemptBudget

BUDGET = AttemptBudget(
    floor_s=0.1, p99_multiple=4.0, default_cap_s=0.25, default_reserve_s=0.25, reserve_margin_s=0.01
)


def test_a_tier_with_history_is_capped_at_a_multiple_of_its_p99_never_below_the_floor() -> None:
    assert BUDGET.timeout(2.0, 0.05, 0.05, fallback_possible=True) == pytest.approx(0.2)
    assert BUDGET.timeout(2.0, 0.001, 0.05, fallback_possible=True) == pytest.approx(0.1)


def test_a_tier_without_history_gets_the_default_cap() -> None:
    assert BUDGET.timeout(2.0, None, 0.05, fallback_possible=True) == pytest.approx(0.25)


def test_the_fallbacks_p95_is_left_in_reserve() -> None:
    # 0.5 s left, cloud p95 0.3 s: the edge may use 0.5 - 0.31 = 0.19 s, under its cap.
    assert BUDGET.timeout(0.5, 0.1, 0.3, fallback_possible=True) == pytest.approx(0.19)
    # Unknown fallback latency: the default reserve.
    assert BUDGET.timeout(0.5, 0.1, None, fallback_possible=True) == pytest.approx(0.24)


def test_no_reserve_when_there_is_no_fallback_or_it_would_not_fit() -> None:
    assert BUDGET.timeout(0.5, 0.1, 0.3, fallback_possible=False) == pytest.approx(0.4)
    # 0.3 s left, reserve 0.31 s: the fallback cannot finish in time, so no reserve.
    assert BUDGET.timeout(0.3, 1.0, 0.3, fallback_possible=True) == pytest.approx(0.3)
    assert BUDGET.leaving_reserve(0.3, 0.3) == pytest.approx(0.3)


def test_never_more_than_what_is_left_and_never_negative() -> None:
    assert BUDGET.timeout(0.05, 1.0, None, fallback_possible=True) == pytest.approx(0.05)
    assert BUDGET.timeout(-0.01, None, None, fallback_possible=False) == 0.0
