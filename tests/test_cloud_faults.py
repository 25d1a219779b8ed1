"""cloud_inference when Triton fails: killed with requests in flight, hung, restarted, or
never there. Every call ends within its deadline with the right status, and health
follows Triton both ways."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from hybridmesh.cloud.v1 import cloud_service_pb2
from localmesh.triton import TritonServer, free_port
from tests.helpers.cloud_service import (
    AUTH,
    IMAGES,
    NOT_SERVING,
    SERVING,
    SLOW_MODEL,
    cloud_settings,
    start_cloud,
    toy_executions,
    triton_checks,
    write_cloud_repository,
)
from tests.helpers.requests import CLOUD_MODEL, cloud_request
from tests.helpers.waiting import eventually

pytestmark = pytest.mark.slow


async def test_triton_killed_in_flight_gives_unavailable_then_recovers(tmp_path: Path) -> None:
    write_cloud_repository(tmp_path / "repository")
    port = free_port()
    doomed = TritonServer(tmp_path / "repository", tmp_path / "run", grpc_port=port)
    doomed.start_process()
    await doomed.wait_ready()
    running = await start_cloud(cloud_settings(doomed.grpc_url))
    try:
        # One slow request executes, the rest queue in Triton: all are in flight.
        in_flight = [
            asyncio.ensure_future(
                running.stub.Infer(cloud_request(model=SLOW_MODEL), timeout=5, metadata=AUTH)
            )
            for _ in range(6)
        ]
        await eventually(lambda: toy_executions(tmp_path / "repository", SLOW_MODEL) > 0)
        assert not any(call.done() for call in in_flight)
        started = time.monotonic()
        doomed.kill()
        results = await asyncio.gather(*in_flight, return_exceptions=True)
        assert time.monotonic() - started < 5, "no call may outlive its deadline"
        assert all(isinstance(r, grpc.aio.AioRpcError) for r in results), results
        assert {r.code() for r in results} == {grpc.StatusCode.UNAVAILABLE}  # type: ignore[union-attr]

        with pytest.raises(grpc.aio.AioRpcError) as after:
            await running.stub.Infer(cloud_request(), timeout=3, metadata=AUTH)
        assert after.value.code() == grpc.StatusCode.UNAVAILABLE
        await eventually(lambda: running.health_is(NOT_SERVING), timeout_s=5)

        # Triton comes back on the same address: health and answers come back with it.
        async with TritonServer(tmp_path / "repository", tmp_path / "run-2", grpc_port=port):
            await eventually(lambda: running.health_is(SERVING), timeout_s=10)
            reply = await running.stub.Infer(cloud_request(IMAGES[:2]), timeout=5, metadata=AUTH)
            assert reply.model.name == CLOUD_MODEL and len(reply.classifications) == 2
    finally:
        await running.stop()
        await doomed.stop()


async def test_hung_triton_gives_deadline_exceeded_and_not_serving(tmp_path: Path) -> None:
    write_cloud_repository(tmp_path / "repository")
    async with TritonServer(tmp_path / "repository", tmp_path / "run") as triton:
        running = await start_cloud(cloud_settings(triton.grpc_url))
        assert triton.pid is not None
        try:
            # Stopped, not dead: the connection stays open and nothing ever answers.
            os.killpg(triton.pid, signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as hung:
                await running.stub.Infer(cloud_request(), timeout=0.5, metadata=AUTH)
            assert hung.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 0.5 + 1.0
            await eventually(lambda: running.health_is(NOT_SERVING), timeout_s=5)
            os.killpg(triton.pid, signal.SIGCONT)
            await eventually(lambda: running.health_is(SERVING), timeout_s=5)
            assert (await running.stub.Infer(cloud_request(), timeout=5, metadata=AUTH)).outputs
        finally:
            os.killpg(triton.pid, signal.SIGCONT)
            await running.stop()


async def test_without_triton_the_service_is_up_but_not_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running = await start_cloud(
        cloud_settings(f"127.0.0.1:{free_port()}"), [CLOUD_MODEL], wait_ready=False
    )
    checks = triton_checks(running.node, monkeypatch)
    try:
        await eventually(lambda: checks() >= 3)  # a few health polls
        assert await running.health() == NOT_SERVING
        for call in (
            running.stub.Infer(cloud_request(), timeout=2, metadata=AUTH),
            running.stub.ListModels(
                cloud_service_pb2.ListModelsRequest(), timeout=2, metadata=AUTH
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Triton" in (refused.value.details() or "")
    finally:
        await running.stop()
