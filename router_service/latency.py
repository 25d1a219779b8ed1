"""Rolling latency quantiles of a downstream target (for "is there time for the cloud?")."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np


class RollingLatency:
    """Quantiles over the most recent ``capacity`` successful calls of the last
    ``max_age_s`` seconds.

    The age limit matters: a router that stops calling a tier because its p95 looks too
    slow (DEADLINE_TOO_SHORT) adds no new samples, so without it a short burst of slow
    calls would keep the tier's p95 high, and the tier refused, for good.

    Quantiles are read several times per request and the window barely moves between
    calls, so they are recomputed only after ``refresh_every`` new samples or when old
    ones expire (profiling showed np.quantile at ~8 % of the router's CPU when computed
    on every read).
    """

    def __init__(
        self,
        capacity: int = 200,
        minimum_samples: int = 20,
        refresh_every: int = 10,
        max_age_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=capacity)
        self._minimum = minimum_samples
        self._refresh_every = refresh_every
        self._max_age_s = max_age_s
        self._clock = clock
        self._since_refresh = 0
        self._cache: dict[float, float] = {}

    def observe(self, seconds: float) -> None:
        self._samples.append((self._clock(), seconds))
        self._since_refresh += 1
        if self._since_refresh >= self._refresh_every or len(self._samples) <= self._minimum:
            self._cache.clear()
            self._since_refresh = 0

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds, or None until enough recent samples were seen."""
        horizon = self._clock() - self._max_age_s
        if self._samples and self._samples[0][0] < horizon:
            while self._samples and self._samples[0][0] < horizon:
                self._samples.popleft()
            self._cache.clear()
        if len(self._samples) < self._minimum:
            return None
        cached = self._cache.get(q)
        if cached is None:
            values = np.fromiter((value for _, value in self._samples), dtype=np.float64)
            cached = float(np.quantile(values, q))
            self._cache[q] = cached
        return cached

    @property
    def p95(self) -> float | None:
        return self.quantile(0.95)
