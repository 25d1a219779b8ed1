"""The command-line arguments of the policy lifecycle (``hybridmesh policy train |
evaluate | retrain``, ``hybridmesh router retrain``): light to import, so ``hybridmesh
--help`` does not load the training libraries."""

from __future__ import annotations

import argparse
from pathlib import Path

from workload.arguments import add_model_source_arguments

# Reports go to <DEFAULT_RESULTS>/<pair>/: no pair's report overwrites another's.
DEFAULT_RESULTS = Path("results/policies")


def parse_target(text: str) -> tuple[str, float]:
    """``cloud-share=0.2`` -> ("cloud-share", 0.2); argparse reports anything else."""
    kind, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if kind not in {"cloud-share", "edge-error"} or not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError("target is cloud-share=<0..1> or edge-error=<0..1>")
    return kind, number


def add_pair_arguments(parser: argparse.ArgumentParser, *, default_pair: str | None) -> None:
    """Where a pair, its models and its policies are: shared by train, evaluate, retrain."""
    parser.add_argument(
        "--pair",
        required=default_pair is None,
        default=default_pair,
        help="the catalog pair (its name in models/catalog.toml)"
        + (f"; default {default_pair}" if default_pair else ""),
    )
    add_model_source_arguments(parser)
    parser.add_argument(
        "--cloud-price-micros",
        type=int,
        default=1500,
        help="price of one cloud item in micro-USD, for the cost figures (default %(default)s)",
    )


def add_resamples_argument(parser: argparse.ArgumentParser) -> None:
    """``--resamples``: the paired bootstrap's resample count."""
    parser.add_argument(
        "--resamples",
        type=int,
        default=2000,
        help="paired-bootstrap resamples for the ratio intervals (default %(default)s)",
    )


def add_report_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """``--report``: the report's base path."""
    parser.add_argument(
        "--report",
        type=Path,
        help="report base path, written as .json, .md and .png "
        f"(default results/policies/<pair>/{name})",
    )


def add_train_arguments(parser: argparse.ArgumentParser, *, default_pair: str | None) -> None:
    add_pair_arguments(parser, default_pair=default_pair)
    parser.add_argument(
        "--target",
        type=parse_target,
        default=("cloud-share", 0.2),
        help="the ONE operator target the threshold is chosen for on the calibration split: "
        "cloud-share=<0..1> (at most this share escalates) or edge-error=<0..1> (at most "
        "this error among answers kept on the edge); default cloud-share=0.2",
    )
    parser.add_argument(
        "--label",
        choices=["cloud-fixes-edge", "edge-wrong"],
        default="cloud-fixes-edge",
        help="what the classifier learns to predict (default %(default)s)",
    )
    parser.add_argument(
        "--version", type=int, help="policy version to write (default: the next free one)"
    )
    parser.add_argument(
        "--folds",
        type=Path,
        default=Path("models/folds"),
        help="edge fold models root: <folds>/<edge model>/<version>/ gives out-of-fold "
        "model-train items for training and the ship rule, when present (default %(default)s)",
    )
    add_resamples_argument(parser)
    add_report_argument(parser, "evaluation")


def add_evaluate_arguments(parser: argparse.ArgumentParser, *, default_pair: str | None) -> None:
    add_pair_arguments(parser, default_pair=default_pair)
    parser.add_argument(
        "--version", type=int, help="policy version to evaluate (default: the newest)"
    )
    add_resamples_argument(parser)
    add_report_argument(parser, "evaluation")


def report_base(args: argparse.Namespace, name: str) -> Path:
    """The report's base path: ``--report`` or ``results/policies/<pair>/<name>``, so no
    pair's report overwrites another's."""
    base: Path = args.report or DEFAULT_RESULTS / args.pair / name
    return base


def add_retrain_arguments(parser: argparse.ArgumentParser, *, default_pair: str | None) -> None:
    add_pair_arguments(parser, default_pair=default_pair)
    parser.add_argument(
        "--outbox",
        type=Path,
        required=True,
        help="the router's outbox (SQLite) holding the reconciled examples",
    )
    parser.add_argument(
        "--target-cloud-share",
        type=float,
        default=0.2,
        help="the cloud share both policies are compared (and the candidate calibrated) at "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--min-gain",
        type=float,
        default=0.0,
        help="held-out accuracy the candidate must gain over the serving policy "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write the candidate policy (and retrain.json) under this directory instead "
        "of <policies>/<pair>/",
    )
    parser.add_argument(
        "--report",
        type=Path,
        help="where the comparison goes as JSON (default results/policies/<pair>/retrain.json, "
        "or <out>/retrain.json)",
    )
    parser.add_argument("--registry-root", type=Path, help="publish and promote here when better")
    parser.add_argument("--keys", type=Path, help="the operator's key directory (to sign)")
