"""services.shedding: a request the admission rule refuses is refused before tracing;
services.loop_lag: a loop running behind is overload.

A real grpc.aio server (ServiceHost) with the router's interceptor order (RPC metric,
shedding, tracing, error mapping) around the kernel test servicer; the admission's one
slot is held by the test itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hybridmesh.common.v1 import model_pb2
from hybridmesh.edge.v1 import edge_service_pb2, edge_service_pb2_grpc
from services.admission import Admission
from services.config import ServiceSettings
from services.errors import RETRY_PUSHBACK_METADATA_KEY, ResourceExhaustedError
from services.loop_lag import LoopLag
from services.server import ServiceHost, ServiceRegistration
from services.shedding import SheddingInterceptor, shed_before_tracing
from services.telemetry import create_telemetry
from tests.helpers.kernel_servicer import ScriptedEdgeServicer
from tests.helpers.waiting import eventually

EDGE_SERVICE = "hybridmesh.edge.v1.EdgeService"
INFER = f"/{EDGE_SERVICE}/Infer"


class Shedding:
    def __init__(
        self, admission: Admission, stub: edge_service_pb2_grpc.EdgeServiceAsyncStub
    ) -> None:
        self.servicer = ScriptedEdgeServicer()
        self.spans = InMemorySpanExporter()
        self.admission = admission
        self.stub = stub


@contextlib.asynccontextmanager
async def shedding(max_queued: int) -> AsyncIterator[Shedding]:
    """A server whose admission has one slot and ``max_queued`` places to wait."""
    admission = Admission(1, max_queued, 75, resource="the test")
    state = Shedding(admission, None)  # type: ignore[arg-type]
    telemetry = create_telemetry(
        "shedding-test", span_processors=[SimpleSpanProcessor(state.spans)], export_otlp=False
    )
    host = ServiceHost(
        ServiceSettings(service_name="shedding-test", port=0, shutdown_grace_seconds=0),
        [
            ServiceRegistration(
                EDGE_SERVICE,
                lambda server: edge_service_pb2_grpc.add_EdgeServiceServicer_to_server(
                    state.servicer, server
                ),
            )
        ],
        interceptors=shed_before_tracing(
            telemetry.server_interceptors(), SheddingInterceptor(admission, [INFER])
        ),
    )
    await host.start()
    async with grpc.aio.insecure_channel(host.address) as channel:
        state.stub = edge_service_pb2_grpc.EdgeServiceStub(channel)
        yield state
    await host.stop(0)


def _echo() -> edge_service_pb2.InferRequest:
    return edge_service_pb2.InferRequest(request_id="r1", model=model_pb2.ModelRef(name="echo"))


def _server_spans(spans: InMemorySpanExporter) -> list[str]:
    return [span.name for span in spans.get_finished_spans() if span.name == INFER]


def _names(spans: InMemorySpanExporter) -> list[str]:
    return [span.name for span in spans.get_finished_spans()]


async def test_a_full_admission_refuses_before_the_span_and_the_handler() -> None:
    async with shedding(max_queued=0) as state:
        async with state.admission.slot():  # the only slot, no queue: the next call is shed
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await state.stub.Infer(_echo(), timeout=5)
        error = raised.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "wait for a free slot to the test" in (error.details() or "")
        assert _pushback(error) == "75"
        assert state.servicer.calls == 0
        assert _server_spans(state.spans) == []
        # A free slot: the same call is served, and traced.
        reply = await state.stub.Infer(_echo(), timeout=5)
        assert reply.request_id == "r1"
        assert state.servicer.calls == 1
        # The server span ends just after the answer leaves.
        await eventually(
            lambda: len(_server_spans(state.spans)) == 1, message=lambda: _names(state.spans)
        )


async def test_a_request_the_queue_would_make_late_is_shed_by_its_deadline() -> None:
    async with shedding(max_queued=10) as state:
        state.admission.mean_hold_s = 2.0  # each request holds its slot ~2 s
        async with state.admission.slot():
            # One slot held: ~2 s to wait and ~2 s to be served, more than 1 s leaves.
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await state.stub.Infer(_echo(), timeout=1)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than the" in (raised.value.details() or "")
        assert _pushback(raised.value) == "75"
        assert state.servicer.calls == 0
        assert _server_spans(state.spans) == []


async def test_other_methods_pass_a_full_admission() -> None:
    async with shedding(max_queued=0) as state, state.admission.slot():
        reply = await state.stub.ListModels(edge_service_pb2.ListModelsRequest(), timeout=5)
    assert reply is not None


def _pushback(error: grpc.aio.AioRpcError) -> str | None:
    metadata: Any = error.trailing_metadata() or ()
    return {str(key): str(value) for key, value in metadata}.get(RETRY_PUSHBACK_METADATA_KEY)


async def test_a_loop_running_behind_sheds_whatever_the_slots_say() -> None:
    lag = LoopLag()
    admission = Admission(
        64, 256, 75, resource="the test", loop_lag=lambda: lag.lag_s, max_loop_lag_s=0.01
    )
    assert admission.refusal(1.0, shed_when_late=True) is None
    for _ in range(20):  # the loop answers each 10 ms timer 30 ms late
        lag.observe(0.03)
    refusal = admission.refusal(1.0, shed_when_late=True)
    assert refusal is not None
    assert "runs 30 ms behind (limit 10 ms)" in refusal.message
    assert refusal.retry_after_ms == 75
    with pytest.raises(ResourceExhaustedError):
        async with admission.slot():
            pass
    for _ in range(40):  # caught up
        lag.observe(0.0)
    assert admission.refusal(1.0, shed_when_late=True) is None
    # One late timer (a preemption) is smoothed, not overload.
    lag.observe(0.03)
    assert admission.refusal(1.0, shed_when_late=True) is None


async def test_the_loop_lag_sees_a_blocked_loop() -> None:
    lag = LoopLag(0.005)
    sampler = asyncio.create_task(lag.run())
    try:
        await asyncio.sleep(0.02)
        for _ in range(6):  # the loop is blocked 40 ms at a time
            time.sleep(0.04)  # noqa: ASYNC251 (blocking the loop is the point)
            await asyncio.sleep(0)
        assert lag.lag_s > 0.01
    finally:
        sampler.cancel()


async def test_grpcs_own_concurrent_rpc_limit_refuses_past_the_setting() -> None:
    servicer = ScriptedEdgeServicer()
    host = ServiceHost(
        ServiceSettings(
            service_name="limit-test", port=0, shutdown_grace_seconds=0, max_concurrent_rpcs=1
        ),
        [
            ServiceRegistration(
                EDGE_SERVICE,
                lambda server: edge_service_pb2_grpc.add_EdgeServiceServicer_to_server(
                    servicer, server
                ),
            )
        ],
    )
    await host.start()
    try:
        async with grpc.aio.insecure_channel(host.address) as channel:
            stub = edge_service_pb2_grpc.EdgeServiceStub(channel)
            slow = edge_service_pb2.InferRequest(
                request_id="held", model=model_pb2.ModelRef(name="slow")
            )
            held = asyncio.ensure_future(stub.Infer(slow, timeout=5))
            await servicer.entered.wait()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Infer(_echo(), timeout=5)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert servicer.calls == 1  # the refused call never reached the handler
            servicer.release.set()
            assert (await held).request_id == "held"
    finally:
        await host.stop(0)
