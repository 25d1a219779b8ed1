"""Threshold choice and operating points for an escalation score (pure numpy).

A score is "higher = more worth escalating". An item escalates when score >= threshold.
The operator sets ONE target: a maximum cloud share, or a maximum error rate among the
answers kept on the edge; the threshold is chosen on the calibration split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Scores = npt.NDArray[np.floating[Any]]
Flags = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    cloud_share: float
    accuracy: float
    edge_kept_error_rate: float
    cost_per_1000_micros: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def threshold_for_cloud_share(scores: Scores, max_share: float) -> float:
    """The lowest threshold that escalates at most ``max_share`` of the items."""
    if not 0.0 <= max_share <= 1.0:
        raise ValueError("max_share must be within [0, 1]")
    ordered = np.sort(scores)[::-1]
    allowed = int(np.floor(max_share * len(ordered)))
    if allowed >= len(ordered):
        return float(ordered[-1])
    # Strictly above the first item that must stay on the edge; ties stay too. The step
    # is taken in the scores' own dtype: float32 scores compare in float32.
    return float(np.nextafter(ordered[allowed], np.asarray(np.inf, dtype=ordered.dtype)))


def threshold_for_edge_error(scores: Scores, edge_correct: Flags, max_error: float) -> float:
    """The highest threshold (fewest escalations) whose kept answers err at most max_error."""
    order = np.argsort(scores, kind="stable")
    wrong = (~edge_correct[order]).astype(np.float64)
    kept_error = np.cumsum(wrong) / np.arange(1, len(order) + 1)
    acceptable = np.nonzero(kept_error <= max_error)[0]
    if len(acceptable) == 0:
        return float(np.min(scores))  # escalate everything
    kept = acceptable[-1] + 1
    if kept == len(order):
        top = np.max(scores)
        return float(np.nextafter(top, np.asarray(np.inf, dtype=top.dtype)))  # escalate nothing
    return float(scores[order[kept]])


def operating_point(
    scores: Scores,
    threshold: float,
    edge_correct: Flags,
    cloud_correct: Flags,
    *,
    cloud_price_micros: int,
    edge_price_micros: int = 0,
) -> OperatingPoint:
    escalate = scores >= threshold
    correct = np.where(escalate, cloud_correct, edge_correct)
    kept = ~escalate
    kept_error = float((~edge_correct[kept]).mean()) if kept.any() else 0.0
    share = float(escalate.mean())
    return OperatingPoint(
        threshold=float(threshold),
        cloud_share=share,
        accuracy=float(correct.mean()),
        edge_kept_error_rate=kept_error,
        cost_per_1000_micros=1000 * (share * cloud_price_micros + edge_price_micros),
    )


def accuracy_curve(
    scores: Scores, edge_correct: Flags, cloud_correct: Flags, shares: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Accuracy when the top ``share`` of items by score escalate, for each share."""
    order = np.argsort(-scores, kind="stable")
    gain = cloud_correct[order].astype(np.int64) - edge_correct[order].astype(np.int64)
    cumulative = np.concatenate([[0], np.cumsum(gain)])
    counts = np.floor(shares * len(scores)).astype(np.int64)
    base = edge_correct.sum()
    result: npt.NDArray[np.float64] = (base + cumulative[counts]) / len(scores)
    return result


def random_curve(
    edge_correct: Flags, cloud_correct: Flags, shares: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Expected accuracy when a random ``share`` of items escalates."""
    edge, cloud = edge_correct.mean(), cloud_correct.mean()
    result: npt.NDArray[np.float64] = (1 - shares) * edge + shares * cloud
    return result


def share_needed(
    curve: npt.NDArray[np.float64], shares: npt.NDArray[np.float64], accuracy: float
) -> float | None:
    """Smallest share at which ``curve`` reaches ``accuracy`` (None if it never does)."""
    reached = np.nonzero(curve >= accuracy - 1e-12)[0]
    return float(shares[reached[0]]) if len(reached) else None
