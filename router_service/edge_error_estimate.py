"""Online estimate of the edge's error rate among the answers the router kept on the edge,
from shadow checks (a random sample of kept answers also sent to the cloud). Pure: no
I/O, no clock.

Each check says whether the cloud's class differs from the edge's. The estimate is the
share of disagreements over a sliding window of the last ``window`` checks, with a
Jeffreys interval (the Beta(k + 1/2, n - k + 1/2) posterior's equal-tailed quantiles,
``scipy.stats.beta``; the bound is 0 at k = 0 and 1 at k = n, Brown, Cai and DasGupta
2001): it keeps close to its nominal coverage at the small counts and rates (a few
hundred checks, a few per cent) this works with, where the Wald interval does not.

What it estimates: disagreement with the cloud, the cloud taken as teacher (as in
reconciliation). Where the cloud itself errs, a disagreement is not always an edge
error; on Fashion-MNIST (cloud ~ 93 %) the two differ by about a point, measured in
``bench/shadow_bench.py``.

Each check keeps the escalation score of its item, so the estimate can be read for the
answers a lower threshold would keep (``estimate(below=t)``: the checks scoring under
``t``, still a uniform sample of what ``t`` keeps while the workload holds still). The
threshold controller reads it at its current threshold: after it lowers the threshold,
checks of items it now escalates no longer count (no wind-up from stale evidence).

Window: the last ``window`` checks, whatever their age. At a 2 % sampling rate, 1,000
checks are the last ~50,000 kept answers: a step change of the edge's error is fully
reflected after ``window`` further checks, half of it after ``window / 2``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

from scipy.stats import beta


@dataclass(frozen=True)
class EdgeErrorEstimate:
    """Share of shadow-checked kept answers the cloud disagreed with, in [0, 1]."""

    estimate: float
    # The Jeffreys interval at ``confidence``; [0, 1] before any check.
    lower: float
    upper: float
    # Checks in the window, and all checks ever seen (the controller waits for new ones).
    samples: int
    total: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def jeffreys_interval(errors: int, samples: int, confidence: float) -> tuple[float, float]:
    """Equal-tailed Jeffreys interval for a binomial rate: ``errors`` of ``samples``."""
    if samples <= 0:
        return 0.0, 1.0
    if not 0 <= errors <= samples:
        raise ValueError("errors must be within [0, samples]")
    tail = (1.0 - confidence) / 2.0
    a, b = errors + 0.5, samples - errors + 0.5
    lower = 0.0 if errors == 0 else float(beta.ppf(tail, a, b))
    upper = 1.0 if errors == samples else float(beta.ppf(1.0 - tail, a, b))
    return lower, upper


class EdgeErrorEstimator:
    """One pair's estimate; ``observe`` takes each shadow check's outcome."""

    def __init__(self, window: int = 1000, confidence: float = 0.95) -> None:
        if window < 1:
            raise ValueError("window must be positive")
        if not 0.0 < confidence < 1.0:
            raise ValueError("confidence must be within (0, 1)")
        self.window = window
        self.confidence = confidence
        # (edge wrong, the item's escalation score) per check, oldest first.
        self._checks: deque[tuple[bool, float]] = deque(maxlen=window)
        self._errors = 0
        self._total = 0

    def observe(self, edge_wrong: bool, score: float) -> None:
        """One shadow check: ``edge_wrong`` when the cloud's class differs from the
        edge's; ``score`` the item's escalation score (below the threshold: it was kept)."""
        if len(self._checks) == self.window:
            self._errors -= self._checks[0][0]
        self._checks.append((bool(edge_wrong), float(score)))
        self._errors += bool(edge_wrong)
        self._total += 1

    @property
    def total(self) -> int:
        """Checks seen since the start (the window holds the last ``window``)."""
        return self._total

    def estimate(self, below: float | None = None) -> EdgeErrorEstimate:
        """Over the window; with ``below``, over its checks scoring under ``below``."""
        if below is None:
            samples, errors = len(self._checks), self._errors
        else:
            counted = [wrong for wrong, score in self._checks if score < below]
            samples, errors = len(counted), sum(counted)
        lower, upper = jeffreys_interval(errors, samples, self.confidence)
        return EdgeErrorEstimate(
            estimate=errors / samples if samples else 0.0,
            lower=lower,
            upper=upper,
            samples=samples,
            total=self._total,
        )
