"""hybridmesh: run the local mesh.

  hybridmesh up [--detach] [--random-ports] [--wan-delay-ms 40]   start every part
  hybridmesh down                                                  stop a detached mesh
  hybridmesh status                                                health, pairs' versions
  hybridmesh demo [--limit 10000]                                  the main job (make demo)
  hybridmesh policy train --pair NAME [--target cloud-share=0.2 | edge-error=0.03]
  hybridmesh policy evaluate --pair NAME [--version N]
  hybridmesh policy retrain --pair NAME --outbox FILE [...]
                                                  a pair's router policy lifecycle
                                                  (`hybridmesh policy COMMAND --help`)
  hybridmesh router retrain --outbox FILE [...]   alias of `policy retrain` (pair
                                                  fashion-mnist unless --pair)
  hybridmesh registry COMMAND [...]               over-the-air updates (registry.cli), as
                                                  the local mesh's operator
                                                  ($HYBRIDMESH_STATE_DIR, default var/mesh)

``up --detach`` runs the mesh under a background ``hybridmesh up`` (its output in
``<state-dir>/logs/mesh.log``) that keeps supervising it — a dead Triton is restarted — and
returns once every part is healthy. ``<state-dir>/state.json``: {"endpoints": {...},
"pids": {...}, "logs": {...}, "wan_delay_ms": N, "state_dir": ..., "started_at": ...,
"supervisor_pid": N, "catalog": ..., "store": ...}. ``up`` and ``demo`` serve every pair
of ``--catalog`` (default models/catalog.toml).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    down_from_state,
    grpc_serving,
    operator_credentials,
)
from localmesh.ota import ModelSources
from localmesh.otlp_receiver import OtlpReceiver
from ota.registry_client import KIND_NAMES
from router_service.escalation import DEFAULT_POLICY_VERSION
from router_service.outbox import read_stats
from router_service.policy_updater import POLICY_KIND
from services.auth import bearer_metadata
from services.logging import configure_logging
from training.arguments import (
    add_evaluate_arguments,
    add_retrain_arguments,
    add_train_arguments,
)
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
    command += ["--policies", str(args.policies)]
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
    healthy = True
    for name in ("router", "edge", "cloud", "registry"):
        if name not in state.endpoints:
            continue  # a state file from before the registry was part of the mesh
        serving = await grpc_serving(state.endpoints[name])
        healthy &= serving
        label = "SERVING" if serving else "NOT SERVING"
        console.print(f"  {name:8} {state.endpoints[name]:22} {label}  pid {state.pids.get(name)}")
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
        stats = read_stats(file)
        label = file.stem.rpartition(".")[2] if file != path else ""
        console.print(
            f"  outbox   {label + ': ' if label else ''}{stats.depth} queued, oldest "
            f"{stats.oldest_age_s:.1f} s; {stats.reconciled_items} item(s) reconciled, "
            f"{stats.corrections} correction(s)"
        )


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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
            workers=args.workers,
        )
    )
    console.print(
        "starting the local mesh: Triton, cloud service, Envoy (mTLS, emulated WAN), "
        "edge node, router"
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


def _operator_defaults(state_dir: Path) -> None:
    """``hybridmesh registry ...`` calls as the local mesh's operator unless told
    otherwise (registry.cli reads these variables as its defaults)."""
    credentials = operator_credentials(state_dir)
    for variable, path in (
        ("HYBRIDMESH_OPERATOR_TOKEN_FILE", credentials["operator_token"]),
        ("HYBRIDMESH_OPERATOR_KEYS", credentials["operator_keys"]),
    ):
        if Path(path).exists():
            os.environ.setdefault(variable, path)


def policy(args: argparse.Namespace) -> int:
    """``hybridmesh policy train | evaluate | retrain``: the training code loads only
    here (scikit-learn, skl2onnx, matplotlib)."""
    if args.policy_command == "retrain":
        from training.retrain import run as retrain

        return retrain(args)
    from training.train_policy import evaluate, run_cli, train

    return run_cli(train if args.policy_command == "train" else evaluate, args)


def _add_policy_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy_parser = sub.add_parser(
        "policy",
        help="a model pair's router policy: train, evaluate, retrain",
        description="The policy lifecycle of one catalog pair. Policies are written to "
        "<policies>/<pair>/<version>/, reports to results/policies/<pair>/.",
    )
    commands = policy_parser.add_subparsers(dest="policy_command", required=True)
    add_train_arguments(
        commands.add_parser(
            "train",
            help="fit, calibrate for ONE target and evaluate a new policy version",
            description="Fit the router classifier on the pair's router-train split, pick "
            "the classifier (a learned one only if it beats max-softmax) and the threshold "
            "on the calibration split, write <policies>/<pair>/<next version>/, and report "
            "on the test split.",
        ),
        default_pair=None,
    )
    add_evaluate_arguments(
        commands.add_parser(
            "evaluate",
            help="re-evaluate an existing policy version on the pair's test split",
            description="Nothing is fitted or tuned: the same policy gives the same figures.",
        ),
        default_pair=None,
    )
    add_retrain_arguments(
        commands.add_parser(
            "retrain",
            help="retrain with the outbox's reconciled examples; publish only if better",
            description="The feedback loop (training.retrain): router-train plus the "
            "outbox's reconciled examples for the pair, compared with the serving policy on "
            "held-out calibration data; written (and, with --registry-root and --keys, "
            "signed, published and promoted) only when better by --min-gain.",
        ),
        default_pair=None,
    )


def main() -> None:
    # Operator commands live with their packages; the hybridmesh CLI forwards to them.
    argv = sys.argv[1:]
    if argv[:2] == ["router", "retrain"]:
        from training.retrain import main as retrain

        sys.exit(retrain(argv[2:]))
    if argv[:1] == ["registry"]:
        from registry.cli import main as registry

        _operator_defaults(Path(os.environ.get("HYBRIDMESH_STATE_DIR", "var/mesh")))
        sys.exit(registry(argv[1:]))
    parser = argparse.ArgumentParser(
        prog="hybridmesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path("var/mesh"),
        help="the local mesh's state: logs, site copies, registry (default %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="start the local mesh")
    up_parser.add_argument(
        "--detach", action="store_true", help="run in the background; `hybridmesh down` stops it"
    )
    for mesh_command in (up_parser, sub.add_parser("demo", help="run the main job")):
        mesh_command.add_argument(
            "--random-ports", action="store_true", help="free ports instead of the defaults"
        )
        mesh_command.add_argument(
            "--wan-delay-ms",
            type=int,
            default=40,
            help="emulated WAN delay at the cloud ingress (default %(default)s)",
        )
        mesh_command.add_argument(
            "--workers",
            type=int,
            default=1,
            help="worker processes of the router and of the cloud service, each on its one "
            "port (default %(default)s)",
        )
        mesh_command.add_argument(
            "--catalog",
            type=Path,
            default=Path("models/catalog.toml"),
            help="the pairs to serve, every one of them (default %(default)s)",
        )
        mesh_command.add_argument(
            "--store",
            type=Path,
            default=Path("models/store"),
            help="the model store the pairs' models come from (default %(default)s)",
        )
        mesh_command.add_argument(
            "--policies",
            type=Path,
            default=Path("models/policies"),
            help="policy root (<policies>/<pair>/<version>/): each pair's newest policy is "
            "published to the site's registry (default %(default)s)",
        )
    sub.add_parser("down", help="stop a detached mesh")
    sub.add_parser(
        "status",
        help="health of each part; each pair's edge model, cloud model and policy versions",
    )
    demo_parser = sub.choices["demo"]
    demo_parser.add_argument(
        "--limit", type=int, default=10_000, help="test images to send (default %(default)s)"
    )
    demo_parser.add_argument(
        "--concurrency", type=int, default=8, help="callers at once (default %(default)s)"
    )
    demo_parser.add_argument(
        "--out", type=Path, default=Path("results/demo"), help="report directory"
    )
    _add_policy_commands(sub)
    args = parser.parse_args()
    if args.command == "policy":
        sys.exit(policy(args))
    configure_logging("warning")
    console = Console(width=150)
    if args.command == "down":
        stopped = asyncio.run(down_from_state(args.state_dir))
        console.print(f"stopped: {', '.join(stopped) or 'nothing'}")
        sys.exit(0)
    if args.command == "up" and args.detach:
        sys.exit(up_detached(args, console))
    command = {"up": up, "status": status, "demo": demo}[args.command]
    sys.exit(asyncio.run(command(args, console)))


if __name__ == "__main__":
    main()
