"""Rolling latency quantiles of a downstream target (for "is there time for the cloud?")."""

from __future__ import annotations

from collections import deque

import numpy as np


class RollingLatency:
    """Quantiles over the most recent ``capacity`` successful calls."""

    def __init__(self, capacity: int = 200, minimum_samples: int = 20) -> None:
        self._samples: deque[float] = deque(maxlen=capacity)
        self._minimum = minimum_samples

    def observe(self, seconds: float) -> None:
        self._samples.append(seconds)

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds, or None until enough samples were seen."""
        if len(self._samples) < self._minimum:
            return None
        return float(np.quantile(np.fromiter(self._samples, dtype=np.float64), q))

    @property
    def p95(self) -> float | None:
        return self.quantile(0.95)
