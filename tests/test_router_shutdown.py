"""Shutdown is not held up by endless streams: when the router drains, an idle
WatchCorrections stream ends at once with UNAVAILABLE "server shutting down" and the
process exits well inside its grace (it used to wait out the whole grace)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import grpc
import pytest

from hybridmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
from router_service.app import RouterNode, pairs_from_catalog
from router_service.corrections import CorrectionFeed
from router_service.outbox import Outbox
from services.config import ServiceSettings
from services.errors import UnavailableError
from services.server import ServiceHost
from services.telemetry import create_telemetry
from tests.helpers.outbox_examples import item, results
from tests.helpers.paths import REPO
from tests.helpers.router_node import router_settings
from tests.helpers.waiting import eventually

GRACE_S = 5.0


def unused_port() -> int:
    """A port nothing listens on: the router's tiers are down, which a watch does not need."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_draining_ends_an_idle_watch_and_refuses_new_ones() -> None:
    feed = CorrectionFeed()
    watch = feed.watch("", [])
    waiting = asyncio.ensure_future(anext(watch))
    await eventually(lambda: feed.subscribers == 1, timeout_s=2)
    feed.close()
    with pytest.raises(UnavailableError, match="server shutting down"):
        await asyncio.wait_for(waiting, timeout=2)
    assert feed.subscribers == 0
    with pytest.raises(UnavailableError, match="server shutting down"):
        await anext(feed.watch("", []))


async def test_the_host_signals_draining_before_it_drains() -> None:
    host = ServiceHost(ServiceSettings(port=0, shutdown_grace_seconds=GRACE_S), [])
    await host.start()
    seen: list[str] = []

    def broken() -> None:
        raise RuntimeError("a broken hook must not block the stop")

    host.on_draining(lambda: seen.append(f"first, draining={host.draining.is_set()}"))
    host.on_draining(broken)
    host.on_draining(lambda: seen.append("second"))
    assert not host.draining.is_set()
    await host.stop()
    assert seen == ["first, draining=True", "second"]


async def test_router_stop_with_an_idle_watch_open_ends_well_inside_the_grace(
    tmp_path: Path,
) -> None:
    settings = router_settings(
        f"127.0.0.1:{unused_port()}",
        f"127.0.0.1:{unused_port()}",
        shutdown_grace_seconds=GRACE_S,
        outbox_path=tmp_path / "outbox.sqlite",
    )
    telemetry = create_telemetry("router", export_otlp=False)
    node = RouterNode(settings, telemetry, pairs_from_catalog(settings.catalog))
    await node.start()
    drain_started: list[float] = []
    node.host.on_draining(lambda: drain_started.append(time.monotonic()))
    channel = grpc.aio.insecure_channel(node.host.address)
    try:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        watch = stub.WatchCorrections(router_service_pb2.WatchCorrectionsRequest())
        await eventually(lambda: node.reconciler.feed.subscribers == 1, timeout_s=5)
        await node.stop(GRACE_S)
        stopped = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(watch.read(), timeout=2)
    finally:
        await channel.close(None)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "server shutting down" in str(ended.value.details())
    assert node.host.draining.is_set()
    stop_s = stopped - drain_started[0]
    assert stop_s < 1.0, f"stop took {stop_s:.2f} s of a {GRACE_S} s grace"


@pytest.mark.slow
async def test_python_m_router_service_exits_inside_its_grace_on_sigterm(tmp_path: Path) -> None:
    # One recorded correction: the watch answers it first, so the client knows the
    # stream is open and subscribed on the server before the signal.
    outbox = Outbox(tmp_path / "outbox.sqlite", max_items=10)
    outbox.put(item("r-1"))
    assert outbox.complete("r-1", results("r-1", 1.0))
    outbox.close()
    port = unused_port()
    environment = {
        **os.environ,
        "HYBRIDMESH_ROUTER_PORT": str(port),
        "HYBRIDMESH_ROUTER_EDGE_TARGET": f"127.0.0.1:{unused_port()}",
        "HYBRIDMESH_ROUTER_CLOUD_TARGET": f"127.0.0.1:{unused_port()}",
        "HYBRIDMESH_ROUTER_OUTBOX_PATH": str(tmp_path / "outbox.sqlite"),
        "HYBRIDMESH_ROUTER_AUDIT_LOG_PATH": str(tmp_path / "audit.log"),
        "HYBRIDMESH_ROUTER_SHUTDOWN_GRACE_SECONDS": str(GRACE_S),
        "HYBRIDMESH_ROUTER_LOG_LEVEL": "warning",
    }
    router = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router_service",
        cwd=REPO,
        env=environment,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=30)
            watch = router_service_pb2_grpc.RouterServiceStub(channel).WatchCorrections(
                router_service_pb2.WatchCorrectionsRequest(include_recorded=True), timeout=60
            )
            first = await asyncio.wait_for(watch.read(), timeout=10)
            assert isinstance(first, router_service_pb2.WatchCorrectionsResponse)
            assert first.correction.request_id == "r-1"  # open, and now idle
            signalled = time.monotonic()
            router.send_signal(signal.SIGTERM)
            exit_code = await asyncio.wait_for(router.wait(), GRACE_S + 5)
            exited_s = time.monotonic() - signalled
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(watch.read(), timeout=2)
    finally:
        if router.returncode is None:
            router.kill()
            await router.wait()
    errors = (await router.stderr.read()).decode() if router.stderr else ""
    assert exit_code == 0, errors[-2000:]
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "server shutting down" in str(ended.value.details())
    assert exited_s < GRACE_S / 2, f"exited {exited_s:.2f} s after SIGTERM"
