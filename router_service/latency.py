"""Rolling latency quantiles of a downstream target (for "is there time for the cloud?")."""

from __future__ import annotations

from collections import deque

import numpy as np


class RollingLatency:
    """Quantiles over the most recent ``capacity`` successful calls.

    Quantiles are read several times per request and the window barely moves between
    calls, so they are recomputed only after ``refresh_every`` new samples (profiling
    showed np.quantile at ~8 % of the router's CPU when computed on every read).
    """

    def __init__(
        self, capacity: int = 200, minimum_samples: int = 20, refresh_every: int = 10
    ) -> None:
        self._samples: deque[float] = deque(maxlen=capacity)
        self._minimum = minimum_samples
        self._refresh_every = refresh_every
        self._since_refresh = 0
        self._cache: dict[float, float] = {}

    def observe(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._since_refresh += 1
        if self._since_refresh >= self._refresh_every or len(self._samples) <= self._minimum:
            self._cache.clear()
            self._since_refresh = 0

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds, or None until enough samples were seen."""
        if len(self._samples) < self._minimum:
            return None
        cached = self._cache.get(q)
        if cached is None:
            cached = float(np.quantile(np.fromiter(self._samples, dtype=np.float64), q))
            self._cache[q] = cached
        return cached

    @property
    def p95(self) -> float | None:
        return self.quantile(0.95)
