"""Issue 21 #6: the router serves with several worker processes on one port.

A real ``python -m router_service`` with ``HYBRIDMESH_ROUTER_WORKERS=2`` on port 0, in
front of the real edge node (in this process): both workers answer requests on the one
port (each worker's own /metrics names its pid and counts its Infer calls), SIGTERM to the
parent stops every worker, a killed worker is restarted, and a killed parent leaves no
orphans.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from rich.console import Console

from hybridmesh.router.v1 import router_service_pb2_grpc
from localmesh.commands import _print_outbox
from localmesh.launcher import MeshState
from router_service.config import RouterSettings
from router_service.outbox import Outbox
from tests.helpers.edge_node import RunningEdge
from tests.helpers.outbox_examples import item
from tests.helpers.paths import POLICY_ROOT, REPO
from tests.helpers.processes import alive, children, process_group
from tests.helpers.requests import _first_test_image, router_request
from tests.helpers.waiting import eventually

WORKERS = 2


def _free_port_pair() -> int:
    """A port whose successor is free too (the workers' /metrics ports)."""
    with ExitStack() as stack:
        for _ in range(50):
            first = stack.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports")


@dataclass
class WorkerRouter:
    process: subprocess.Popen[bytes]
    log: Path
    metrics_port: int
    port: int = 0

    def log_lines(self, event: str) -> list[dict[str, object]]:
        return [line for line in _json_records(self.log.read_text()) if line.get("event") == event]


def _json_records(text: str) -> list[dict[str, Any]]:
    """Every JSON record in a log the workers write to at once: two records can share a
    line (one process's newline lands after the other's record), and the last one can be
    half written while the test reads it (skipped; it is read whole on the next poll)."""
    decoder, records = json.JSONDecoder(), []
    for line in text.splitlines():
        at = 0
        while (at := len(line) - len(line[at:].lstrip())) < len(line):
            try:
                record, at = decoder.raw_decode(line, at)
            except json.JSONDecodeError:
                break
            records.append(record)
    return records


def _spawn_router(environment: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m router_service`` in its own session (its group is what a test checks)."""
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "router_service"],
            cwd=REPO,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )


@pytest.fixture
async def worker_router(running_edge: RunningEdge, tmp_path: Path) -> AsyncIterator[WorkerRouter]:
    metrics_port = _free_port_pair()
    with socket.socket() as probe:  # nothing listens there: the cloud is down
        probe.bind(("127.0.0.1", 0))
        cloud_port = probe.getsockname()[1]
    environment = {
        **os.environ,
        "HYBRIDMESH_ROUTER_WORKERS": str(WORKERS),
        "HYBRIDMESH_ROUTER_PORT": "0",
        "HYBRIDMESH_ROUTER_METRICS_PORT": str(metrics_port),
        "HYBRIDMESH_ROUTER_EDGE_TARGET": running_edge.node.host.address,
        "HYBRIDMESH_ROUTER_CLOUD_TARGET": f"127.0.0.1:{cloud_port}",
        "HYBRIDMESH_ROUTER_CATALOG": str(REPO / "models" / "catalog.toml"),
        "HYBRIDMESH_ROUTER_POLICIES_DIR": str(POLICY_ROOT.parent),
        "HYBRIDMESH_ROUTER_OUTBOX_PATH": str(tmp_path / "outbox.sqlite"),
        "HYBRIDMESH_ROUTER_AUDIT_LOG_PATH": str(tmp_path / "audit.log"),
        "HYBRIDMESH_ROUTER_SHUTDOWN_GRACE_SECONDS": "0",
    }
    log = tmp_path / "router.log"
    process = _spawn_router(environment, log)
    router = WorkerRouter(process, log, metrics_port)
    try:
        await eventually(
            lambda: len(router.log_lines("server started")) == WORKERS or process.poll(),
            timeout_s=60,
            message=lambda: log.read_text()[-2000:],
        )
        assert process.poll() is None, log.read_text()[-2000:]
        (serving,) = router.log_lines("serving with workers")
        router.port = int(str(serving["port"]))
        yield router
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
        return text


def _pid_and_infer_count(metrics: str) -> tuple[int, float]:
    pid = re.search(r'^target_info\{[^}]*process_pid="(\d+)"', metrics, re.MULTILINE)
    assert pid is not None, metrics[:500]
    counts = re.findall(
        r'^rpc_server_call_duration_seconds_count\{[^}]*rpc_method="Infer"[^}]*\} (\S+)',
        metrics,
        re.MULTILINE,
    )
    return int(pid.group(1)), sum(float(count) for count in counts)


async def _answered_by(router: WorkerRouter) -> dict[int, float]:
    """Worker pid -> Infer calls it has answered, from each worker's own /metrics."""
    answered = {}
    for index in range(WORKERS):
        metrics = await asyncio.to_thread(_scrape, router.metrics_port + index)
        pid, count = _pid_and_infer_count(metrics)
        answered[pid] = count
    return answered


async def test_two_workers_answer_on_one_port(worker_router: WorkerRouter) -> None:
    image = _first_test_image()
    # Each channel its own connection (no subchannel shared across channels): the kernel
    # spreads connections, not calls, over the workers listening on the port.
    for attempt in range(64):
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{worker_router.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            await stub.Infer(router_request(image), timeout=10, wait_for_ready=True)
        answered = await _answered_by(worker_router)
        if attempt >= 1 and all(count > 0 for count in answered.values()):
            break
    assert set(answered) == set(children(worker_router.process.pid))
    assert len(answered) == WORKERS
    assert all(count > 0 for count in answered.values()), answered


async def test_sigterm_to_the_parent_stops_every_worker(worker_router: WorkerRouter) -> None:
    workers = children(worker_router.process.pid)
    assert len(workers) == WORKERS
    worker_router.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker_router.process.wait, 30) == 0
    assert alive(workers) == []
    assert process_group(worker_router.process.pid) == {}
    assert len(worker_router.log_lines("server stopped")) == WORKERS


async def test_a_dead_worker_is_restarted_on_the_same_port(
    worker_router: WorkerRouter,
) -> None:
    parent = worker_router.process.pid
    first, second = sorted(children(parent))
    os.kill(first, signal.SIGKILL)
    await eventually(lambda: len(children(parent)) == WORKERS and first not in children(parent))
    (exited,) = worker_router.log_lines("worker exited")
    assert exited["exit_code"] == -signal.SIGKILL
    assert second in children(parent)
    # The new worker serves the same port: its own /metrics answers with its pid.
    restarted = next(pid for pid in children(parent) if pid != second)
    await eventually(lambda: len(worker_router.log_lines("server started")) == WORKERS + 1)
    assert restarted in await _answered_by(worker_router)


async def test_a_killed_parent_leaves_no_orphans(worker_router: WorkerRouter) -> None:
    workers = children(worker_router.process.pid)
    worker_router.process.kill()
    worker_router.process.wait()
    await eventually(lambda: alive(workers) == [])


def test_each_worker_has_its_own_outbox_and_metrics_port(tmp_path: Path) -> None:
    settings = RouterSettings(
        workers=3,
        metrics_port=9100,
        outbox_path=tmp_path / "outbox.sqlite",
        policy_update_staging=tmp_path / "staging",
        drain_rate_per_s=30.0,
    )
    second = settings.for_worker(1, 5000)
    assert second.port == 5000
    assert second.metrics_port == 9101
    assert second.outbox_path == tmp_path / "outbox.worker1.sqlite"
    assert second.policy_update_staging == tmp_path / "staging" / "worker1"
    assert second.drain_rate_per_s == pytest.approx(10.0)
    single = RouterSettings(outbox_path=tmp_path / "outbox.sqlite").for_worker(0, 5000)
    assert single.outbox_path == tmp_path / "outbox.sqlite"


def test_several_workers_refuse_a_co_located_edge() -> None:
    with pytest.raises(ValueError, match="workers > 1 needs edge_mode"):
        RouterSettings(workers=2, edge_mode="in-process")


def test_status_lists_every_workers_outbox(tmp_path: Path) -> None:
    settings = RouterSettings(workers=2, outbox_path=tmp_path / "outbox.sqlite")
    for index, depth in ((0, 1), (1, 2)):
        outbox = Outbox(settings.for_worker(index, 0).outbox_path, max_items=10)
        for number in range(depth):
            outbox.put(item(f"w{index}-{number}"))
        outbox.close()
    console = Console(record=True, width=200)
    state = MeshState(str(tmp_path), {}, {}, {}, 40, outbox=str(settings.outbox_path))
    _print_outbox(state, console)
    text = console.export_text()
    assert "worker0: 1 queued" in text
    assert "worker1: 2 queued" in text


def test_outbox_files_of_another_workers_count_are_warned_about(tmp_path: Path) -> None:
    """Each worker drains only its own file: after a restart from 2 workers to 1, the
    queued items of outbox.worker<i>.sqlite would never reach the cloud, silently."""
    from router_service.__main__ import warn_stranded_outboxes

    two = RouterSettings(workers=2, outbox_path=tmp_path / "outbox.sqlite")
    for index, depth in ((0, 0), (1, 2)):
        outbox = Outbox(two.for_worker(index, 0).outbox_path, max_items=10)
        for number in range(depth):
            outbox.put(item(f"w{index}-{number}"))
        outbox.close()
    assert warn_stranded_outboxes(two) == []
    one = RouterSettings(workers=1, outbox_path=tmp_path / "outbox.sqlite")
    (warning,) = warn_stranded_outboxes(one)  # worker0's file is empty: nothing lost there
    assert warning.startswith(f"{tmp_path / 'outbox.worker1.sqlite'} holds 2 queued item(s)")
    single = Outbox(one.outbox_path, max_items=10)
    single.put(item("single"))
    single.close()
    (back,) = warn_stranded_outboxes(two)
    assert back.startswith(f"{tmp_path / 'outbox.sqlite'} holds 1 queued item(s)")
