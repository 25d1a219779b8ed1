"""Issue 20 #3: when the cloud cannot be reached at all, nothing is recorded as sent.

A real router whose cloud target is a closed port (connection refused), an unresolvable
name, and a plaintext server spoken to with TLS: every escalation keeps the edge answer,
owes the item to the outbox, bills nothing and says no data left; the audit log records
the attempt and that it was not sent.
"""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import pytest

from hybridmesh.common.v1 import decision_pb2, routing_pb2
from router_service.tier_api import never_connected
from tests.helpers.scripted_tiers import HARD, request, scripted_mesh


def closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize("target", ["closed-port", "nonexistent.invalid:443"])
async def test_an_unreachable_cloud_is_not_billed_or_said_to_have_received_data(
    tmp_path: Path, target: str
) -> None:
    cloud_target = closed_port() if target == "closed-port" else target
    async with scripted_mesh(tmp_path, wait_for=("edge",), cloud_target=cloud_target) as mesh:
        reply = await mesh.stub.Infer(request([HARD], mesh, request_id="u1"), timeout=3)
        decision = reply.decision
        assert decision.served_by == routing_pb2.TIER_EDGE
        assert (
            reply.predictions[0].reason == decision_pb2.DECISION_REASON_CLOUD_FAILED_EDGE_FALLBACK
        )
        assert decision.degraded and decision.queued_for_reconciliation
        assert not decision.data_left_site and decision.cost.cloud_micros == 0
        events = [record["event"] for record in mesh.audited("u1")]
        assert events == ["off-site transfer", "off-site transfer not sent"]


async def _failure_details(channel: grpc.aio.Channel) -> tuple[grpc.StatusCode, str]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    raise AssertionError("the call should have failed")


async def test_the_never_connected_markers_match_real_grpc_failures() -> None:
    """Pins NEVER_CONNECTED_MARKERS to what this grpcio says for each kind of failure."""
    server = grpc.aio.server()
    plaintext_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels: list[grpc.aio.Channel] = [
        grpc.aio.insecure_channel(closed_port()),
        grpc.aio.insecure_channel("nonexistent.invalid:443"),
        grpc.aio.secure_channel(f"127.0.0.1:{plaintext_port}", grpc.ssl_channel_credentials()),
    ]
    try:
        for channel in channels:
            code, detail = await _failure_details(channel)
            assert never_connected(code, detail), detail
    finally:
        for channel in channels:
            await channel.close(None)
        await server.stop(0)
    # A failure reported by a reached peer is not mistaken for one.
    assert not never_connected(grpc.StatusCode.UNAVAILABLE, "scripted unavailable")


def test_a_reached_peer_quoting_an_inner_connect_failure_is_not_mistaken() -> None:
    """The cloud service was reached and says Triton is unreachable: the data did leave."""
    quoted = "Triton unreachable: failed to connect to all addresses; last error: ..."
    assert not never_connected(grpc.StatusCode.UNAVAILABLE, quoted)
    assert never_connected(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; x")
