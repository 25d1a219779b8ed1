"""Admission control shared by every tier that runs work: a fixed number in flight, a
bounded wait queue, no wait past the caller's budget.

Overload is answered at once with RESOURCE_EXHAUSTED and a gRFC A6 retry pushback
(``grpc-retry-pushback-ms``) instead of growing a queue that only adds latency. The
edge node guards its compute slots with it, the cloud service its calls to Triton.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.errors import DeadlineExceededError, ResourceExhaustedError


class Admission:
    def __init__(
        self, max_in_flight: int, max_queued: int, retry_after_ms: int, *, resource: str
    ) -> None:
        """``resource`` names what the slots lead to, in messages ("Triton", "the model")."""
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_queued = max_queued
        self._retry_after_ms = retry_after_ms
        self._resource = resource
        self.queued = 0

    @asynccontextmanager
    async def slot(self, wait_budget_s: float | None = None) -> AsyncIterator[None]:
        """Hold one in-flight slot; wait for it at most ``wait_budget_s`` (None: as long
        as it takes, for callers whose own deadline cancels them)."""
        if self._slots.locked() and self.queued >= self._max_queued:
            raise ResourceExhaustedError(
                f"{self.queued} requests already wait for a free slot to {self._resource}",
                retry_after_ms=self._retry_after_ms,
            )
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
        try:
            yield
        finally:
            self._slots.release()
