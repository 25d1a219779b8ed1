"""The Triton launcher: readiness with a clear error, clean stop, kill, and no orphan
process (tritonserver's python backend stubs are its children) whatever happens."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_grpc

from localmesh.launcher import LocalMesh, MeshOptions, MeshState, grpc_serving
from localmesh.triton import (
    TRITON_HOME,
    RestartBudget,
    RestartPolicy,
    TritonServer,
    TritonStartError,
    free_port,
)
from services.logging import get_logger
from tests.helpers.cloud_service import SLOW_MODEL, write_toy_model
from tests.helpers.paths import REPO, STORE
from tests.helpers.processes import alive, process_group
from tests.helpers.requests import CLOUD_MODEL
from tests.helpers.waiting import eventually
from workload.triton_repository import write_repository

pytestmark = pytest.mark.slow
_log = get_logger("tests.localmesh_triton")


def small_repository(path: Path) -> Path:
    write_repository(STORE, path, "local", [CLOUD_MODEL])
    write_toy_model(path, SLOW_MODEL, execute_delay_s=0.1)
    return path


async def answers(url: str) -> bool:
    client = triton_grpc.InferenceServerClient(url)
    try:
        image = triton_grpc.InferInput("image", [1, 1, 28, 28], "UINT8")
        image.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.uint8))
        result = await client.infer(CLOUD_MODEL, [image], client_timeout=5)
        return bool(result.as_numpy("logits").shape == (1, 10))
    finally:
        await client.close()


async def test_stop_ends_triton_and_its_backend_stubs(tmp_path: Path) -> None:
    server = TritonServer(small_repository(tmp_path / "repository"), tmp_path / "run")
    async with server:
        assert server.pid is not None
        members = process_group(server.pid)
        assert len(members) >= 3, "tritonserver plus one python backend stub per model"
        assert await answers(server.grpc_url)
        # The stub went into a private copy of the backends, never into site-packages.
        assert (tmp_path / "run" / "backends" / "python" / "triton_python_backend_stub").exists()
        assert not (TRITON_HOME / "backends" / "python" / "triton_python_backend_stub").exists()
    assert server.process is not None and server.process.returncode == 0, "clean SIGTERM exit"
    assert alive(list(members)) == []


async def test_kill_leaves_no_process_behind(tmp_path: Path) -> None:
    server = TritonServer(small_repository(tmp_path / "repository"), tmp_path / "run")
    async with server:
        assert server.pid is not None
        members = list(process_group(server.pid))
        stubs = [pid for pid in members if pid != server.pid]
        # Frozen stubs cannot notice their parent dying and exit on their own (they do
        # within ~0.3 s otherwise): only a kill of the whole group ends them.
        for stub in stubs:
            os.kill(stub, signal.SIGSTOP)
        server.kill()
        # Their zombies are reparented to init, which reaps them.
        await eventually(lambda: alive(members) == [], timeout_s=5)
    assert server.process is not None and server.process.returncode == -signal.SIGKILL


async def test_a_model_that_fails_to_load_is_a_clear_error(tmp_path: Path) -> None:
    repository = small_repository(tmp_path / "repository")
    write_toy_model(repository, "broken", initialize_error="weights are missing on purpose")
    server = TritonServer(repository, tmp_path / "run", ready_timeout_s=30)
    with pytest.raises(TritonStartError) as failed:
        await server.__aenter__()
    # The log tail says which model and why, without opening the log file.
    assert "broken" in str(failed.value) and "weights are missing on purpose" in str(failed.value)
    assert server.pid is not None
    await eventually(lambda: alive(list(process_group(server.pid or 0))) == [], timeout_s=5)


async def test_readiness_times_out_with_the_log_tail_and_cleans_up(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    write_toy_model(repository, "slow-to-load", initialize_delay_s=60)
    server = TritonServer(repository, tmp_path / "run", ready_timeout_s=2)
    started = asyncio.get_running_loop().time()
    with pytest.raises(TritonStartError, match="not ready after 2") as failed:
        await server.__aenter__()
    assert "slow-to-load" in str(failed.value)  # the tail shows the model still loading
    assert server.pid is not None
    members = list(process_group(server.pid)) or [server.pid]
    # 2 s of waiting, then SIGTERM with 2 s of grace, then SIGKILL: never a hang.
    assert asyncio.get_running_loop().time() - started < 2 + 2 + 5
    await eventually(lambda: alive([*members, server.pid or 0]) == [], timeout_s=5)


async def test_the_cli_serves_until_sigterm_then_leaves_nothing(tmp_path: Path) -> None:
    repository = small_repository(tmp_path / "repository")
    port = free_port()
    log = tmp_path / "cli.log"
    with log.open("wb") as output:
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "localmesh.triton",
            "--model-repository",
            str(repository),
            "--run-dir",
            str(tmp_path / "run"),
            "--grpc-port",
            str(port),
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def serving() -> dict[str, object] | None:
            for line in log.read_text().splitlines():
                if line.startswith("{") and '"triton serving' in line:
                    entry: dict[str, object] = json.loads(line)
                    return entry
            assert cli.returncode is None, log.read_text()
            return None

        await eventually(serving, timeout_s=60)
        entry = serving()
        assert entry is not None and entry["grpc"] == f"127.0.0.1:{port}"
        assert await answers(f"127.0.0.1:{port}")
        triton_pid = int(str(entry["pid"]))
        members = list(process_group(triton_pid))
        assert triton_pid in members and len(members) >= 3
        # Only the CLI is signalled: it must stop its Triton itself.
        cli.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(cli.wait(), 30) == 0
        assert alive(members) == []
    finally:
        if cli.returncode is None:
            os.killpg(cli.pid, signal.SIGKILL)
            await cli.wait()


# -- supervision: a dead Triton is restarted, within bounds ---------------------------


def test_restart_budget_backs_off_and_runs_out() -> None:
    now = [0.0]
    budget = RestartBudget(
        RestartPolicy(max_restarts=3, window_s=60.0, backoff_s=0.5, max_backoff_s=1.5),
        clock=lambda: now[0],
    )
    assert [budget.next_delay() for _ in range(3)] == [0.5, 1.0, 1.5]  # capped
    assert budget.next_delay() is None  # three in the window: spent
    now[0] = 61.0  # the window has moved past them
    assert budget.next_delay() == 0.5


async def not_serving(address: str) -> bool:
    return not await grpc_serving(address)


def triton_mesh(tmp_path: Path, last_part: str, max_restarts: int) -> LocalMesh:
    """The first parts of the local mesh (Triton, and the cloud service if asked)."""
    return LocalMesh(
        MeshOptions(
            state_dir=tmp_path / "mesh",
            repository_root=REPO,
            random_ports=True,
            last_part=last_part,
            triton_restarts=RestartPolicy(max_restarts, window_s=600.0, backoff_s=0.2),
        )
    )


async def test_the_local_mesh_restarts_a_killed_triton(tmp_path: Path) -> None:
    mesh = triton_mesh(tmp_path, "cloud", max_restarts=2)
    state = await mesh.up()
    try:
        cloud = state.endpoints["cloud"]
        old_pid = state.pids["triton"]
        assert await grpc_serving(cloud)
        os.killpg(old_pid, signal.SIGKILL)
        killed = time.monotonic()
        await eventually(lambda: not_serving(cloud), timeout_s=10)
        await eventually(
            lambda: MeshState.read(mesh.state_dir).pids["triton"] != old_pid, timeout_s=10
        )
        new_pid = MeshState.read(mesh.state_dir).pids["triton"]
        await eventually(lambda: grpc_serving(cloud), timeout_s=60)
        _log.info("triton restarted", seconds=round(time.monotonic() - killed, 2))
        assert alive([new_pid]) == [new_pid] and not alive([old_pid])
        assert mesh.processes["triton"].pid == new_pid
        assert process_group(old_pid) == {}  # its python stubs went with it
    finally:
        await mesh.down(grace_s=5.0)
    assert not alive([new_pid])


async def test_restarts_stop_when_the_budget_is_spent(tmp_path: Path) -> None:
    """A Triton that keeps dying is not restarted forever."""
    mesh = triton_mesh(tmp_path, "triton", max_restarts=1)
    state = await mesh.up()
    try:
        first = state.pids["triton"]
        os.killpg(first, signal.SIGKILL)
        await eventually(lambda: MeshState.read(mesh.state_dir).pids["triton"] != first)
        assert mesh.triton is not None
        await mesh.triton.wait_ready()
        second = MeshState.read(mesh.state_dir).pids["triton"]
        os.killpg(second, signal.SIGKILL)
        supervisor = mesh._triton_supervisor
        assert supervisor is not None
        await asyncio.wait_for(supervisor, timeout=10)  # it gives up, and says so
        assert MeshState.read(mesh.state_dir).pids["triton"] == second
        assert not alive([second])
    finally:
        await mesh.down(grace_s=5.0)
