"""hybridmesh: the local mesh, the router's policies and over-the-air updates.

  hybridmesh up --random-ports --detach     start every part in the background
  hybridmesh status                         health, each pair's served versions
  hybridmesh down                           stop it
  hybridmesh demo --limit 2000              the main job on a mesh of its own (make demo)
  hybridmesh policy train --pair fashion-mnist --target cloud-share=0.2
  hybridmesh registry sites --registry 127.0.0.1:50054

`hybridmesh COMMAND --help` describes each command. ``up --detach`` runs the mesh under a
background ``hybridmesh up`` (output in <state-dir>/logs/mesh.log) that keeps supervising
it (a dead Triton is restarted) and returns once every part is healthy.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from localmesh.parser_tree import add_below_root
from registry import cli as registry_cli
from services.environment import unknown_variables
from training.arguments import (
    add_evaluate_arguments,
    add_retrain_arguments,
    add_train_arguments,
)
from workload.arguments import add_model_source_arguments
from workload.catalog import CatalogError, check_against_store, load_catalog


def _operator_defaults(state_dir: Path) -> dict[str, Path]:
    """The local mesh's operator credentials, those that exist: ``hybridmesh registry``
    calls as that operator unless told otherwise."""
    from localmesh.launcher import operator_credentials

    credentials = operator_credentials(state_dir)
    found = {
        "token_file": Path(credentials["operator_token"]),
        "keys": Path(credentials["operator_keys"]),
    }
    return {name: path for name, path in found.items() if path.exists()}


def policy(args: argparse.Namespace) -> int:
    """``hybridmesh policy train | evaluate | retrain`` and ``hybridmesh router retrain``:
    the training code loads only here (scikit-learn, skl2onnx, matplotlib)."""
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
    commands = policy_parser.add_subparsers(
        dest="policy_command", required=True, metavar="COMMAND", help="the policy command"
    )
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
    retrain_description = (
        "The feedback loop (training.retrain): router-train plus the outbox's reconciled "
        "examples for the pair, compared with the serving policy on held-out calibration "
        "data; written (and, with --registry-root and --keys, signed, published and "
        "promoted) only when better by --min-gain."
    )
    add_retrain_arguments(
        commands.add_parser(
            "retrain",
            help="retrain with the outbox's reconciled examples; publish only if better",
            description=retrain_description,
        ),
        default_pair=None,
    )
    router_parser = sub.add_parser(
        "router",
        help="the router's policy: retrain (`hybridmesh policy retrain` for one pair)",
        description="Commands about the router at this site.",
    )
    router_commands = router_parser.add_subparsers(
        dest="policy_command", required=True, metavar="COMMAND", help="the router command"
    )
    add_retrain_arguments(
        router_commands.add_parser(
            "retrain",
            help="`hybridmesh policy retrain`, for the pair fashion-mnist unless --pair",
            description=retrain_description,
        ),
        default_pair="fashion-mnist",
    )


def _add_mesh_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up_parser = sub.add_parser(
        "up",
        help="start the local mesh",
        description="Start Triton, the cloud service, Envoy, the registry, the edge node and "
        "the router on loopback, serving every pair of --catalog; each pair's newest policy "
        "under --policies is published to the site's registry. Writes "
        "<state-dir>/state.json (endpoints, pids, logs).",
    )
    up_parser.add_argument(
        "--detach", action="store_true", help="run in the background; `hybridmesh down` stops it"
    )
    up_parser.add_argument(
        "--random-ports",
        action="store_true",
        help="free ports instead of the defaults (state.json names them)",
    )
    demo_parser = sub.add_parser(
        "demo",
        help="run the main job on a mesh of its own (free ports), then stop it",
        description="Start the mesh on free ports, send the Fashion-MNIST test images "
        "edge-only, cloud-only and hybrid, report accuracy, cloud share, latency and cost, "
        "print one escalated request's trace, and stop the mesh.",
    )
    for mesh_command in (up_parser, demo_parser):
        mesh_command.add_argument(
            "--wan-delay-ms",
            type=int,
            default=40,
            help="emulated WAN delay at the cloud ingress (default %(default)s)",
        )
        add_model_source_arguments(mesh_command)
        # demo runs the faster co-located mode; up keeps every part its own process (a
        # whole site: the edge node's pid, logs and admin port in state.json, as scripts
        # and fault drills that stop or hang the edge node expect).
        mesh_command.add_argument(
            "--edge-mode",
            choices=("in-process", "remote"),
            default="in-process" if mesh_command is demo_parser else "remote",
            help="in-process: the router runs the edge model itself (a co-located site, "
            "one hop less, the faster path in docs/benchmarks.md); remote: the edge node is "
            "its own process, as at a site where the model runs on another box "
            "(default %(default)s)",
        )
        mesh_command.add_argument(
            "--workers",
            type=int,
            default=1,
            help="worker processes of the router and of the cloud service, each set on one "
            "port (SO_REUSEPORT); more than 1 needs --edge-mode remote (default %(default)s)",
        )
    demo_parser.add_argument(
        "--limit",
        type=_positive_int,
        default=10_000,
        help="test images to send (default %(default)s)",
    )
    demo_parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=8,
        help="callers at once (default %(default)s)",
    )
    demo_parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/demo"),
        help="report directory: demo.json and plots (default %(default)s)",
    )
    sub.add_parser(
        "down",
        help="stop a detached mesh",
        description="Stop the mesh of <state-dir>/state.json through its supervisor.",
    )
    sub.add_parser(
        "status",
        help="health of each part; each pair's edge model, cloud model and policy versions",
        description="Exit status 0 when every part is healthy, 1 otherwise.",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole ``hybridmesh`` command tree (one argparse parser)."""
    parser = argparse.ArgumentParser(
        prog="hybridmesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    state_dir_help = (
        "the local mesh's state: state.json, logs, site copies, registry, the operator's "
        "credentials; accepted before or after the subcommand (default $HYBRIDMESH_STATE_DIR "
        "or var/mesh)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("HYBRIDMESH_STATE_DIR", "var/mesh")),
        help=state_dir_help,
    )
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="`hybridmesh COMMAND --help` for its options",
    )
    _add_mesh_commands(sub)
    _add_policy_commands(sub)
    registry = sub.add_parser(
        "registry",
        help="over-the-air updates: keys, publish, promote, roll back, fleet view",
        description=registry_cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    registry_cli.add_commands(registry)
    add_below_root(parser, "--state-dir", type=Path, help=state_dir_help)
    return parser


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (``--limit -1`` was a slice, all but one image)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _catalog_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with ``--catalog`` (naming the file) or its models in ``--store``."""
    try:
        pairs = load_catalog(args.catalog)
    except CatalogError as error:
        return str(error)
    try:
        check_against_store(pairs, args.store)
    except CatalogError as error:
        return f"{args.catalog}: {error}"
    return None


def _warn_unknown_environment() -> None:
    for variable in unknown_variables(os.environ):
        sys.stderr.write(f"hybridmesh: warning: {variable.message()}\n")


def _workers_problem(args: argparse.Namespace) -> str | None:
    if not 1 <= args.workers <= 16:  # localmesh.launcher.MAX_WORKERS (kept light: not imported)
        return f"--workers must be within 1..16, got {args.workers}"
    if args.workers > 1 and args.edge_mode == "in-process":
        return "--workers > 1 needs --edge-mode remote (a co-located edge runs in one process)"
    return None


def main(argv: list[str] | None = None) -> int:
    """``hybridmesh`` (the console script): the exit status; 2 for a user error, said in
    one line on stderr."""
    _warn_unknown_environment()
    args = build_parser().parse_args(argv)
    if args.command in {"policy", "router"}:
        return policy(args)
    if args.state_dir.exists() and not args.state_dir.is_dir():
        sys.stderr.write(f"hybridmesh: error: --state-dir {args.state_dir}: not a directory\n")
        return 2
    if args.command == "registry":
        return registry_cli.run(args, _operator_defaults(args.state_dir))
    if args.command in {"up", "demo"} and (problem := _workers_problem(args)):
        sys.stderr.write(f"hybridmesh {args.command}: error: {problem}\n")
        return 2
    if args.command in {"up", "demo"} and (problem := _catalog_problem(args)):
        sys.stderr.write(f"hybridmesh {args.command}: error: {problem}\n")
        return 2
    from localmesh.commands import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
