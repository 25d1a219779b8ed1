"""Decision microbenchmark: what the router spends deciding one request, in process.

Per request (batch 1, real Fashion-MNIST test images through the real edge model): the
caller's hints resolved and the hard policy evaluated, the edge's output tensor decoded
to probabilities, the router's features, the pair's policy score and the escalation plan;
the same functions the router calls (router_service.routing, decision, policy), with
the served policy's views decoded and featurised as the router does (not the view's
edge run itself, which is the edge's time). The
policy's ONNX session itself (``EscalationClassifier._session_score``, what served
before the numpy path) is timed beside it, same items, same run.

``python -m bench.decision_bench --count 5000``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from hybridmesh.common.v1 import routing_pb2
from router_service.app import pairs_from_catalog
from router_service.decision import plan_escalation
from router_service.escalation import EscalationClassifier, latest_policy, load_policy
from router_service.features import router_features
from router_service.policy import RequestConstraints, Situation, evaluate
from router_service.routing import edge_probabilities
from services.tensors import encode_tensor
from services.views import apply_view
from training.train_policy import pair_models, run_model
from workload.pair_data import load_pair_split

PAIR = "fashion-mnist"
REPO_ROOT = Path(__file__).resolve().parent.parent
GOAL_P99_US = 50.0


def measure(count: int, warmup: int = 500) -> dict[str, float]:
    """p50/p99 in µs of the whole decision and of its features and score stages, over
    ``count`` requests cycling through the test split's first 1,000 images."""
    catalog = REPO_ROOT / "models/catalog.toml"
    (pair,) = (p for p in pairs_from_catalog(catalog) if p.name == PAIR)
    models = pair_models(catalog, PAIR, REPO_ROOT / "models/store")
    inputs = load_pair_split(models.pair, "test").inputs[:1000]
    logits = run_model(models.edge, models.pair, inputs)
    outputs = [encode_tensor(models.pair.output.name, logits[i : i + 1]) for i in range(1000)]
    policy = load_policy(latest_policy(REPO_ROOT / "models/policies" / PAIR))
    # Each view the served policy declares (v2: hflip) as the edge returns it: the edge
    # model's output on the view's input, decoded per request like the main output.
    view_outputs = {
        view: run_model(models.edge, models.pair, apply_view(view, inputs))
        for view in policy.metadata.views
    }
    encoded_views = [
        {
            view: encode_tensor(models.pair.output.name, value[i : i + 1])
            for view, value in view_outputs.items()
        }
        for i in range(1000)
    ]
    hints = routing_pb2.RoutingHints(privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC)
    situation = Situation(
        remaining_budget_s=1.0, cloud_p95_s=0.01, cloud_breaker_open=False, cloud_cost_micros=1500
    )
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    total, cpu, features_ns, score_ns, session_ns = [], [], [], [], []
    for index in range(warmup + count):
        item = index % len(outputs)
        image = inputs[item : item + 1]
        cpu_started = cpu_clock()
        started = clock()
        constraints = RequestConstraints.from_hints(hints)
        verdict = evaluate(constraints, situation)
        probabilities = edge_probabilities(pair, outputs[item])
        views = {
            view: edge_probabilities(pair, tensor) for view, tensor in encoded_views[item].items()
        }
        features_at = clock()
        features = router_features(probabilities, image, views)
        score_at = clock()
        scores = policy.score(features)
        scored = clock()
        plan_escalation(
            verdict,
            constraints,
            scores,
            features[:, 0],
            policy.threshold,
            policy.version,
        )
        ended = clock()
        cpu_ended = cpu_clock()
        if isinstance(policy, EscalationClassifier):
            policy._session_score(features)
            session_ns.append(clock() - ended)
        if index >= warmup:
            total.append(ended - started)
            cpu.append(cpu_ended - cpu_started)
            features_ns.append(score_at - features_at)
            score_ns.append(scored - score_at)
    result = {
        "count": float(count),
        "decision_p50_us": _us(total, 50),
        "decision_p99_us": _us(total, 99),
        # The decision's own CPU time: what it costs, without the time the OS gave this
        # thread's core to other processes mid-decision (2 shared cores, loaded).
        "decision_cpu_p50_us": _us(cpu, 50),
        "decision_cpu_p99_us": _us(cpu, 99),
        "features_p50_us": _us(features_ns, 50),
        "score_p50_us": _us(score_ns, 50),
        "score_p99_us": _us(score_ns, 99),
    }
    if session_ns:
        result |= {
            "onnx_session_score_p50_us": _us(session_ns[warmup:], 50),
            "onnx_session_score_p99_us": _us(session_ns[warmup:], 99),
        }
    return result


def _us(samples_ns: list[int], percentile: float) -> float:
    return float(np.percentile(samples_ns, percentile)) / 1e3


def goal(summary: dict[str, float]) -> dict[str, Any]:
    """The issue's goal row: decision p99 <= 50 µs, on the decision's own CPU time (the
    wall-clock p99 on this loaded machine is the scheduler's, shown beside it)."""
    measured = summary["decision_cpu_p99_us"]
    return {
        "goal": f"decision (features + classifier + policy) p99 <= {GOAL_P99_US:.0f} µs",
        "ratio": "decision_cpu_p99_us",
        "measured": measured,
        "display": f"{measured:.1f} µs CPU (wall-clock p99 {summary['decision_p99_us']:.0f} µs)",
        "bound": GOAL_P99_US,
        "met": measured <= GOAL_P99_US,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=5000)
    args = parser.parse_args()
    print(json.dumps(measure(args.count), indent=2))  # noqa: T201 (the command's output)


if __name__ == "__main__":
    main()
