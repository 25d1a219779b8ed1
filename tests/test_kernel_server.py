"""services.server: health on port 0, graceful SIGTERM shutdown, error mapping."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hybridmesh.common.v1 import model_pb2
from hybridmesh.edge.v1 import edge_service_pb2, edge_service_pb2_grpc
from services.config import ServiceSettings
from services.errors import RETRY_PUSHBACK_METADATA_KEY, field_violations
from services.server import ServiceHost, ServiceRegistration
from tests.helpers.kernel_servicer import ScriptedEdgeServicer

EDGE_SERVICE = "hybridmesh.edge.v1.EdgeService"


def _host(servicer: ScriptedEdgeServicer, **settings: Any) -> ServiceHost:
    return ServiceHost(
        ServiceSettings(service_name="kernel-test", port=0, **settings),
        [
            ServiceRegistration(
                EDGE_SERVICE,
                lambda server: edge_service_pb2_grpc.add_EdgeServiceServicer_to_server(
                    servicer, server
                ),
            )
        ],
    )


@pytest.fixture
async def servicer() -> ScriptedEdgeServicer:
    return ScriptedEdgeServicer()


@pytest.fixture
async def host(servicer: ScriptedEdgeServicer) -> AsyncIterator[ServiceHost]:
    host = _host(servicer, shutdown_grace_seconds=5.0)
    await host.start()
    yield host
    await host.stop(grace=0)


def _infer(model: str) -> edge_service_pb2.InferRequest:
    return edge_service_pb2.InferRequest(request_id="r1", model=model_pb2.ModelRef(name=model))


async def test_server_on_port_zero_reports_serving_and_reflects(host: ServiceHost) -> None:
    assert host.port > 0
    async with grpc.aio.insecure_channel(host.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", EDGE_SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = set()
        async for response in responses:
            names = {s.name for s in response.list_services_response.service}
        assert {EDGE_SERVICE, "grpc.health.v1.Health"} <= names


async def test_service_not_ready_at_start_keeps_overall_not_serving() -> None:
    host = ServiceHost(
        ServiceSettings(port=0),
        [
            ServiceRegistration(
                EDGE_SERVICE,
                lambda server: edge_service_pb2_grpc.add_EdgeServiceServicer_to_server(
                    ScriptedEdgeServicer(), server
                ),
                serving_at_start=False,
            )
        ],
    )
    await host.start()
    try:
        async with grpc.aio.insecure_channel(host.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert (await health.Check(check, timeout=5)).status == not_serving
            liveness = health_pb2.HealthCheckRequest(service="liveness")
            serving_now = health_pb2.HealthCheckResponse.SERVING
            assert (await health.Check(liveness, timeout=5)).status == serving_now
            await host.set_serving(EDGE_SERVICE, True)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert (await health.Check(check, timeout=5)).status == serving
    finally:
        await host.stop(grace=0)


async def test_sigterm_flips_health_to_not_serving_and_in_flight_rpc_completes(
    servicer: ScriptedEdgeServicer,
) -> None:
    host = _host(servicer, shutdown_grace_seconds=10.0)
    await host.start()
    host.stop_on_signals((signal.SIGTERM,))
    try:
        async with grpc.aio.insecure_channel(host.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=EDGE_SERVICE), timeout=10
            )
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING

            in_flight = edge_service_pb2_grpc.EdgeServiceStub(channel).Infer(
                _infer("slow"), timeout=10
            )
            await asyncio.wait_for(servicer.entered.wait(), 5)

            os.kill(os.getpid(), signal.SIGTERM)
            flipped = await asyncio.wait_for(watch.read(), 5)
            assert flipped.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not in_flight.done(), "the in-flight RPC must still be running at the flip"
            watch.cancel()  # a watcher would otherwise hold the drain for the whole grace

            servicer.release.set()
            reply = await in_flight
            assert reply.request_id == "r1"
            assert await in_flight.code() == grpc.StatusCode.OK
        await asyncio.wait_for(host.wait_for_termination(), 10)
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        await host.stop(grace=0)


async def test_service_error_maps_to_status_with_field_details(host: ServiceHost) -> None:
    async with grpc.aio.insecure_channel(host.address) as channel:
        stub = edge_service_pb2_grpc.EdgeServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.Infer(_infer("invalid"), timeout=5)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs[0].shape" in (invalid.value.details() or "")
        assert field_violations(invalid.value) == {
            "inputs[0].shape": "expected [n,1,28,28], got [1,28]"
        }

        with pytest.raises(grpc.aio.AioRpcError) as overloaded:
            await stub.Infer(_infer("overloaded"), timeout=5)
        assert overloaded.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers: list[Any] = list(overloaded.value.trailing_metadata() or ())
        assert (RETRY_PUSHBACK_METADATA_KEY, "250") in [tuple(item) for item in trailers]


async def test_unexpected_exception_is_internal_without_leaking_and_server_survives(
    host: ServiceHost,
) -> None:
    async with grpc.aio.insecure_channel(host.address) as channel:
        stub = edge_service_pb2_grpc.EdgeServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as bug:
            await stub.Infer(_infer("bug"), timeout=5)
        assert bug.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in (bug.value.details() or "")
        reply = await stub.Infer(_infer("echo"), timeout=5)
        assert reply.model.name == "echo"


async def test_message_over_configured_limit_is_refused(servicer: ScriptedEdgeServicer) -> None:
    host = _host(servicer, max_message_bytes=64 * 1024)
    await host.start()
    try:
        async with grpc.aio.insecure_channel(host.address) as channel:
            stub = edge_service_pb2_grpc.EdgeServiceStub(channel)
            big = _infer("echo")
            big.request_id = "x" * (128 * 1024)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Infer(big, timeout=5)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert servicer.calls == 0
    finally:
        await host.stop(grace=0)
