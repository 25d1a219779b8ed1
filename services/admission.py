"""Admission control shared by every tier that runs work: a fixed number in flight, a
bounded wait queue, no wait past the caller's budget.

Overload is answered at once with RESOURCE_EXHAUSTED and a gRFC A6 retry pushback
(``grpc-retry-pushback-ms``) instead of growing a queue that only adds latency. The
edge node guards its compute slots with it, the cloud service its calls to Triton.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

from opentelemetry import metrics

from services.errors import DeadlineExceededError, ResourceExhaustedError

# Weight of the newest hold time in the running mean (about the last 20 requests).
HOLD_WEIGHT = 0.05


class Admission:
    def __init__(
        self,
        max_in_flight: int,
        max_queued: int,
        retry_after_ms: int,
        *,
        resource: str,
        clock: Callable[[], float] = time.perf_counter,
        loop_lag: Callable[[], float] | None = None,
        max_loop_lag_s: float = 0.0,
    ) -> None:
        """``resource`` names what the slots lead to, in messages ("Triton", "the model").
        ``loop_lag`` (seconds, e.g. ``services.loop_lag.LoopLag``'s): refuse while it
        exceeds ``max_loop_lag_s`` (0: never), whatever the slots say."""
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_in_flight = max_in_flight
        self._max_queued = max_queued
        self._retry_after_ms = retry_after_ms
        self._resource = resource
        self._clock = clock
        self._loop_lag = loop_lag
        self._max_loop_lag_s = max_loop_lag_s
        self.queued = 0
        self.in_flight = 0  # requests holding a slot now
        # Exponentially weighted mean of how long a slot is held, in seconds.
        self.mean_hold_s = 0.0

    def expected_wait_s(self) -> float:
        """How long a request arriving now would wait for a slot: the requests ahead of
        it, served ``max_in_flight`` at a time, each holding its slot ``mean_hold_s``."""
        if not self._slots.locked():
            return 0.0
        return (self.queued + 1) * self.mean_hold_s / self._max_in_flight

    def refusal(
        self, wait_budget_s: float | None = None, *, shed_when_late: bool = False
    ) -> ResourceExhaustedError | None:
        """The error a request arriving now gets instead of a slot (``slot``'s rule), or
        None when it may wait for one. Costs a few comparisons: callers may check early
        (services/shedding.py) so that a shed request costs no more than this."""
        if self._loop_lag is not None and self._max_loop_lag_s > 0:
            lag = self._loop_lag()
            if lag > self._max_loop_lag_s:
                # CPU-bound: every request waits for the loop before its own work.
                return ResourceExhaustedError(
                    f"overloaded: {self._resource} runs {lag * 1e3:.0f} ms behind "
                    f"(limit {self._max_loop_lag_s * 1e3:.0f} ms)",
                    retry_after_ms=self._retry_after_ms,
                )
        if self._slots.locked() and self.queued >= self._max_queued:
            return ResourceExhaustedError(
                f"{self.queued} requests already wait for a free slot to {self._resource}",
                retry_after_ms=self._retry_after_ms,
            )
        if shed_when_late and wait_budget_s is not None:
            # The request must wait its turn and then be served, both before its deadline.
            expected = self.expected_wait_s() + self.mean_hold_s
            if self._slots.locked() and expected > wait_budget_s:
                return ResourceExhaustedError(
                    f"overloaded: ~{expected * 1e3:.0f} ms to wait for and use {self._resource}, "
                    f"more than the {max(wait_budget_s, 0.0) * 1e3:.0f} ms the deadline leaves",
                    retry_after_ms=self._retry_after_ms,
                )
        return None

    @asynccontextmanager
    async def slot(
        self, wait_budget_s: float | None = None, *, shed_when_late: bool = False
    ) -> AsyncIterator[None]:
        """Hold one in-flight slot; wait for it at most ``wait_budget_s`` (None: as long
        as it takes, for callers whose own deadline cancels them). ``shed_when_late``:
        refuse at once (RESOURCE_EXHAUSTED) when every slot is taken and the expected wait
        plus the mean time a slot is held exceed the budget, rather than queue a request
        whose deadline cannot be met."""
        refusal = self.refusal(wait_budget_s, shed_when_late=shed_when_late)
        if refusal is not None:
            raise refusal
        self.queued += 1
        try:
            budget = None if wait_budget_s is None else max(wait_budget_s, 0.0)
            async with asyncio.timeout(budget):
                await self._slots.acquire()
        except TimeoutError:
            raise DeadlineExceededError(
                f"the deadline passed while waiting for a free slot to {self._resource}"
            ) from None
        finally:
            self.queued -= 1
        started = self._clock()
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()
            held = self._clock() - started
            self.mean_hold_s += HOLD_WEIGHT * (held - self.mean_hold_s)


def observe_admission(
    meter: metrics.Meter, prefix: str, admission: Callable[[], Admission | None]
) -> None:
    """``<prefix>.admission.in_flight`` and ``<prefix>.admission.queued`` gauges of the
    admission ``admission()`` returns (None: nothing admits yet, nothing reported)."""

    def in_flight(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        current = admission()
        return [] if current is None else [metrics.Observation(current.in_flight)]

    def queued(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        current = admission()
        return [] if current is None else [metrics.Observation(current.queued)]

    meter.create_observable_gauge(
        f"{prefix}.admission.in_flight",
        callbacks=[in_flight],
        description="Requests holding a slot now",
    )
    meter.create_observable_gauge(
        f"{prefix}.admission.queued",
        callbacks=[queued],
        description="Requests waiting for a slot now (the admission queue's depth)",
    )
