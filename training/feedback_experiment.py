"""Offline experiment: does the feedback loop (reconciled labels -> ``retrain``) beat the
policy it replaces on a drifted workload?

``python -m training.feedback_experiment [--drifts all] [--report results/feedback]``

For each drift kind (``workload.drift``):

1. Site traffic after the shift: the router-train split, drifted. The serving policy
   scores it; what reaches the outbox is what it escalates (its threshold) plus a
   ``--shadow-rate`` random sample of the answers it keeps (shadow checks). The cloud
   model answers each such item, and the item is queued and reconciled in a real
   ``router_service.outbox.Outbox`` as the reconciler does.
2. Retrain: ``training.retrain.reconciled_examples`` reads that outbox (label: the cloud
   disagreed with the edge) and ``training.retrain.fit_candidate`` fits the serving
   policy's classifier kind on clean router-train plus those examples, with the serving
   policy's views — the code ``hybridmesh policy retrain`` runs.
3. Held-out drifted data: the test split, drifted (never seen by either policy). Its
   even-index half picks each policy's threshold for the same cloud share (the
   operator's target); on the odd half the accuracy of the two is compared item by
   item (paired bootstrap interval of the difference), and the cloud share each needs
   to close 50/75/90/95 % of the edge-cloud gap (paired bootstrap interval of the ratio,
   retrained over serving).

Nothing is published: this measures whether the loop earns a version.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from router_service.escalation import ScoringPolicy, latest_policy, load_policy
from router_service.outbox import Outbox, OutboxItem, Priority, ReconciledItem
from services.classification import to_probabilities
from services.tensors import encode_tensor
from services.views import apply_view
from training.calibration import threshold_for_cloud_share
from training.comparison import RESAMPLES, compare, paired_difference
from training.retrain import classifier_kind, fit_candidate, reconciled_examples
from training.train_policy import PairModels, SplitOutputs, pair_models, run_model, split_outputs
from workload.drift import DRIFTS, Drift, drifted
from workload.fashion_mnist import Split, load_split

PAIR = "fashion-mnist"
SEED = 20261130


def drifted_outputs(models: PairModels, split: Split) -> SplitOutputs:
    """Edge (with the pair's views) and cloud outputs on ``split``'s images."""
    pair = models.pair
    as_probabilities = pair.output_kind == "probabilities"
    edge = run_model(models.edge, pair, split.images)
    cloud = run_model(models.cloud, pair, split.images)
    return SplitOutputs(
        inputs=split.images,
        labels=split.labels,
        edge_probabilities=to_probabilities(edge, as_probabilities),
        edge_correct=edge.argmax(axis=1) == split.labels,
        cloud_correct=cloud.argmax(axis=1) == split.labels,
        view_probabilities={
            view: to_probabilities(
                run_model(models.edge, pair, apply_view(view, split.images)), as_probabilities
            )
            for view in pair.views
        },
    )


def reconcile_into_outbox(
    path: Path, models: PairModels, images: npt.NDArray[np.uint8], edge_classes: npt.NDArray[Any]
) -> None:
    """Queue each image (batch 1) and reconcile it with the cloud model's answer, as the
    router's outbox and the reconciler do."""
    cloud_classes = run_model(models.cloud, models.pair, images).argmax(axis=1)
    outbox = Outbox(path, max_items=max(len(images), 1))
    edge_model, cloud_model = f"{models.pair.edge_model}:1", f"{models.pair.cloud_model}:1"
    try:
        for index in range(len(images)):
            request_id = f"feedback-{index}"
            tensor = encode_tensor(models.pair.input.name, images[index : index + 1])
            serialized = tensor.SerializeToString()
            edge_class, cloud_class = int(edge_classes[index]), int(cloud_classes[index])
            outbox.put(
                OutboxItem(
                    request_id, Priority.ESCALATION, models.pair.name, 1, 1, (0,),
                    (edge_class,), edge_model, serialized,
                )
            )  # fmt: skip
            outbox.complete(
                request_id,
                [
                    ReconciledItem(
                        request_id, 0, models.pair.name, 0.0, 0.0, edge_model, edge_class,
                        cloud_model, cloud_class, serialized,
                    )
                ],
            )  # fmt: skip
    finally:
        outbox.close()


def run_drift(
    drift: Drift,
    models: PairModels,
    serving: ScoringPolicy,
    clean_train: SplitOutputs,
    *,
    target_share: float,
    shadow_rate: float,
    resamples: int,
    classifier_kind: str,
) -> dict[str, Any]:
    views = serving.metadata.views
    traffic = drifted_outputs(models, drifted(load_split("router_train"), drift))
    escalated = serving.score(traffic.features_for(views)) >= serving.threshold
    shadow = ~escalated & (np.random.default_rng(SEED).random(len(escalated)) < shadow_rate)
    queued = np.flatnonzero(escalated | shadow)
    with tempfile.TemporaryDirectory() as directory:
        outbox = Path(directory) / "outbox.sqlite"
        reconcile_into_outbox(
            outbox,
            models,
            traffic.inputs[queued].astype(np.uint8),
            traffic.edge_probabilities[queued].argmax(axis=1),
        )
        learned = reconciled_examples(outbox, models.pair, models.edge, views)
    retrained = fit_candidate(clean_train, learned, views, classifier_kind)

    held_out = drifted_outputs(models, drifted(load_split("test"), drift))
    parity = np.arange(len(held_out.labels)) % 2
    pick, measure = (held_out.subset(np.flatnonzero(parity == p)) for p in (0, 1))

    def scores(policy: str, outputs: SplitOutputs) -> npt.NDArray[np.float32]:
        features = outputs.features_for(views)
        if policy == "serving":
            return serving.score(features)
        result: npt.NDArray[np.float32] = retrained.predict_proba(features)[:, 1]
        return result.astype(np.float32)

    correct: dict[str, npt.NDArray[np.bool_]] = {}
    shares: dict[str, float] = {}
    for policy in ("serving", "retrained"):
        threshold = threshold_for_cloud_share(scores(policy, pick), target_share)
        to_cloud = scores(policy, measure) >= threshold
        correct[policy] = np.where(to_cloud, measure.cloud_correct, measure.edge_correct)
        shares[policy] = float(to_cloud.mean())
    accuracy = paired_difference(correct["serving"], correct["retrained"], resamples=resamples)
    ratio = compare(
        {"retrained": scores("retrained", measure), "serving": scores("serving", measure)},
        "serving",
        measure.edge_correct,
        measure.cloud_correct,
        resamples=resamples,
    )["retrained"]
    return {
        "drift": drift.kind,
        "severity": drift.severity,
        "edge_accuracy": float(held_out.edge_correct.mean()),
        "cloud_accuracy": float(held_out.cloud_correct.mean()),
        "reconciled": learned.count,
        "reconciled_disagreeing": int(learned.labels.sum()),
        "escalated": int(escalated.sum()),
        "shadow_checked": int(shadow.sum()),
        "serving_accuracy": float(correct["serving"].mean()),
        "retrained_accuracy": float(correct["retrained"].mean()),
        "serving_cloud_share": shares["serving"],
        "retrained_cloud_share": shares["retrained"],
        "accuracy_gain": accuracy.as_dict(),
        "share_ratio": ratio.as_dict(),
    }


def markdown(report: dict[str, Any]) -> str:
    rows = report["drifts"]
    lines = [
        "## Feedback loop under drift: retrained against serving, on held-out drifted data",
        "",
        f"`python -m training.feedback_experiment` (serving policy v{report['serving_version']}, "
        f"classifier `{report['classifier']}`, views {report['views']}). Per drift kind "
        "(`workload/drift.py`): the drifted router-train split is the site's traffic; what the "
        "serving policy escalates plus a "
        f"{report['shadow_rate'] * 100:.0f} % shadow sample of what it keeps is reconciled "
        "with the cloud model in a real outbox; `retrain` (`reconciled_examples`, "
        "`fit_candidate`) fits the candidate on clean router-train plus those labels. "
        "Held out: the drifted test split — its even half picks each policy's threshold for "
        f"a {report['target_share'] * 100:.0f} % cloud share, its odd half "
        f"({rows[0]['accuracy_gain']['items']:,} items) measures. Intervals: 95 % paired "
        f"bootstrap, {report['resamples']:,} resamples.",
        "",
        "| drift | edge / cloud accuracy | reconciled (cloud disagreed) | serving: accuracy at "
        "share | retrained: accuracy at share | accuracy gain [95 % CI] | cloud-share ratio "
        "retrained / serving at 50 / 75 / 90 / 95 % of the gap [95 % CI] |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        gain = row["accuracy_gain"]
        ratios = (
            " ; ".join(
                f"{level['ratio']:.2f}x [{level['low']:.2f}, {level['high']:.2f}]"
                for level in row["share_ratio"]["levels"]
            )
            if row["cloud_accuracy"] > row["edge_accuracy"]
            else "no gap to close: the cloud is no better than the edge under this drift"
        )
        lines.append(
            f"| {row['drift']} | {row['edge_accuracy'] * 100:.1f} / "
            f"{row['cloud_accuracy'] * 100:.1f} % | {row['reconciled']:,} "
            f"({row['reconciled_disagreeing']:,}) | {row['serving_accuracy'] * 100:.2f} % at "
            f"{row['serving_cloud_share'] * 100:.1f} % | {row['retrained_accuracy'] * 100:.2f} % "
            f"at {row['retrained_cloud_share'] * 100:.1f} % | "
            f"{gain['difference'] * 100:+.2f} pp [{gain['low'] * 100:+.2f}, "
            f"{gain['high'] * 100:+.2f}] | {ratios} |"
        )
    wins = [r["drift"] for r in rows if r["accuracy_gain"]["low"] > 0]
    losses = [r["drift"] for r in rows if r["accuracy_gain"]["high"] < 0]
    lines += [
        "",
        "Measurably better (the accuracy gain's interval above 0): "
        + (", ".join(wins) if wins else "none")
        + f" of {len(rows)} drift kinds; measurably worse (below 0): "
        + (", ".join(losses) if losses else "none")
        + ". The reconciled label is the cloud's disagreement (no ground truth at a site): "
        "where the drift hurts the cloud more than the edge, it teaches the router to "
        "escalate items the cloud gets wrong.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--drifts", default="all", help="comma-separated kinds, or all")
    parser.add_argument("--catalog", type=Path, default=Path("models/catalog.toml"))
    parser.add_argument("--store", type=Path, default=Path("models/store"))
    parser.add_argument("--policies", type=Path, default=Path("models/policies"))
    parser.add_argument("--target-share", type=float, default=0.2)
    parser.add_argument("--shadow-rate", type=float, default=0.02)
    parser.add_argument("--resamples", type=int, default=RESAMPLES)
    parser.add_argument("--report", type=Path, default=Path("results/feedback/feedback"))
    args = parser.parse_args(argv)
    kinds = list(DRIFTS) if args.drifts == "all" else args.drifts.split(",")
    unknown = [kind for kind in kinds if kind not in DRIFTS]
    if unknown:
        sys.stderr.write(f"error: unknown drift kind(s) {unknown}; kinds: {sorted(DRIFTS)}\n")
        return 2
    models = pair_models(args.catalog, PAIR, args.store)
    serving_dir = latest_policy(args.policies / PAIR)
    serving = load_policy(serving_dir)
    kind = classifier_kind(serving_dir)
    clean_train = split_outputs(models, "router_train")
    rows = [
        run_drift(
            DRIFTS[name],
            models,
            serving,
            clean_train,
            target_share=args.target_share,
            shadow_rate=args.shadow_rate,
            resamples=args.resamples,
            classifier_kind=kind,
        )
        for name in kinds
    ]
    report = {
        "serving_version": serving.version,
        "classifier": kind,
        "views": list(serving.metadata.views),
        "target_share": args.target_share,
        "shadow_rate": args.shadow_rate,
        "resamples": args.resamples,
        "drifts": rows,
    }
    report["markdown"] = markdown(report)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.with_suffix(".json").write_text(
        json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=2) + "\n"
    )
    args.report.with_suffix(".md").write_text(report["markdown"] + "\n")
    sys.stdout.write(report["markdown"] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
