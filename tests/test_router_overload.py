"""Issue 21 #5: the router sheds overload instead of queueing it.

Pure tests of the admission rule (services/admission.py) with an injected clock, and a
real router in front of scripted tiers whose single slot is held by a hung request.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.admission import Admission
from services.errors import RETRY_PUSHBACK_METADATA_KEY, ResourceExhaustedError
from tests.helpers.scripted_tiers import CONFIDENT, hang, request, scripted_mesh
from tests.helpers.waiting import eventually


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_request_the_queue_would_make_late_is_refused_at_once() -> None:
    clock = Clock()
    admission = Admission(1, 10, 50, resource="the router", clock=clock)
    for _ in range(100):  # slots held 0.2 s each: the mean converges on it
        async with admission.slot():
            clock.now += 0.2
    assert admission.mean_hold_s == pytest.approx(0.2, rel=0.01)
    release = asyncio.Event()
    held = asyncio.Event()

    async def hold() -> None:
        async with admission.slot():
            held.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await held.wait()  # the holder takes the only slot
    # One ahead of it, 0.2 s each: 0.1 s of budget cannot be met; 0.5 s can.
    with pytest.raises(ResourceExhaustedError, match="more than the 100 ms") as raised:
        async with admission.slot(0.1, shed_when_late=True):
            pass
    assert raised.value.retry_after_ms == 50
    waiter = asyncio.create_task(_take(admission, 0.5))
    await eventually(lambda: admission.queued == 1)
    assert admission.queued == 1  # queued, not shed
    release.set()
    await holder
    assert await waiter


async def _take(admission: Admission, budget: float) -> bool:
    async with admission.slot(budget, shed_when_late=True):
        return True


async def test_a_full_router_answers_resource_exhausted_with_pushback(tmp_path: Path) -> None:
    async with scripted_mesh(tmp_path, max_in_flight=1, max_queued_requests=0) as mesh:
        mesh.edge.tier.script(hang())
        mesh.cloud.tier.script(hang())
        mesh.edge.tier.call_started.clear()
        held = mesh.stub.Infer(request([CONFIDENT], mesh, request_id="held"), timeout=1)
        await mesh.edge.tier.call_started.wait()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await mesh.stub.Infer(request([CONFIDENT], mesh, request_id="shed"), timeout=1)
        error = raised.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        metadata: Any = error.trailing_metadata() or ()
        trailers = {str(key): str(value) for key, value in metadata}
        assert trailers.get(RETRY_PUSHBACK_METADATA_KEY) == "50"
        assert not [c for c in mesh.edge.tier.calls if c.request_id == "shed"]
        held.cancel()
