"""Online threshold controller: holds the operator's ONE target (a cloud share) under a
shifting workload. Pure: no I/O, no telemetry, an injected clock.

A threshold calibrated once is only as good as the day it was calibrated: when the
scores shift (new lighting, sensor noise), the share of items scoring above it moves
away from the target, silently. The controller keeps a sliding window of the most recent
escalation scores and, every ``update_every`` observations, moves the threshold toward
the window's quantile for the target, corrected by how far the share actually escalated
over the last ``realized_window`` requests is from the target.

Dynamics (what an operator can rely on):

- Window: the last ``window`` scores no older than ``max_age_s`` (by the injected clock).
  Before it holds ``min_samples`` scores the threshold stays where it started (the
  policy's calibrated threshold).
- Realized share: ``realized`` = the share of the last ``realized_window`` observed
  scores that were at or above the threshold in force when they were observed (what was
  escalated). The update aims at ``goal = clip(target + realized_gain * (target -
  realized), 0, 1)``: after a shift made the recent requests overshoot, the controller
  escalates a little less until the overshoot is paid back, so the share over any
  ``realized_window`` requests stays near the target (integral action; without it a
  step shift's transient stays in every 1,000-request window it touches).
- Update, every ``update_every`` observations: ``share`` = the window's share at or
  above the current threshold; the new threshold is the one at which the window's share
  is ``share + clip(goal - share, -max_step, +max_step)``. The step is bounded in
  share, not in score units, so it means the same for any score scale: one update moves
  the escalated share of the recent workload by at most ``max_step`` (default 2 pp).
- Settling: on a step shift of the score distribution, the window is all post-shift
  after ``window`` requests (default 100); the share converges to the target within
  ``ceil(|target - share| / max_step)`` updates, one per request by default. The short
  window makes the threshold noisy per request (about ``sqrt(target (1 - target) /
  window)``: 4 pp at 20 %, 100), but the realized-share term averages that out over
  ``realized_window`` requests.
- Tuned on the drift benchmark (``bench/drift_bench.py``, ``docs/architecture.md``):
  with the earlier defaults (window 1,000, an update every 20, no realized-share term) a
  step shift that moved the fixed threshold's share from 20 % to 58 % kept some
  1,000-request windows 15 pp off the target; with these defaults the worst was about
  2-3 pp.
- Bounds: the threshold never leaves ``[min_threshold, max_threshold]`` (for a score in
  [0, 1], the defaults). Scores observed are those of every item the policy scored,
  whether the hard policy let it escalate or not: the target is a share of the scored
  workload.

``state()`` is the controller's state for metrics (threshold, window share, target,
window size, updates, last step, whether the last step was clipped).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ControllerSettings:
    """The operator's target and the controller's dynamics (see the module docstring)."""

    target_share: float
    window: int = 100
    max_age_s: float = 600.0
    update_every: int = 1
    max_step: float = 0.02
    min_samples: int = 100
    realized_window: int = 1000
    realized_gain: float = 2.0
    min_threshold: float = 0.0
    max_threshold: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_share <= 1.0:
            raise ValueError("target_share must be within [0, 1]")
        if min(self.window, self.update_every, self.min_samples, self.realized_window) < 1:
            raise ValueError(
                "window, update_every, min_samples and realized_window must be positive"
            )
        if self.realized_gain < 0.0:
            raise ValueError("realized_gain must not be negative")
        if self.min_samples > self.window:
            raise ValueError("min_samples cannot exceed the window")
        if not 0.0 < self.max_step <= 1.0:
            raise ValueError("max_step must be within (0, 1]")
        if self.max_age_s <= 0.0:
            raise ValueError("max_age_s must be positive")
        if self.min_threshold > self.max_threshold:
            raise ValueError("min_threshold must not exceed max_threshold")


@dataclass(frozen=True)
class ControllerState:
    """What the metrics export."""

    threshold: float
    target_share: float
    # The window's share at or above the threshold (the share the controller steers).
    window_share: float
    # The share of the last realized_window observations that were escalated.
    realized_share: float
    window_size: int
    updates: int
    # The last update's change of the window share (bounded by max_step).
    last_step: float
    # True when the last step was clipped to max_step (the controller is catching up).
    catching_up: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


class ThresholdController:
    """Holds one pair's cloud-share target; ``threshold`` is what the router compares
    scores with, ``observe`` feeds it the scores it decided on."""

    def __init__(
        self,
        settings: ControllerSettings,
        initial_threshold: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._threshold = self._bounded(initial_threshold)
        self._scores: deque[float] = deque(maxlen=settings.window)
        self._times: deque[float] = deque(maxlen=settings.window)
        # (time, escalated) of the last realized_window observations.
        self._outcomes: deque[tuple[float, bool]] = deque(maxlen=settings.realized_window)
        self._escalated = 0  # how many of _outcomes were escalated
        self._since_update = 0
        self._updates = 0
        self._last_step = 0.0
        self._catching_up = False

    @property
    def threshold(self) -> float:
        return self._threshold

    def observe(self, scores: Iterable[float]) -> None:
        """Add the scores of items just decided on; update the threshold when due."""
        now = self._clock()
        for score in scores:
            self._record_outcome(now, float(score) >= self._threshold)
            self._scores.append(float(score))
            self._times.append(now)
            self._since_update += 1
            if self._since_update >= self.settings.update_every:
                self._since_update = 0
                self._update(now)

    def _record_outcome(self, now: float, escalated: bool) -> None:
        if len(self._outcomes) == self._outcomes.maxlen:
            self._escalated -= self._outcomes[0][1]
        self._outcomes.append((now, escalated))
        self._escalated += escalated

    def _expire(self, now: float) -> None:
        oldest = now - self.settings.max_age_s
        while self._times and self._times[0] < oldest:
            self._times.popleft()
            self._scores.popleft()
        while self._outcomes and self._outcomes[0][0] < oldest:
            self._escalated -= self._outcomes.popleft()[1]

    def _realized_share(self) -> float:
        return self._escalated / len(self._outcomes) if self._outcomes else 0.0

    def _update(self, now: float) -> None:
        self._expire(now)
        if len(self._scores) < self.settings.min_samples:
            return
        window = np.fromiter(self._scores, dtype=np.float64, count=len(self._scores))
        share = float(np.count_nonzero(window >= self._threshold)) / len(window)
        target = self.settings.target_share
        goal = target + self.settings.realized_gain * (target - self._realized_share())
        error = min(max(goal, 0.0), 1.0) - share
        step = max(-self.settings.max_step, min(self.settings.max_step, error))
        self._threshold = self._bounded(_threshold_for_share(window, share + step))
        self._updates += 1
        self._last_step = step
        self._catching_up = abs(error) > self.settings.max_step

    def _bounded(self, threshold: float) -> float:
        return min(max(threshold, self.settings.min_threshold), self.settings.max_threshold)

    def state(self) -> ControllerState:
        window = list(self._scores)
        share = (
            sum(1 for score in window if score >= self._threshold) / len(window) if window else 0.0
        )
        return ControllerState(
            threshold=self._threshold,
            target_share=self.settings.target_share,
            window_share=share,
            realized_share=self._realized_share(),
            window_size=len(window),
            updates=self._updates,
            last_step=self._last_step,
            catching_up=self._catching_up,
        )


def _threshold_for_share(
    window: np.ndarray[tuple[int], np.dtype[np.float64]], share: float
) -> float:
    """The lowest threshold at which at most ``share`` of ``window`` is at or above it
    (ties stay below: a tie at the cut escalates none of its members)."""
    share = min(max(share, 0.0), 1.0)
    allowed = math.floor(share * len(window))
    if allowed >= len(window):
        return float(window.min())
    # The (allowed + 1)-th largest score stays on the edge: cut just above it.
    cut = float(np.partition(window, len(window) - 1 - allowed)[len(window) - 1 - allowed])
    return float(np.nextafter(cut, math.inf))
