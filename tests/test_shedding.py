"""services.shedding: a request the admission rule refuses is refused before tracing.

A real grpc.aio server (ServiceHost) with the router's interceptor order (RPC metric,
shedding, tracing, error mapping) around the kernel test servicer; the admission's one
slot is held by the test itself.
"""

from __future__ import annotations

import contextlib
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
from services.errors import RETRY_PUSHBACK_METADATA_KEY
from services.server import ServiceHost, ServiceRegistration
from services.shedding import SheddingInterceptor
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
    rpc_metrics, *tracing = telemetry.server_interceptors()
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
        interceptors=[rpc_metrics, SheddingInterceptor(admission, [INFER]), *tracing],
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
