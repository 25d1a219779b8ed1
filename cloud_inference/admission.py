"""Bounded calls to Triton: a fixed number in flight, a bounded wait queue, no wait past
the caller's budget. Overload is answered at once (RESOURCE_EXHAUSTED with retry
pushback) instead of growing a queue that only adds latency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.errors import DeadlineExceededError, ResourceExhaustedError


class Admission:
    def __init__(self, max_in_flight: int, max_queued: int, retry_after_ms: int) -> None:
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_queued = max_queued
        self._retry_after_ms = retry_after_ms
        self.queued = 0

    @asynccontextmanager
    async def slot(self, wait_budget_s: float) -> AsyncIterator[None]:
        """Hold one in-flight slot; wait for it at most ``wait_budget_s``."""
        if self._slots.locked() and self.queued >= self._max_queued:
            raise ResourceExhaustedError(
                f"{self.queued} requests already wait for Triton",
                retry_after_ms=self._retry_after_ms,
            )
        self.queued += 1
        try:
            async with asyncio.timeout(max(wait_budget_s, 0.0)):
                await self._slots.acquire()
        except TimeoutError:
            raise DeadlineExceededError(
                "the deadline passed while waiting for a free slot to Triton"
            ) from None
        finally:
            self.queued -= 1
        try:
            yield
        finally:
            self._slots.release()
