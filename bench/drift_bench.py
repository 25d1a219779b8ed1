"""Drift benchmark: does the operator's ONE target (a 20 % cloud share) hold when the
workload shifts, and what does the extra test-time view cost a decision?

For each drift kind of ``workload.drift`` (and a clean control), a stream of requests
from the Fashion-MNIST test split, in two shapes: drifted from the first request
(``from_start``) and clean for ``--shift-at`` requests, then drifted (``step``). The real
edge and cloud models (``models/store``, onnxruntime) answer every item; each request is
then decided one at a time through the router's own code: ``router_features`` (the
single-item path) -> policy v1's ``score`` (``models/policies/fashion-mnist/1``, no
views: the controller only sees scores, and v1 keeps the drift streams to one edge run
per item; the router now serves v2, whose scores differ but whose controller is the same)
-> ``decision.plan_escalation`` against the threshold in force, with

- ``controller``: the router's online ``ThresholdController`` (its default dynamics,
  target 20 %), fed each score after its decision as ``routing.py`` does;
- ``fixed``: the policy's calibrated threshold, never moved.

Figures per stream and router, over the requests after the first ``WINDOW``: the worst
|cloud share - 20 %| over every ``WINDOW``-request window (sliding one request at a
time; the goal, <= 2 pp) and over consecutive windows; accuracy of the served answers;
error among the answers kept on the edge.

Decision latency with the view: the served policy
``models/policies/fashion-mnist/2`` (``views = ["hflip"]``): per request, the
features (with the view's) plus the classifier, p50/p99 over single-item calls; and the
view's extra edge run (``edge_node.inference.run_with_views`` with and without the view,
the difference). Goal: decision p99 <= 50 µs, with the view's edge run on top.

``python -m bench.drift_bench [--length 10000] [--shift-at 2000] --out results/drift.json``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.load import publish_report
from edge_node.inference import run_with_views
from edge_node.local_models import LoadedModel
from hybridmesh.common.v1 import routing_pb2
from router_service.decision import plan_escalation
from router_service.escalation import ScoringPolicy, load_policy
from router_service.features import router_features
from router_service.policy import PolicyVerdict, RequestConstraints
from router_service.threshold_controller import ControllerSettings, ThresholdController
from services.classification import to_probabilities
from services.views import view_output_name
from training.train_policy import PairModels, pair_models, run_model
from workload.drift import DRIFTS, step_shift
from workload.model_store import load_verified

REPO_ROOT = Path(__file__).resolve().parent.parent
PAIR = "fashion-mnist"
NO_VIEW_POLICY = REPO_ROOT / "models/policies/fashion-mnist/1"
VIEW_POLICY = REPO_ROOT / "models/policies/fashion-mnist/2"
TARGET_SHARE = 0.2
WINDOW = 1000
SHARE_GOAL_PP = 2.0
DECISION_P99_GOAL_US = 50.0
# Requests 100 ms apart on the controller's clock: well inside its 10-minute max age.
REQUEST_INTERVAL_S = 0.1

Flags = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class StreamOutputs:
    """Per request: policy v1's score [n] float32, whether the edge [n] and the
    cloud [n] answered correctly, and the edge's top-1 probability [n]."""

    scores: npt.NDArray[np.float32]
    top1: npt.NDArray[np.float32]
    edge_correct: Flags
    cloud_correct: Flags


def stream_outputs(
    models: PairModels, policy: ScoringPolicy, images: npt.NDArray[np.uint8], labels: Any
) -> StreamOutputs:
    """Both models over the stream (batched), then the router's features and score one
    request at a time, as the router computes them for a single-item request."""
    edge = to_probabilities(
        run_model(models.edge, models.pair, images), models.pair.output_kind == "probabilities"
    )
    cloud = run_model(models.cloud, models.pair, images)
    scores = np.empty(len(images), dtype=np.float32)
    for index in range(len(images)):
        features = router_features(edge[index : index + 1], images[index : index + 1])
        scores[index] = policy.score(features)[0]
    return StreamOutputs(
        scores=scores,
        top1=edge.max(axis=1),
        edge_correct=edge.argmax(axis=1) == labels,
        cloud_correct=cloud.argmax(axis=1) == labels,
    )


def route(
    outputs: StreamOutputs, policy: ScoringPolicy, controller: ThresholdController | None
) -> Flags:
    """Escalated [n]: each request planned by ``decision.plan_escalation`` against the
    threshold in force when it arrived (the controller's, else the policy's); the
    controller then observes its score (``routing.Router._plan``)."""
    hints = routing_pb2.RoutingHints(privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC)
    constraints = RequestConstraints.from_hints(hints)
    allowed = PolicyVerdict(cloud_blocked_reason=None, cloud_first=False)
    escalated = np.zeros(len(outputs.scores), dtype=np.bool_)
    for index in range(len(outputs.scores)):
        threshold = controller.threshold if controller is not None else policy.threshold
        scores = outputs.scores[index : index + 1]
        if controller is not None:
            controller.observe(scores.tolist())
        plan = plan_escalation(
            allowed, constraints, scores, outputs.top1[index : index + 1], threshold, "bench"
        )
        escalated[index] = bool(plan.escalate)
    return escalated


def share_deviation_pp(escalated: Flags, target: float = TARGET_SHARE) -> dict[str, float]:
    """Worst |share - target| in pp over every ``WINDOW``-request window after the first
    ``WINDOW`` requests: ``sliding`` (every start) and ``consecutive`` (non-overlapping)."""
    counts = np.concatenate([[0], np.cumsum(escalated, dtype=np.int64)])
    sliding = (counts[2 * WINDOW :] - counts[WINDOW:-WINDOW]) / WINDOW
    consecutive = np.diff(counts[WINDOW::WINDOW]) / WINDOW
    return {
        "sliding": float(np.abs(sliding - target).max() * 100),
        "consecutive": float(np.abs(consecutive - target).max() * 100),
    }


def quality(outputs: StreamOutputs, escalated: Flags) -> dict[str, float]:
    """After the first ``WINDOW`` requests: cloud share, accuracy of the served answers,
    error among the answers kept on the edge."""
    part = slice(WINDOW, None)
    sent, edge_ok, cloud_ok = (
        escalated[part],
        outputs.edge_correct[part],
        outputs.cloud_correct[part],
    )
    served = np.where(sent, cloud_ok, edge_ok)
    kept = ~sent
    return {
        "cloud_share": float(sent.mean()),
        "accuracy": float(served.mean()),
        "edge_kept_error": float(1.0 - edge_ok[kept].mean()) if kept.any() else 0.0,
    }


def controller_for(policy: ScoringPolicy) -> ThresholdController:
    """The router's controller as ``routing.Router`` builds it, on a simulated clock."""
    ticks = iter(range(1 << 62))
    clock: Callable[[], float] = lambda: next(ticks) * REQUEST_INTERVAL_S  # noqa: E731
    return ThresholdController(
        ControllerSettings(target_share=TARGET_SHARE), policy.threshold, clock
    )


def scenario(
    models: PairModels, policy: ScoringPolicy, kind: str | None, length: int, shift_at: int
) -> dict[str, Any]:
    stream = step_shift(DRIFTS[kind] if kind else None, length, shift_at)
    outputs = stream_outputs(models, policy, stream.images, stream.labels)
    result: dict[str, Any] = {
        "drift": kind or "none",
        "severity": DRIFTS[kind].severity if kind else "",
        "shift_at": shift_at if kind else None,
        "length": length,
        "edge_accuracy_drifted": float(outputs.edge_correct[stream.is_drifted].mean())
        if kind
        else None,
        "cloud_accuracy_drifted": float(outputs.cloud_correct[stream.is_drifted].mean())
        if kind
        else None,
    }
    for name, controller in (("controller", controller_for(policy)), ("fixed", None)):
        started = time.perf_counter()
        escalated = route(outputs, policy, controller)
        result[name] = {
            **share_deviation_pp(escalated),
            **quality(outputs, escalated),
            "route_us_per_request": (time.perf_counter() - started) / length * 1e6,
        }
    return result


def _percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    values = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def view_decision_latency(models: PairModels, calls: int) -> dict[str, Any]:
    """The view policy's decision (features with the view's + classifier) and the view's
    extra edge run, single-item calls timed one by one with perf_counter_ns (µs)."""
    policy = load_policy(VIEW_POLICY)
    served = load_policy(NO_VIEW_POLICY)  # v1, no view: the same run's baseline
    views = policy.metadata.views
    version_dir = models.edge.parent
    edge = LoadedModel(load_verified(version_dir), version_dir, intra_op_threads=1)
    images = step_shift(None, calls, 0).images
    input_name = edge.inputs[0].name
    outputs_probabilities = models.pair.output_kind == "probabilities"
    decision_ns, served_ns, plain_ns, viewed_ns = [], [], [], []
    for index in range(calls + 200):  # the first 200 warm up
        arrays: dict[str, npt.NDArray[np.generic]] = {
            input_name: images[index % calls : index % calls + 1]
        }
        started = time.perf_counter_ns()
        plain = run_with_views(edge, arrays, ())
        middle = time.perf_counter_ns()
        outputs = run_with_views(edge, arrays, views)
        ended = time.perf_counter_ns()
        probabilities = to_probabilities(plain[edge.classification_output], outputs_probabilities)
        view_probabilities = {
            view: to_probabilities(
                outputs[view_output_name(edge.classification_output, view)], outputs_probabilities
            )
            for view in views
        }
        began = time.perf_counter_ns()
        policy.score(router_features(probabilities, arrays[input_name], view_probabilities))
        done = time.perf_counter_ns()
        served.score(router_features(probabilities, arrays[input_name]))
        served_done = time.perf_counter_ns()
        if index >= 200:
            decision_ns.append(done - began)
            served_ns.append(served_done - done)
            plain_ns.append(middle - started)
            viewed_ns.append(ended - middle)
    decision, plain_run, viewed_run = (
        _percentiles_us(decision_ns),
        _percentiles_us(plain_ns),
        _percentiles_us(viewed_ns),
    )
    view_run = {key: viewed_run[key] - plain_run[key] for key in ("p50", "p99")}
    return {
        "policy": str(VIEW_POLICY.relative_to(REPO_ROOT)),
        "views": list(views),
        "calls": calls,
        "decision_us": decision,
        "served_decision_us": _percentiles_us(served_ns),
        "edge_run_us": plain_run,
        "edge_run_with_views_us": viewed_run,
        "view_extra_edge_run_us": view_run,
    }


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One goal row per drift kind (the step-shift stream, the harder one) and one for the
    view's decision latency."""
    rows = []
    for result in report["streams"]:
        if result["drift"] == "none" or result["shift_at"] == 0:
            continue
        controller, fixed = result["controller"]["sliding"], result["fixed"]["sliding"]
        rows.append(
            {
                "goal": f"cloud share within {SHARE_GOAL_PP:.0f} pp of 20 % in every 1,000-request "
                f"window after the first, {result['drift']} step shift (controller)",
                "measured": f"{controller:.1f} pp (fixed threshold {fixed:.1f} pp)",
                "met": controller <= SHARE_GOAL_PP,
            }
        )
    latency = report["view_latency"]
    decision, served = latency["decision_us"], latency["served_decision_us"]
    view = latency["view_extra_edge_run_us"]["p50"]
    rows.append(
        {
            "goal": f"decision p99 with the hflip view <= {DECISION_P99_GOAL_US:.0f} µs "
            "(plus the view's edge run)",
            "measured": f"p99 {decision['p99']:.0f} µs, p50 {decision['p50']:.0f} µs "
            f"(no-view policy p50 {served['p50']:.0f} µs; view edge run {view:.0f} µs p50)",
            "met": decision["p99"] <= DECISION_P99_GOAL_US,
        }
    )
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Streams of {report['length']:,} requests from the test split (`workload/drift.py`, "
        f"seeded); `step` is clean for {report['shift_at']:,} requests, then drifted. "
        "Decided one request at a time through the router's features, policy v1's "
        "score and `plan_escalation`; the controller is the router's own "
        "(`ThresholdController`, target 20 %), beside the policy's fixed calibrated threshold. "
        "Figures over the requests after the first 1,000: worst |share - 20 %| over every "
        "1,000-request window (sliding / consecutive), accuracy, error among edge-kept answers.",
        "",
        "| drift (severity) | stream | edge / cloud acc. drifted | controller worst pp "
        "(sliding / consec.) | fixed worst pp | controller share / acc. / kept err. "
        "| fixed share / acc. / kept err. |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["streams"]:
        c, f = r["controller"], r["fixed"]
        accuracy = (
            f"{r['edge_accuracy_drifted']:.1%} / {r['cloud_accuracy_drifted']:.1%}"
            if r["edge_accuracy_drifted"] is not None
            else "-"
        )
        stream = (
            "clean" if r["drift"] == "none" else ("from start" if r["shift_at"] == 0 else "step")
        )
        severity = f" ({r['severity']})" if r["severity"] else ""
        lines.append(
            f"| {r['drift']}{severity} | {stream} | {accuracy} "
            f"| {c['sliding']:.1f} / {c['consecutive']:.1f} "
            f"| {f['sliding']:.1f} / {f['consecutive']:.1f} "
            f"| {c['cloud_share']:.1%} / {c['accuracy']:.1%} / {c['edge_kept_error']:.1%} "
            f"| {f['cloud_share']:.1%} / {f['accuracy']:.1%} / {f['edge_kept_error']:.1%} |"
        )
    latency = report["view_latency"]
    lines += [
        "",
        f"Decision latency with the view (`{latency['policy']}`, views {latency['views']}), "
        f"{latency['calls']:,} single-item calls, µs:",
        "",
        "| part | p50 | p99 |",
        "| --- | --- | --- |",
    ]
    for label, key in (
        ("decision: features (with the view's) + classifier", "decision_us"),
        ("decision of policy v1 (no view), same run", "served_decision_us"),
        ("edge run, no view", "edge_run_us"),
        ("edge run with the view", "edge_run_with_views_us"),
        ("the view's extra edge run (difference)", "view_extra_edge_run_us"),
    ):
        lines.append(f"| {label} | {latency[key]['p50']:.1f} | {latency[key]['p99']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=10_000, help="requests per stream")
    parser.add_argument("--shift-at", type=int, default=2_000, help="step streams: clean before")
    parser.add_argument("--latency-calls", type=int, default=3_000)
    parser.add_argument("--kinds", nargs="*", default=sorted(DRIFTS), choices=sorted(DRIFTS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.length < 3 * WINDOW:
        parser.error(f"--length must be at least {3 * WINDOW}")
    models = pair_models(REPO_ROOT / "models/catalog.toml", PAIR, REPO_ROOT / "models/store")
    policy = load_policy(NO_VIEW_POLICY)
    streams = [scenario(models, policy, None, args.length, 0)]
    for kind in args.kinds:
        for shift_at in (0, args.shift_at):
            streams.append(scenario(models, policy, kind, args.length, shift_at))
    report: dict[str, Any] = {
        "length": args.length,
        "shift_at": args.shift_at,
        "target_share": TARGET_SHARE,
        "controller_settings": ControllerSettings(target_share=TARGET_SHARE).__dict__,
        "served_policy": str(NO_VIEW_POLICY.relative_to(REPO_ROOT)),
        "streams": streams,
        "view_latency": view_decision_latency(models, args.latency_calls),
    }
    report["goals"] = goals(report)
    publish_report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
