"""How fast the outbox drains: an AIMD rate controller over reconciliation latency and the
cloud's retry pushback. Pure logic with an injectable clock.

The rate rises by a fixed step per window while the window's median reconciliation
latency stays within ``tolerance`` times the baseline (a low percentile of the recent
window medians: the path's unloaded latency, WAN included), and is multiplied by
``decrease`` when ``windows_to_cut`` windows in a row exceed it (one slow window on a
shared, noisy host is not congestion), when a call times out, or when the cloud sheds it
(RESOURCE_EXHAUSTED): then no call is sent before the cloud's ``grpc-retry-pushback-ms``
(gRFC A6) has passed.
Latency is measured on the router's event loop, so a router too busy to serve its live
traffic on time slows the drain as a cloud that queues does. One decrease per window, so a
burst of failures of calls sent together counts as one congestion signal (TCP's rule);
the rate rises only while the drain uses most of it (RFC 7661), so a drain capped by its
concurrency does not inflate a rate it could not use.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DrainRateConfig:
    """Rates in items per second, durations in seconds."""

    initial_per_s: float = 20.0
    min_per_s: float = 5.0
    max_per_s: float = 500.0
    # Added to the rate after a window within the latency target.
    increase_per_s: float = 10.0
    # The rate is multiplied by this on congestion, a timeout or pushback.
    decrease: float = 0.7
    # Congestion: windows_to_cut windows in a row with a median latency above
    # tolerance x the baseline.
    tolerance: float = 1.5
    windows_to_cut: int = 2
    # The baseline: this quantile of the last baseline_windows window medians.
    baseline_quantile: float = 0.1
    window_s: float = 0.5
    # A window decides only with at least this many latencies in it.
    min_samples: int = 3
    # How many recent window medians the baseline is taken from.
    baseline_windows: int = 120
    # Wait after a RESOURCE_EXHAUSTED that came without a pushback.
    default_pushback_s: float = 1.0
    # The rate rises only when the last window sent at least this share of it.
    used_share_to_rise: float = 0.7

    def __post_init__(self) -> None:
        if not 0 < self.min_per_s <= self.initial_per_s <= self.max_per_s:
            raise ValueError("rates must satisfy 0 < min_per_s <= initial_per_s <= max_per_s")
        if not 0 < self.decrease < 1:
            raise ValueError("decrease must be in (0, 1)")
        if self.tolerance < 1:
            raise ValueError("tolerance must be at least 1")
        if not 0 <= self.baseline_quantile < 1 or self.windows_to_cut < 1:
            raise ValueError("baseline_quantile must be in [0, 1), windows_to_cut at least 1")
        if self.window_s <= 0 or self.increase_per_s < 0 or self.default_pushback_s < 0:
            raise ValueError("window_s must be > 0, increase_per_s and default_pushback_s >= 0")


class DrainRateController:
    """Paces reconciliation calls (``wait_s`` before each) and adapts the pace from each
    call's outcome (``observe`` a latency, ``pushback``, ``timed_out``)."""

    def __init__(
        self, config: DrainRateConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self.rate_per_s = config.initial_per_s
        # The last decided window's median latency and the baseline it was judged by (s).
        self.latency_s = 0.0
        self.baseline_s = 0.0
        self.pushbacks = 0
        self.decreases = 0
        self._medians: deque[float] = deque(maxlen=config.baseline_windows)
        self._samples: list[float] = []
        self._window_started = clock()
        self._sent_in_window = 0
        self._decreased_in_window = False
        self._next_send = self._window_started
        # Sends per second in the last two decided windows (what was really sent).
        self._achieved: deque[float] = deque(maxlen=2)
        self._congested_windows = 0
        self._hold_until = self._window_started

    def wait_s(self) -> float:
        """Reserve the next send slot; seconds to wait before sending (0: now). Slots are
        1/rate apart and none falls inside a pushback; unused time is not saved up, so an
        idle drain does not burst."""
        now = self._clock()
        self._roll_window(now)
        send_at = max(self._next_send, now, self._hold_until)
        self._next_send = send_at + 1.0 / self.rate_per_s
        self._sent_in_window += 1
        return send_at - now

    def observe(self, latency_s: float) -> None:
        """A reconciliation call answered after ``latency_s``."""
        self._samples.append(latency_s)
        self._roll_window(self._clock())

    def pushback(self, delay_s: float | None) -> None:
        """The cloud shed a call (RESOURCE_EXHAUSTED) asking to wait ``delay_s`` (None:
        no pushback header, ``default_pushback_s``)."""
        now = self._clock()
        self.pushbacks += 1
        delay = self.config.default_pushback_s if delay_s is None else max(delay_s, 0.0)
        self._hold_until = max(self._hold_until, now + delay)
        self._decrease()

    def timed_out(self) -> None:
        """A reconciliation call ran out of time: the path is congested."""
        self._decrease()

    def _decrease(self) -> None:
        if self._decreased_in_window:
            return
        self._decreased_in_window = True
        self.decreases += 1
        # From what was actually sent, when less than allowed: halving an allowance the
        # drain was not using would not slow it at all.
        sending = min(self.rate_per_s, max(self._achieved, default=self.rate_per_s))
        self.rate_per_s = max(self.config.min_per_s, sending * self.config.decrease)
        # The next send keeps the new, wider spacing.
        self._next_send = max(self._next_send, self._clock() + 1.0 / self.rate_per_s)

    def _roll_window(self, now: float) -> None:
        elapsed = now - self._window_started
        if elapsed < self.config.window_s:
            return
        if len(self._samples) >= self.config.min_samples:
            self._decide(elapsed)
        elif self._samples and not self._decreased_in_window:
            # Too few answers to judge: keep them for the next window.
            self._window_started, self._sent_in_window = now, 0
            return
        self._samples = []
        self._window_started = now
        self._sent_in_window = 0
        self._decreased_in_window = False

    def _decide(self, elapsed: float) -> None:
        median = statistics.median(self._samples)
        self._medians.append(median)
        self.latency_s = median
        ordered = sorted(self._medians)
        self.baseline_s = ordered[int(self.config.baseline_quantile * len(ordered))]
        used = self._sent_in_window / elapsed
        self._achieved.append(used)
        congested = median > self.config.tolerance * self.baseline_s
        self._congested_windows = self._congested_windows + 1 if congested else 0
        if self._decreased_in_window:
            return
        if congested:
            if self._congested_windows >= self.config.windows_to_cut:
                self._decrease()
                self._congested_windows = 0
            return
        if used >= self.config.used_share_to_rise * self.rate_per_s:
            self.rate_per_s = min(
                self.config.max_per_s, self.rate_per_s + self.config.increase_per_s
            )
