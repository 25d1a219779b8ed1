"""The ship rule: paired-bootstrap intervals of the cloud-share ratio, learned over
max-softmax, on pooled held-out data. A learned policy ships only when the interval's
upper bound is below 1.0 at every gap level; otherwise max-softmax ships."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.neighbors import KNeighborsClassifier

from training.comparison import GAP_LEVELS, bonferroni, compare, paired_difference, ship_choice
from training.train_policy import (
    MAX_SOFTMAX_CANDIDATE,
    OutOfFoldData,
    SplitOutputs,
    held_out_comparison,
)
from workload.folds import fold_of

RESAMPLES = 1000


def synthetic_split(rng: np.random.Generator, n: int, *, revealing_view: bool) -> SplitOutputs:
    """Edge answers right with probability equal to its own top-1 probability (so its
    confidence is all there is to know), the cloud right on 97 % of items. With
    ``revealing_view``, a second view agrees with the edge exactly when the edge is right
    (information the confidence lacks)."""
    classes = 4
    top1 = rng.uniform(0.4, 1.0, n)
    rest = (1 - top1)[:, None] * rng.dirichlet(np.ones(classes - 1), n)
    probabilities = np.concatenate([top1[:, None], rest], axis=1).astype(np.float32)
    for row in range(n):  # the edge's class varies; correctness does not depend on it
        probabilities[row] = np.roll(probabilities[row], rng.integers(classes))
    edge_class = probabilities.argmax(axis=1)
    edge_correct = rng.random(n) < top1
    labels = np.where(edge_correct, edge_class, (edge_class + 1) % classes).astype(np.int64)
    cloud_correct = rng.random(n) < 0.97
    views = {}
    if revealing_view:
        shifted = np.roll(probabilities, 1, axis=1)
        noise = rng.random(n) < 0.1  # the view is an imperfect witness
        agrees = edge_correct ^ noise
        views["hflip"] = np.where(agrees[:, None], probabilities, shifted).astype(np.float32)
    inputs = rng.integers(0, 256, size=(n, 1, 4, 4), dtype=np.uint8)
    return SplitOutputs(inputs, labels, probabilities, edge_correct, cloud_correct, views)


def confidence_only(
    seed: int, n: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Top-1 probabilities, and edge and cloud correctness where the edge is right with
    its own top-1 probability."""
    rng = np.random.default_rng(seed)
    top1 = rng.uniform(0.3, 1.0, n)
    return top1, rng.random(n) < top1, rng.random(n) < 0.97


def test_a_monotone_transform_of_max_softmax_never_ships() -> None:
    top1, edge_correct, cloud_correct = confidence_only(1, 4000)
    baseline = (1 - top1).astype(np.float32)
    same: npt.NDArray[np.float32] = np.sqrt(baseline).astype(np.float32)  # same ranking
    comparisons = compare(
        {"max_softmax": baseline, "same_information": same},
        "max_softmax",
        edge_correct,
        cloud_correct,
        resamples=RESAMPLES,
    )
    result = comparisons["same_information"]
    assert [level.ratio for level in result.levels] == [1.0] * len(GAP_LEVELS)
    assert not result.beats_baseline
    assert ship_choice(comparisons) is None


def test_the_same_information_through_a_classifier_ships_max_softmax() -> None:
    rng = np.random.default_rng(2)
    first, second = (synthetic_split(rng, 3000, revealing_view=False) for _ in range(2))
    held_out = held_out_comparison(first, second, "cloud-fixes-edge", resamples=RESAMPLES)
    assert held_out.shipped is None
    assert held_out.as_dict()["shipped"] == MAX_SOFTMAX_CANDIDATE
    assert held_out.confidence == bonferroni(2)
    for comparison in held_out.comparisons.values():
        assert comparison.items == 6000
        assert any(level.high >= 1.0 for level in comparison.levels)


def test_a_view_with_information_beyond_confidence_ships_learned() -> None:
    rng = np.random.default_rng(3)
    first, second = (synthetic_split(rng, 3000, revealing_view=True) for _ in range(2))
    held_out = held_out_comparison(first, second, "cloud-fixes-edge", resamples=RESAMPLES)
    assert held_out.shipped in {"logistic_regression", "gradient_boosted_trees"}
    shipped = held_out.comparisons[held_out.shipped]
    assert all(level.high < 1.0 for level in shipped.levels)
    assert all(level.ratio < 0.7 for level in shipped.levels)


def test_intervals_are_seeded_and_paired() -> None:
    top1, edge_correct, cloud_correct = confidence_only(4, 3000)
    rng = np.random.default_rng(5)
    n = len(top1)
    scores = {
        "max_softmax": (1 - top1).astype(np.float32),
        "noisy": (1 - top1 + rng.normal(0, 0.1, n)).astype(np.float32),
    }
    once = compare(scores, "max_softmax", edge_correct, cloud_correct, resamples=300)
    again = compare(scores, "max_softmax", edge_correct, cloud_correct, resamples=300)
    assert once["noisy"].as_dict() == again["noisy"].as_dict()
    for level in once["noisy"].levels:
        assert level.low <= level.ratio <= level.high or np.isclose(level.ratio, level.low)
    # Noise only loses information: the noisy score never beats the baseline.
    assert not once["noisy"].beats_baseline


def out_of_fold(rng: np.random.Generator, n: int, folds: int) -> OutOfFoldData:
    return OutOfFoldData(
        synthetic_split(rng, n, revealing_view=False),
        fold_of(n, folds, seed=9),
        folds,
        Path("synthetic"),
    )


def test_out_of_fold_items_join_the_pool_scored_only_by_routers_that_never_saw_them() -> None:
    """A 1-nearest-neighbour classifier memorises its training items: scoring any item it
    was fitted on would make it look like the oracle and ship. Pooled with out-of-fold
    groups (each scored by the fit on the other groups) it must tie or lose instead."""
    rng = np.random.default_rng(6)
    first, second = (synthetic_split(rng, 1500, revealing_view=False) for _ in range(2))
    extra = out_of_fold(rng, 6000, 4)
    held_out = held_out_comparison(
        first,
        second,
        "cloud-fixes-edge",
        out_of_fold=extra,
        resamples=300,
        candidates={"memoriser": KNeighborsClassifier(n_neighbors=1)},
    )
    assert held_out.comparisons["memoriser"].items == 9000
    assert held_out.shipped is None
    assert all(level.ratio > 0.9 for level in held_out.comparisons["memoriser"].levels)
    # The goal's table covers the pool and each kind of item in it.
    assert {part: c.items for part, c in held_out.plain.items()} == {
        "pooled": 9000,
        "router-train + calibration (served edge model)": 3000,
        "model-train out-of-fold (fold models)": 6000,
    }


def test_folds_are_seeded_and_even() -> None:
    fold = fold_of(48_003, 5)
    assert np.array_equal(fold, fold_of(48_003, 5))
    sizes = np.bincount(fold)
    assert len(sizes) == 5 and sizes.max() - sizes.min() <= 1
    assert not np.array_equal(fold, fold_of(48_003, 5, seed=1))


def test_paired_difference_interval_is_seeded_and_covers_a_known_gain() -> None:
    rng = np.random.default_rng(8)
    before = rng.random(4000) < 0.6
    after = before | (rng.random(4000) < 0.1)  # fixes about 4 % of items, breaks none
    gain = paired_difference(before, after, resamples=500)
    assert gain.difference == pytest.approx(after.mean() - before.mean())
    assert 0 < gain.low < gain.difference < gain.high
    assert gain == paired_difference(before, after, resamples=500)
    same = paired_difference(before, before, resamples=200)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="one value per item"):
        paired_difference(before, after[:-1])
