"""What ``hybridmesh up | down | status | demo`` do (the parser is ``localmesh.cli``):
loaded only when one of them runs, so ``hybridmesh --help`` and the policy and registry
commands do not import the launcher, Triton's or the demo's libraries.

``<state-dir>/state.json``: {"endpoints": {...}, "pids": {...}, "logs": {...},
"wan_delay_ms": N, "state_dir": ..., "started_at": ..., "supervisor_pid": N, "catalog":
..., "store": ..., "metrics": {...}}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console

from hybridmesh.registry.v1 import registry_service_pb2 as registry_pb
from hybridmesh.registry.v1 import registry_service_pb2_grpc
from localmesh.demo import run_demo
from localmesh.launcher import (
    STATE_FILE,
    LocalMesh,
    MeshOptions,
    MeshState,
    StateFileError,
    down_from_state,
    grpc_serving,
    running,
)
from localmesh.ota import ModelSources
from localmesh.otlp_receiver import OtlpReceiver
from ota.registry_client import KIND_NAMES
from router_service.escalation import DEFAULT_POLICY_VERSION
from router_service.outbox import read_stats
from router_service.policy_updater import POLICY_KIND
from services.auth import bearer_metadata
from services.logging import configure_logging
from workload.catalog import load_catalog
from workload.model_store import versions


def _options(args: argparse.Namespace, **extra: object) -> MeshOptions:
    return MeshOptions(
        state_dir=args.state_dir,
        random_ports=args.random_ports,
        wan_delay_ms=args.wan_delay_ms,
        otlp_grpc_endpoint=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        otlp_http_traces_url=os.environ.get("HYBRIDMESH_TRITON_OTLP_HTTP_URL"),
        log_level="warning",
        models=ModelSources(args.catalog, args.store, args.policies),
        edge_mode=args.edge_mode,
        workers=args.workers,
        **extra,  # type: ignore[arg-type]
    )


async def up(args: argparse.Namespace, console: Console) -> int:
    if (args.state_dir / STATE_FILE).exists():
        console.print(
            f"a mesh is already up ({args.state_dir / STATE_FILE}); `hybridmesh down` first"
        )
        return 1
    mesh = LocalMesh(_options(args))
    state = await mesh.up()
    _print_endpoints(state, console)
    console.print("mesh up; Ctrl-C stops it")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await mesh.down()
    (args.state_dir / STATE_FILE).unlink(missing_ok=True)
    return 0


def _print_endpoints(state: MeshState, console: Console) -> None:
    for name, endpoint in state.endpoints.items():
        console.print(f"  {name:12} {endpoint}")
    console.print(f"state: {Path(state.state_dir) / STATE_FILE}")


# The parts start one after another, each given up to a minute.
DETACHED_START_TIMEOUT_S = 420.0


def up_detached(args: argparse.Namespace, console: Console) -> int:
    """Start ``hybridmesh up`` in the background (own session, output to a log) and return
    once it has written the state file, i.e. every part is healthy."""
    state_file = args.state_dir / STATE_FILE
    if state_file.exists():
        console.print(f"a mesh is already up ({state_file}); `hybridmesh down` first")
        return 1
    log = args.state_dir / "logs" / "mesh.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "localmesh.cli", "--state-dir", str(args.state_dir), "up"]
    command += ["--wan-delay-ms", str(args.wan_delay_ms)]
    command += ["--random-ports"] if args.random_ports else []
    command += ["--catalog", str(args.catalog), "--store", str(args.store)]
    command += ["--policies", str(args.policies), "--edge-mode", args.edge_mode]
    command += ["--workers", str(args.workers)]
    with log.open("ab") as stream:
        supervisor = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + DETACHED_START_TIMEOUT_S
    while not state_file.exists():
        if supervisor.poll() is not None or time.monotonic() > deadline:
            if supervisor.poll() is None:
                supervisor.terminate()  # it stops what it started
                supervisor.wait()
            tail = log.read_text(errors="replace").splitlines()[-20:]
            console.print(f"the mesh did not come up; {log}:\n" + "\n".join(tail))
            return 1
        time.sleep(0.1)
    _print_endpoints(MeshState.read(args.state_dir), console)
    console.print(f"mesh up in the background (supervisor pid {supervisor.pid}, log {log})")
    return 0


async def status(args: argparse.Namespace, console: Console) -> int:
    try:
        state = MeshState.read(args.state_dir)
    except FileNotFoundError:
        console.print("no mesh is up")
        return 1
    except StateFileError as error:
        sys.stderr.write(f"hybridmesh status: error: {error}\n")
        return 1
    healthy = True
    for name in ("router", "edge", "cloud", "registry"):
        if name not in state.endpoints:
            continue  # a state file from before the registry was part of the mesh
        serving = await grpc_serving(state.endpoints[name])
        healthy &= serving
        label = "SERVING" if serving else "NOT SERVING"
        pid = state.pids.get(name)
        where = f"pid {pid}" if pid is not None else "in the router's process"
        console.print(f"  {name:8} {state.endpoints[name]:22} {label}  {where}")
    for name in ("envoy", "triton"):
        alive = _alive(state.pids.get(name))
        healthy &= alive
        label = "running" if alive else "DOWN"
        console.print(f"  {name:8} {state.endpoints[name]:22} {label}  pid {state.pids.get(name)}")
    if state.supervisor_pid:
        alive = _alive(state.supervisor_pid)
        healthy &= alive
        label = "running (restarts a dead Triton)" if alive else "DOWN (nothing restarts Triton)"
        console.print(f"  {'supervisor':8} {'':22} {label}  pid {state.supervisor_pid}")
    _print_outbox(state, console)
    await _print_pairs(state, console)
    return 0 if healthy else 1


async def _print_pairs(state: MeshState, console: Console) -> None:
    """Every catalog pair with the versions the site serves: edge model and policy from
    the site's reports to the registry (the edge node's and the router's), the cloud
    model from the store Triton's repository was built from."""
    if not state.catalog:
        return  # a state file from before pairs were listed
    # ListSites is the operator's: status reads it with the local mesh's operator token.
    token = _operator_token(Path(state.credentials.get("operator_token", "")))
    served = await site_versions(state.endpoints["registry"], token)
    store = Path(state.store)
    for pair in load_catalog(Path(state.catalog)).values():
        edge = served.get(("model", pair.edge_model))
        cloud = versions(store / pair.cloud_model)
        policy = served.get((POLICY_KIND, pair.name))
        console.print(
            f"  pair {pair.name:16} edge {pair.edge_model} "
            f"{'v' + str(edge) if edge else 'not reported'}, cloud {pair.cloud_model} "
            f"{'v' + str(cloud[-1]) if cloud else 'missing'}, policy "
            f"{'v' + str(policy) if policy else DEFAULT_POLICY_VERSION}"
        )


def _operator_token(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else ""


async def site_versions(registry: str, operator_token: str) -> dict[tuple[str, str], int]:
    """(kind, name) -> version, from the sites' reports to the registry (ListSites)."""
    try:
        async with grpc.aio.insecure_channel(registry) as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            reply = await stub.ListSites(
                registry_pb.ListSitesRequest(),
                timeout=5.0,
                metadata=bearer_metadata(operator_token),
            )
    except grpc.aio.AioRpcError:
        return {}
    return {
        (KIND_NAMES[s.artifact.kind], s.artifact.name): s.artifact.version
        for site in reply.sites
        for s in site.served
    }


def _print_outbox(state: MeshState, console: Console) -> None:
    """Queue depth and age of the router's outbox, read from its SQLite file (one per
    worker, ``outbox.worker<i>.sqlite``, when the router runs several)."""
    path = Path(state.outbox) if state.outbox else None
    files = [] if path is None else sorted(path.parent.glob(f"{path.stem}.worker*{path.suffix}"))
    if path is not None and path.exists():
        files.insert(0, path)
    if not files:
        console.print("  outbox   none yet")
        return
    for file in files:
        label = file.stem.rpartition(".")[2] if file != path else ""
        try:
            stats = read_stats(file)
        except sqlite3.Error as error:  # corrupt or truncated: said, the rest still shown
            console.print(f"  outbox   {label + ': ' if label else ''}unreadable {file}: {error}")
            continue
        console.print(
            f"  outbox   {label + ': ' if label else ''}{stats.depth} queued, oldest "
            f"{stats.oldest_age_s:.1f} s; {stats.reconciled_items} item(s) reconciled, "
            f"{stats.corrections} correction(s)"
        )


def _alive(pid: int | None) -> bool:
    return pid is not None and running(pid)


async def demo(args: argparse.Namespace, console: Console) -> int:
    receiver = OtlpReceiver()
    await receiver.start()
    mesh = LocalMesh(
        MeshOptions(
            state_dir=args.state_dir,
            random_ports=True,
            wan_delay_ms=args.wan_delay_ms,
            otlp_grpc_endpoint=receiver.grpc_endpoint,
            otlp_http_traces_url=receiver.http_traces_url,
            log_level="warning",
            models=ModelSources(args.catalog, args.store, args.policies),
            edge_mode=args.edge_mode,
            workers=args.workers,
        )
    )
    edge = "edge node" if args.edge_mode == "remote" else "router with the edge model in it"
    console.print(
        f"starting the local mesh: Triton, cloud service, Envoy (mTLS, emulated WAN), {edge}"
    )
    try:
        state = await mesh.up()
        console.print(f"mesh up; router at {state.endpoints['router']}")
        await run_demo(
            state.endpoints["router"],
            receiver=receiver,
            out=args.out,
            limit=args.limit,
            concurrency=args.concurrency,
            console=console,
        )
    finally:
        await mesh.down()
        (args.state_dir / STATE_FILE).unlink(missing_ok=True)
        await receiver.stop()
        console.print("mesh stopped")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``up``, ``down``, ``status`` or ``demo`` (``args.command``): the exit status."""
    configure_logging("warning")
    console = Console(width=150)
    if args.command == "down":
        try:
            stopped = asyncio.run(down_from_state(args.state_dir))
        except FileNotFoundError:
            console.print("no mesh is up")
            return 1
        except StateFileError as error:
            # Its process ids cannot be trusted: stopping by them could hit other processes.
            sys.stderr.write(f"hybridmesh down: error: {error}\n")
            return 1
        console.print(f"stopped: {', '.join(stopped) or 'nothing'}")
        return 0
    if args.command == "up" and args.detach:
        return up_detached(args, console)
    command = {"up": up, "status": status, "demo": demo}[args.command]
    return asyncio.run(_terminable(command(args, console)))


async def _terminable(command: Coroutine[Any, Any, int]) -> int:
    """Run ``command``; SIGTERM (``timeout``, ``kill``, a service manager) cancels it as
    Ctrl-C does, so that its clean-up stops the parts it started: they run in process
    groups of their own and would outlive this process. The exit status is then 143."""
    task = asyncio.ensure_future(command)
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await task
    except asyncio.CancelledError:
        if not terminated:
            raise  # Ctrl-C: asyncio.run turns it back into KeyboardInterrupt
        return 128 + signal.SIGTERM
