"""The one wait-until of the test suite: wait on the condition itself, never a guessed sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# How often a condition is looked at; a condition is cheap (an attribute, a file, an RPC).
POLL_S = 0.05


async def eventually(
    condition: Callable[[], object], timeout_s: float = 10.0, message: object = ""
) -> None:
    """Poll ``condition`` (sync, or returning an awaitable) until it holds; fail with an
    AssertionError after ``timeout_s`` (with ``message``, or its result if callable)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = condition()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            detail = message() if callable(message) else message
            raise AssertionError(f"condition not met within {timeout_s} s {detail}".rstrip())
        await asyncio.sleep(POLL_S)


def eventually_sync(
    condition: Callable[[], object], timeout_s: float = 10.0, message: object = ""
) -> None:
    """``eventually`` for a test that runs no event loop (a sync test driving a CLI)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            detail = message() if callable(message) else message
            raise AssertionError(f"condition not met within {timeout_s} s {detail}".rstrip())
        time.sleep(POLL_S)
