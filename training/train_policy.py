"""Train, calibrate and evaluate the router's escalation policy.

``python -m training.train_policy --target cloud-share=0.2`` runs the committed edge
and cloud models over the router-train, calibration and test splits, fits the classifier
on router-train, picks the threshold on calibration for the ONE operator target, writes a
versioned policy artifact, and writes the evaluation report (test split only for
reporting) to docs/router-evaluation.{json,md,png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from router_service.escalation import (
    CLASSIFIER_FILE,
    POLICY_FILE,
    POLICY_SCHEMA,
    EscalationClassifier,
)
from router_service.features import SUMMARY_FEATURES, feature_names, router_features
from services.classification import softmax
from training.calibration import (
    OperatingPoint,
    accuracy_curve,
    operating_point,
    random_curve,
    share_needed,
    threshold_for_cloud_share,
    threshold_for_edge_error,
)
from workload.fashion_mnist import load_split
from workload.model_store import latest_versions

SHARES = np.linspace(0.0, 1.0, 401)
SEED = 11


@dataclass(frozen=True)
class SplitOutputs:
    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]
    edge_probabilities: npt.NDArray[np.float32]
    edge_correct: npt.NDArray[np.bool_]
    cloud_correct: npt.NDArray[np.bool_]

    @property
    def features(self) -> npt.NDArray[np.float32]:
        return router_features(self.edge_probabilities, self.images)

    @property
    def cloud_fixes_edge(self) -> npt.NDArray[np.bool_]:
        result: npt.NDArray[np.bool_] = ~self.edge_correct & self.cloud_correct
        return result


def _run(model_path: Path, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    session = ort.InferenceSession(str(model_path))
    chunks = [
        session.run(["logits"], {"image": images[i : i + 1000]})[0]
        for i in range(0, len(images), 1000)
    ]
    result: npt.NDArray[np.float32] = np.concatenate(chunks).astype(np.float32)
    return result


def split_outputs(split: str, store: Path, edge_model: str, cloud_model: str) -> SplitOutputs:
    data = load_split(split)
    paths = {d.parent.name: d / "model.onnx" for d in latest_versions(store)}
    edge_logits = _run(paths[edge_model], data.images)
    cloud_logits = _run(paths[cloud_model], data.images)
    return SplitOutputs(
        images=data.images,
        labels=data.labels,
        edge_probabilities=softmax(edge_logits),
        edge_correct=edge_logits.argmax(axis=1) == data.labels,
        cloud_correct=cloud_logits.argmax(axis=1) == data.labels,
    )


def candidate_classifiers() -> dict[str, Any]:
    return {
        "logistic_regression": make_pipeline(
            StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)
        ),
        "gradient_boosted_trees": HistGradientBoostingClassifier(
            max_depth=3, max_iter=150, learning_rate=0.05, l2_regularization=1.0, random_state=SEED
        ),
    }


def area_under_curve(curve: npt.NDArray[np.float64], limit: float = 0.4) -> float:
    """Mean accuracy over cloud shares 0..limit: how good a score is where it matters."""
    return float(curve[limit >= SHARES].mean())


def parse_target(text: str) -> tuple[str, float]:
    kind, _, value = text.partition("=")
    if kind not in {"cloud-share", "edge-error"}:
        raise argparse.ArgumentTypeError("target is cloud-share=<0..1> or edge-error=<0..1>")
    return kind, float(value)


def baseline_scores(outputs: SplitOutputs) -> dict[str, npt.NDArray[np.float32]]:
    probabilities = outputs.edge_probabilities
    entropy = -(probabilities * np.log(np.clip(probabilities, 1e-12, 1))).sum(axis=1)
    return {
        "max_softmax": (1.0 - probabilities.max(axis=1)).astype(np.float32),
        "entropy": entropy.astype(np.float32),
    }


def curves(
    scores: npt.NDArray[np.float32], outputs: SplitOutputs
) -> dict[str, npt.NDArray[np.float64]]:
    curves_ = {
        "learned_router": accuracy_curve(
            scores, outputs.edge_correct, outputs.cloud_correct, SHARES
        )
    }
    for name, baseline in baseline_scores(outputs).items():
        curves_[name] = accuracy_curve(
            baseline, outputs.edge_correct, outputs.cloud_correct, SHARES
        )
    curves_["random"] = random_curve(outputs.edge_correct, outputs.cloud_correct, SHARES)
    oracle = outputs.cloud_fixes_edge.astype(np.float32)
    curves_["oracle"] = accuracy_curve(oracle, outputs.edge_correct, outputs.cloud_correct, SHARES)
    return curves_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pair", default="fashion-mnist")
    parser.add_argument("--edge-model", default="fashion-edge")
    parser.add_argument("--cloud-model", default="fashion-cloud")
    parser.add_argument("--store", type=Path, default=Path("models/store"))
    parser.add_argument("--policies", type=Path, default=Path("models/policies"))
    parser.add_argument("--target", type=parse_target, default=("cloud-share", 0.2))
    parser.add_argument(
        "--label", choices=["cloud-fixes-edge", "edge-wrong"], default="cloud-fixes-edge"
    )
    parser.add_argument("--cloud-price-micros", type=int, default=1500)
    parser.add_argument("--report", type=Path, default=Path("docs/router-evaluation"))
    parser.add_argument("--version", type=int)
    args = parser.parse_args()
    report = train(args)
    sys.stdout.write(report["markdown"] + "\n")


def train(args: argparse.Namespace) -> dict[str, Any]:
    train_out = split_outputs("router_train", args.store, args.edge_model, args.cloud_model)
    calibration = split_outputs("calibration", args.store, args.edge_model, args.cloud_model)
    test = split_outputs("test", args.store, args.edge_model, args.cloud_model)
    labels = (
        train_out.cloud_fixes_edge if args.label == "cloud-fixes-edge" else ~train_out.edge_correct
    )

    # Model selection on the calibration split, never on test.
    fitted = {}
    selection = {}
    for name, classifier in candidate_classifiers().items():
        classifier.fit(train_out.features, labels)
        scores = classifier.predict_proba(calibration.features)[:, 1].astype(np.float32)
        curve = accuracy_curve(scores, calibration.edge_correct, calibration.cloud_correct, SHARES)
        fitted[name] = classifier
        selection[name] = area_under_curve(curve)
    chosen = max(selection, key=lambda name: selection[name])
    classifier = fitted[chosen]

    calibration_scores = classifier.predict_proba(calibration.features)[:, 1].astype(np.float32)
    kind, value = args.target
    if kind == "cloud-share":
        threshold = threshold_for_cloud_share(calibration_scores, value)
    else:
        threshold = threshold_for_edge_error(calibration_scores, calibration.edge_correct, value)
    price = args.cloud_price_micros
    expected = operating_point(
        calibration_scores,
        threshold,
        calibration.edge_correct,
        calibration.cloud_correct,
        cloud_price_micros=price,
    )

    version = args.version or _next_version(args.policies / args.pair)
    policy_dir = args.policies / args.pair / str(version)
    metadata = write_policy(
        policy_dir,
        classifier,
        chosen,
        train_out.features[:1],
        pair=args.pair,
        version=version,
        threshold=threshold,
        extra={
            "label": args.label,
            "target": {"kind": kind, "value": value},
            "calibration": {
                "split": "calibration (6,000)",
                "expected": expected.as_dict(),
                "model_selection": selection,
            },
            "models": {"edge": args.edge_model, "cloud": args.cloud_model},
            "command": "python -m training.train_policy " + " ".join(sys.argv[1:]),
        },
    )

    # The artifact as the router will run it: scores from the exported ONNX, in process.
    deployed = EscalationClassifier(policy_dir)
    test_scores = deployed.score(test.features)
    decision_us = _decision_latency_us(deployed, test.features)
    at_threshold = operating_point(
        test_scores, threshold, test.edge_correct, test.cloud_correct, cloud_price_micros=price
    )
    report = evaluation_report(
        test,
        scores=test_scores,
        chosen=at_threshold,
        metadata=metadata,
        decision_us=decision_us,
        price=price,
    )
    write_report(report, args.report)
    return report


def write_policy(
    directory: Path,
    classifier: Any,
    chosen: str,
    sample_features: npt.NDArray[np.float32],
    *,
    pair: str,
    version: int,
    threshold: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Export ``classifier`` to ONNX and write a policy version directory (classifier +
    policy.json with its sha256); returns the metadata written."""
    onnx_model = to_onnx(
        classifier,
        sample_features,
        options={id(classifier): {"zipmap": False}}
        if chosen == "gradient_boosted_trees"
        else {"zipmap": False},
        target_opset=17,
    )
    onnx_bytes = onnx_model.SerializeToString()
    directory.mkdir(parents=True, exist_ok=False)
    (directory / CLASSIFIER_FILE).write_bytes(onnx_bytes)
    metadata = {
        "schema": POLICY_SCHEMA,
        "pair": pair,
        "version": str(version),
        "threshold": threshold,
        "feature_names": feature_names(sample_features.shape[1] - len(SUMMARY_FEATURES)),
        "classifier_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "classifier": chosen,
        "created": datetime.now(UTC).replace(microsecond=0).isoformat(),
        **extra,
    }
    (directory / POLICY_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return metadata


def _next_version(directory: Path) -> int:
    existing = (
        [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
    )
    return max(existing, default=0) + 1


def _decision_latency_us(
    classifier: EscalationClassifier, features: npt.NDArray[np.float32]
) -> dict[str, float]:
    single = features[:1]
    for _ in range(200):
        classifier.score(single)
    runs = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(500):
            classifier.score(single)
        runs.append((time.perf_counter() - started) / 500 * 1e6)
    feature_runs = []
    probabilities, images = features[:1, 6:], np.zeros((1, 1, 28, 28), np.uint8)
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(500):
            router_features(probabilities, images)
        feature_runs.append((time.perf_counter() - started) / 500 * 1e6)
    return {
        "classifier_us_median": float(np.median(runs)),
        "features_us_median": float(np.median(feature_runs)),
    }


def evaluation_report(
    test: SplitOutputs,
    *,
    scores: npt.NDArray[np.float32],
    chosen: OperatingPoint,
    metadata: dict[str, Any],
    decision_us: dict[str, float],
    price: int,
) -> dict[str, Any]:
    test_curves = curves(scores, test)
    edge_accuracy = float(test.edge_correct.mean())
    cloud_accuracy = float(test.cloud_correct.mean())
    gap = cloud_accuracy - edge_accuracy
    levels = []
    for closed in (0.5, 0.75, 0.9):
        target = edge_accuracy + closed * gap
        needed = {name: share_needed(curve, SHARES, target) for name, curve in test_curves.items()}
        baselines = [
            share
            for name in ("max_softmax", "entropy", "random")
            if (share := needed[name]) is not None
        ]
        best = min(baselines) if baselines else None
        learned = needed["learned_router"]
        levels.append(
            {
                "gap_closed": closed,
                "accuracy": target,
                "cloud_share_needed": needed,
                "learned_over_best_baseline": (learned / best)
                if learned is not None and best
                else None,
            }
        )
    fixed_shares = [0.05, 0.1, 0.15, 0.2, 0.3, 0.5]
    table = {
        name: {
            f"{share:.2f}": float(curve[np.argmin(np.abs(SHARES - share))])
            for share in fixed_shares
        }
        for name, curve in test_curves.items()
    }
    report: dict[str, Any] = {
        "policy": {
            k: metadata[k]
            for k in ("pair", "version", "classifier", "label", "target", "threshold")
        },
        "test_split": "t10k (10,000), used only here",
        "edge_only": {"accuracy": edge_accuracy, "cloud_share": 0.0, "cost_per_1000_micros": 0},
        "cloud_only": {
            "accuracy": cloud_accuracy,
            "cloud_share": 1.0,
            "cost_per_1000_micros": 1000 * price,
        },
        "oracle_fixable_share": float(test.cloud_fixes_edge.mean()),
        "chosen_operating_point_on_test": chosen.as_dict(),
        "expected_on_calibration": metadata["calibration"]["expected"],
        "accuracy_at_cloud_share": table,
        "equal_accuracy_levels": levels,
        "decision_latency": decision_us,
        "curves": {"shares": SHARES.tolist(), **{k: v.tolist() for k, v in test_curves.items()}},
    }
    report["markdown"] = markdown(report)
    return report


def markdown(report: dict[str, Any]) -> str:
    policy = report["policy"]
    chosen = report["chosen_operating_point_on_test"]
    lines = [
        f"# Router evaluation: {policy['pair']} policy v{policy['version']}",
        "",
        f"Classifier `{policy['classifier']}`, label `{policy['label']}`, target "
        f"{policy['target']['kind']} = {policy['target']['value']}, "
        f"threshold {policy['threshold']:.4f} "
        "(chosen on the calibration split). All figures below are on the test split, which was "
        "used for nothing else.",
        "",
        f"Edge only {report['edge_only']['accuracy'] * 100:.2f} %, cloud only "
        f"{report['cloud_only']['accuracy'] * 100:.2f} %; the cloud fixes the edge on "
        f"{report['oracle_fixable_share'] * 100:.2f} % of items (the oracle's share).",
        "",
        f"Chosen operating point: accuracy {chosen['accuracy'] * 100:.2f} % at cloud share "
        f"{chosen['cloud_share'] * 100:.1f} %, "
        f"${chosen['cost_per_1000_micros'] / 1e6:.2f} per 1,000 requests "
        f"(all-cloud ${report['cloud_only']['cost_per_1000_micros'] / 1e6:.2f}); "
        f"error among answers kept on the edge {chosen['edge_kept_error_rate'] * 100:.2f} %.",
        "",
        "## Accuracy (%) at a given cloud share",
        "",
    ]
    table = report["accuracy_at_cloud_share"]
    shares = list(next(iter(table.values())))
    lines.append("| router | " + " | ".join(f"{float(s) * 100:.0f} %" for s in shares) + " |")
    lines.append("| --- |" + " --- |" * len(shares))
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[s] * 100:.2f}" for s in shares) + " |")
    lines += [
        "",
        "## Cloud share needed for equal accuracy",
        "",
        "| gap closed | accuracy | learned | max-softmax | entropy | random | oracle "
        "| learned / best baseline |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in report["equal_accuracy_levels"]:
        needed = level["cloud_share_needed"]

        def cell(name: str, needed: dict[str, float | None] = needed) -> str:
            value = needed[name]
            return "never" if value is None else f"{value * 100:.1f} %"

        ratio = level["learned_over_best_baseline"]
        lines.append(
            f"| {level['gap_closed'] * 100:.0f} % | {level['accuracy'] * 100:.2f} % "
            f"| {cell('learned_router')} | "
            f"{cell('max_softmax')} | {cell('entropy')} | {cell('random')} | {cell('oracle')} | "
            f"{'n/a' if ratio is None else f'{ratio:.2f}x'} |"
        )
    latency = report["decision_latency"]
    lines += [
        "",
        f"Decision latency in process (median of 7 x 500, batch 1): features "
        f"{latency['features_us_median']:.1f} µs + classifier "
        f"{latency['classifier_us_median']:.1f} µs.",
        "",
        "Regenerate: `.venv/bin/python -m training.train_policy --target "
        f"{policy['target']['kind']}={policy['target']['value']}`.",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], base: Path) -> None:
    base.parent.mkdir(parents=True, exist_ok=True)
    serialisable = {k: v for k, v in report.items() if k != "markdown"}
    base.with_suffix(".json").write_text(json.dumps(serialisable, indent=2) + "\n")
    base.with_suffix(".md").write_text(report["markdown"] + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves_ = report["curves"]
    shares = np.array(curves_["shares"]) * 100
    figure, axis = plt.subplots(figsize=(8, 5))
    styles = {
        "learned_router": "-",
        "max_softmax": "--",
        "entropy": "-.",
        "random": ":",
        "oracle": (0, (1, 1)),
    }
    for name, style in styles.items():
        axis.plot(
            shares, np.array(curves_[name]) * 100, linestyle=style, label=name.replace("_", " ")
        )
    chosen = report["chosen_operating_point_on_test"]
    axis.scatter(
        [chosen["cloud_share"] * 100],
        [chosen["accuracy"] * 100],
        color="black",
        zorder=5,
        label="chosen point",
    )
    axis.set_xlim(0, 60)
    axis.set_xlabel("cloud share (% of requests escalated)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("Fashion-MNIST: accuracy against cloud share (test split)")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(base.with_suffix(".png"), dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
