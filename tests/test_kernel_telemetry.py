"""services.telemetry / logging / channels: one trace across two services, logs carry it,
and calls without a deadline never leave the process."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_trace_id

from hybridmesh.common.v1 import model_pb2
from hybridmesh.edge.v1 import edge_service_pb2, edge_service_pb2_grpc
from services.channels import (
    CancelOnLeaveInterceptor,
    ChannelFactory,
    DeadlineRequiredInterceptor,
    MissingDeadlineError,
    per_call_kind,
)
from services.config import ServiceSettings
from services.logging import configure_logging
from services.server import ServiceHost, ServiceRegistration
from services.telemetry import Telemetry, create_telemetry
from tests.helpers.kernel_servicer import ScriptedEdgeServicer

EDGE_SERVICE = "hybridmesh.edge.v1.EdgeService"


@dataclass
class TwoServices:
    exporter: InMemorySpanExporter
    front: ServiceHost
    back: ServiceHost
    back_servicer: ScriptedEdgeServicer
    client_factory: ChannelFactory


def _telemetry(name: str, exporter: InMemorySpanExporter) -> Telemetry:
    return create_telemetry(
        name, span_processors=[SimpleSpanProcessor(exporter)], export_otlp=False
    )


def _host(name: str, servicer: ScriptedEdgeServicer, telemetry: Telemetry) -> ServiceHost:
    return ServiceHost(
        ServiceSettings(service_name=name, port=0),
        [
            ServiceRegistration(
                EDGE_SERVICE,
                lambda server: edge_service_pb2_grpc.add_EdgeServiceServicer_to_server(
                    servicer, server
                ),
            )
        ],
        interceptors=telemetry.server_interceptors(),
    )


@pytest.fixture
async def two_services() -> AsyncIterator[TwoServices]:
    """front --(instrumented channel)--> back, each with its own tracer provider."""
    exporter = InMemorySpanExporter()
    back_telemetry = _telemetry("back", exporter)
    back_servicer = ScriptedEdgeServicer()
    back = _host("back", back_servicer, back_telemetry)
    await back.start()

    front_telemetry = _telemetry("front", exporter)
    channel = ChannelFactory(front_telemetry.client_interceptors()).create(back.address)
    front = _host(
        "front",
        ScriptedEdgeServicer(downstream=edge_service_pb2_grpc.EdgeServiceStub(channel)),
        front_telemetry,
    )
    await front.start()
    client_telemetry = _telemetry("client", exporter)
    yield TwoServices(
        exporter, front, back, back_servicer, ChannelFactory(client_telemetry.client_interceptors())
    )
    await front.stop(grace=0)
    await back.stop(grace=0)
    await channel.close(grace=None)


def _request(model: str) -> edge_service_pb2.InferRequest:
    return edge_service_pb2.InferRequest(request_id="t1", model=model_pb2.ModelRef(name=model))


def _service_of(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"])


async def test_trace_context_crosses_two_services(two_services: TwoServices) -> None:
    async with two_services.client_factory.create(two_services.front.address) as channel:
        reply = await edge_service_pb2_grpc.EdgeServiceStub(channel).Infer(
            _request("forward"), timeout=5
        )
    assert reply.model.name == "echo"

    spans = two_services.exporter.get_finished_spans()
    by_role = {(_service_of(s), s.kind): s for s in spans}
    client = by_role[("client", SpanKind.CLIENT)]
    front_server = by_role[("front", SpanKind.SERVER)]
    front_client = by_role[("front", SpanKind.CLIENT)]
    back_server = by_role[("back", SpanKind.SERVER)]

    trace_ids = {s.context.trace_id for s in (client, front_server, front_client, back_server)}
    assert len(trace_ids) == 1
    assert front_server.parent is not None and back_server.parent is not None
    assert front_client.parent is not None
    assert front_server.parent.span_id == client.context.span_id
    assert front_client.parent.span_id == front_server.context.span_id
    assert back_server.parent.span_id == front_client.context.span_id


async def test_log_line_in_handler_carries_trace_id(two_services: TwoServices) -> None:
    stream = io.StringIO()
    configure_logging("info", stream)
    try:
        async with two_services.client_factory.create(two_services.back.address) as channel:
            await edge_service_pb2_grpc.EdgeServiceStub(channel).Infer(_request("echo"), timeout=5)
    finally:
        configure_logging("info")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    handled = [line for line in lines if line["event"] == "handling infer"]
    assert len(handled) == 1
    server_span = next(
        s
        for s in two_services.exporter.get_finished_spans()
        if _service_of(s) == "back" and s.kind == SpanKind.SERVER
    )
    assert handled[0]["trace_id"] == format_trace_id(server_span.context.trace_id)
    assert handled[0]["request_id"] == "t1"
    assert handled[0]["level"] == "info"


async def test_call_without_deadline_is_refused_before_sending(two_services: TwoServices) -> None:
    async with two_services.client_factory.create(two_services.back.address) as channel:
        stub = edge_service_pb2_grpc.EdgeServiceStub(channel)
        with pytest.raises(MissingDeadlineError, match="EdgeService/Infer"):
            await stub.Infer(_request("echo"))
        assert two_services.back_servicer.calls == 0
        # The same channel works once a deadline is given.
        await stub.Infer(_request("echo"), timeout=5)
        assert two_services.back_servicer.calls == 1


async def test_health_checks_are_not_traced(two_services: TwoServices) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with two_services.client_factory.create(two_services.back.address) as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert not [s for s in two_services.exporter.get_finished_spans() if "Health" in s.name]


def test_settings_read_their_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRIDMESH_PORT", "50123")
    monkeypatch.setenv("HYBRIDMESH_MAX_MESSAGE_BYTES", "1048576")
    settings = ServiceSettings()
    assert settings.port == 50123
    assert settings.max_message_bytes == 1048576
    monkeypatch.setenv("HYBRIDMESH_PORT", "70000")
    with pytest.raises(ValueError, match="port"):
        ServiceSettings()


def test_grpc_import_is_the_real_one() -> None:
    # Guards against a stub grpc on the path: these tests must run the real runtime.
    assert grpc.__version__.startswith("1.81")


# grpc.aio files an interceptor under the first call kind it implements only: the mesh's
# client interceptors are registered once per kind, so streaming calls are guarded too.


def test_each_interceptor_is_registered_for_every_kind_it_implements() -> None:
    assert len(per_call_kind(DeadlineRequiredInterceptor())) == 4
    assert len(per_call_kind(CancelOnLeaveInterceptor())) == 2


@pytest_asyncio.fixture
async def health_channel() -> AsyncIterator[grpc.aio.Channel]:
    """A ChannelFactory channel to a real server's grpc.health.v1."""
    host = ServiceHost(ServiceSettings(port=0, shutdown_grace_seconds=0), [])
    await host.start()
    channel = ChannelFactory().create(host.address)
    yield channel
    await channel.close(None)
    await host.stop(0)


async def test_a_streaming_call_without_a_deadline_is_refused(health_channel: Any) -> None:
    watch = health_pb2_grpc.HealthStub(health_channel).Watch(health_pb2.HealthCheckRequest())
    with pytest.raises(MissingDeadlineError, match="Health/Watch"):
        await watch.read()
