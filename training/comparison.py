"""Paired bootstrap comparison of escalation scores, and the ship rule (pure numpy).

A router is compared with the max-softmax baseline by the cloud share each needs to
close a given fraction of the accuracy gap between edge-only and cloud-only (50, 75, 90
and 95 % of it), on the same items. The figure of merit is the ratio of the two shares
(learned / max-softmax: below 1.0 means fewer cloud calls for the same accuracy).

Its uncertainty comes from a paired bootstrap: each resample draws n items with
replacement, once, and both routers are measured on that same resample (their scores are
not refitted: the resample is over evaluation items). The interval is the percentile
interval of the ratio over ``resamples`` resamples (seeded: the same inputs give the same
interval).

The ship rule: a learned policy ships only when the upper bound of its interval is below
1.0 at every gap level in ``GAP_LEVELS``; otherwise the shipped policy is max-softmax.
When several candidate classifiers compete for the one slot, the interval is widened by
Bonferroni (``confidence = 1 - (1 - 0.95) / candidates``), so picking the best of them on
the same data does not make a tie look like a win.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

GAP_LEVELS = (0.5, 0.75, 0.9, 0.95)
RESAMPLES = 2000
BOOTSTRAP_SEED = 20261124
CONFIDENCE = 0.95
# Resamples drawn at once: bounds memory to chunk x n counts per array.
CHUNK = 100

Scores = npt.NDArray[np.floating[Any]]
Flags = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class RatioInterval:
    """At one gap level: each router's cloud share (point estimate on all items), their
    ratio, and the bootstrap percentile interval of the ratio."""

    gap_closed: float
    share: float
    baseline_share: float
    ratio: float
    low: float
    high: float
    confidence: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """A router against the baseline at every gap level, on ``items`` items."""

    router: str
    baseline: str
    items: int
    resamples: int
    levels: tuple[RatioInterval, ...]

    @property
    def beats_baseline(self) -> bool:
        """The ship rule: the interval's upper bound is below 1.0 at every level."""
        return all(level.high < 1.0 for level in self.levels)

    def as_dict(self) -> dict[str, Any]:
        return {
            "router": self.router,
            "baseline": self.baseline,
            "items": self.items,
            "resamples": self.resamples,
            "beats_baseline": self.beats_baseline,
            "levels": [level.as_dict() for level in self.levels],
        }


def _shares_needed(
    scores: Scores,
    edge_correct: Flags,
    cloud_correct: Flags,
    counts: npt.NDArray[np.int64],
    levels: tuple[float, ...],
) -> npt.NDArray[np.float64]:
    """[resamples, levels] cloud share each weighted sample needs: items escalate in
    descending score order until the accuracy reaches edge + level x (cloud - edge).
    ``counts`` [resamples, n] is how often each item is in each resample."""
    order = np.argsort(-scores, kind="stable")
    gain = cloud_correct[order].astype(np.int64) - edge_correct[order].astype(np.int64)
    weights = counts[:, order]
    zero = np.zeros((len(counts), 1), dtype=np.int64)
    escalated = np.concatenate([zero, np.cumsum(weights, axis=1)], axis=1)
    gained = np.concatenate([zero, np.cumsum(weights * gain, axis=1)], axis=1)
    gap = counts @ (cloud_correct.astype(np.int64) - edge_correct.astype(np.int64))
    total = counts.sum(axis=1)
    result = np.empty((len(counts), len(levels)))
    for column, level in enumerate(levels):
        needed = level * gap - 1e-9
        first = np.argmax(gained >= needed[:, None], axis=1)
        reached = gained[np.arange(len(counts)), first] >= needed[:, None].ravel()
        share = escalated[np.arange(len(counts)), first] / total
        # A resample whose cloud is no better than its edge has no gap to close.
        result[:, column] = np.where(reached & (gap > 0), share, np.nan)
    return result


def compare(
    scores: Mapping[str, Scores],
    baseline: str,
    edge_correct: Flags,
    cloud_correct: Flags,
    *,
    levels: tuple[float, ...] = GAP_LEVELS,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> dict[str, Comparison]:
    """Every router in ``scores`` (other than ``baseline``) against ``baseline``, on the
    same items and the same resamples. Scores are higher = more worth escalating."""
    n = len(edge_correct)
    if any(len(values) != n for values in scores.values()) or len(cloud_correct) != n:
        raise ValueError("every score vector and both correctness vectors need one entry per item")
    if baseline not in scores:
        raise ValueError(f"no baseline {baseline!r} among {sorted(scores)}")
    ones = np.ones((1, n), dtype=np.int64)
    point = {
        name: _shares_needed(values, edge_correct, cloud_correct, ones, levels)[0]
        for name, values in scores.items()
    }
    rng = np.random.default_rng(seed)
    drawn: dict[str, list[npt.NDArray[np.float64]]] = {name: [] for name in scores}
    for start in range(0, resamples, CHUNK):
        size = min(CHUNK, resamples - start)
        picks = rng.integers(0, n, size=(size, n))
        offsets = (picks + np.arange(size)[:, None] * n).ravel()
        counts = np.bincount(offsets, minlength=size * n).reshape(size, n).astype(np.int64)
        for name, values in scores.items():
            drawn[name].append(_shares_needed(values, edge_correct, cloud_correct, counts, levels))
    samples = {name: np.concatenate(parts) for name, parts in drawn.items()}
    tail = (1.0 - confidence) / 2 * 100
    result: dict[str, Comparison] = {}
    for name in scores:
        if name == baseline:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = samples[name] / samples[baseline]
        intervals = []
        for column, level in enumerate(levels):
            column_ratios = ratios[:, column]
            finite = column_ratios[np.isfinite(column_ratios)]
            low, high = (
                (float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail)))
                if len(finite)
                else (float("nan"), float("nan"))
            )
            base_share = float(point[baseline][column])
            share = float(point[name][column])
            intervals.append(
                RatioInterval(
                    gap_closed=level,
                    share=share,
                    baseline_share=base_share,
                    ratio=share / base_share if base_share > 0 else float("nan"),
                    low=low,
                    high=high,
                    confidence=confidence,
                )
            )
        result[name] = Comparison(name, baseline, n, resamples, tuple(intervals))
    return result


def bonferroni(candidates: int, confidence: float = CONFIDENCE) -> float:
    """The per-candidate confidence that keeps the family's error at 1 - confidence."""
    return 1.0 - (1.0 - confidence) / max(candidates, 1)


def ship_choice(comparisons: Mapping[str, Comparison]) -> str | None:
    """The candidate that ships, or None (max-softmax ships): among the candidates whose
    interval's upper bound is below 1.0 at every level, the one with the lowest mean
    upper bound."""
    winners = [c for c in comparisons.values() if c.beats_baseline]
    if not winners:
        return None
    best = min(winners, key=lambda c: float(np.mean([level.high for level in c.levels])))
    return best.router


@dataclass(frozen=True)
class DifferenceInterval:
    """Mean of ``b - a`` (per-item values, e.g. correct = 1) and its paired-bootstrap
    percentile interval."""

    difference: float
    low: float
    high: float
    confidence: float
    items: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def paired_difference(
    a: npt.NDArray[np.floating[Any]] | Flags,
    b: npt.NDArray[np.floating[Any]] | Flags,
    *,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> DifferenceInterval:
    """``mean(b) - mean(a)`` over the same items, with the interval of that difference
    over item resamples (each resample draws the items once for both)."""
    if len(a) != len(b) or not len(a):
        raise ValueError("a and b need one value per item, and at least one item")
    delta = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [
            delta[
                rng.integers(0, len(delta), size=(min(CHUNK, resamples - start), len(delta)))
            ].mean(axis=1)
            for start in range(0, resamples, CHUNK)
        ]
    )
    tail = (1.0 - confidence) / 2 * 100
    return DifferenceInterval(
        float(delta.mean()),
        float(np.percentile(means, tail)),
        float(np.percentile(means, 100 - tail)),
        confidence,
        len(delta),
    )
