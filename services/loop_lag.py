"""How far behind the event loop runs: the CPU saturation signal of an asyncio service.

A timer of ``interval_s`` is re-armed forever; how late it fires is the time a ready
callback waits for the loop (what every request arriving now will wait on top of its own
work). Smoothed (EWMA) so that one preemption by another process is not overload. Node's
toobusy-js and fastify's under-pressure (``maxEventLoopDelay``) shed on the same signal.

Why the router needs it beside its in-flight limit: a slot is held across I/O too (an
escalation over a 40 ms WAN), so a limit loose enough for that lets CPU-bound work queue
*before* the handler, in grpc's own queue, where no admission rule sees it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# Weight of the newest sample in the running mean (about the last 5 samples).
LAG_WEIGHT = 0.2


class LoopLag:
    """``lag_s``: the smoothed lateness of a ``interval_s`` timer on the running loop."""

    def __init__(
        self, interval_s: float = 0.01, *, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self._interval_s = interval_s
        self._clock = clock
        self.lag_s = 0.0

    def observe(self, late_s: float) -> None:
        """Fold one sample (seconds late, negative counts as 0) into ``lag_s``."""
        self.lag_s += LAG_WEIGHT * (max(late_s, 0.0) - self.lag_s)

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            started = self._clock()
            await asyncio.sleep(self._interval_s)
            self.observe(self._clock() - started - self._interval_s)
