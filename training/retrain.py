"""The feedback loop: retrain the router's escalation policy with what reconciliation
taught, and publish it through the signed registry only if it is better.

``hybridmesh policy retrain --pair NAME --outbox var/mesh/router/outbox.sqlite``
``  [--registry-root var/registry --keys ~/.hybridmesh/keys]`` (``hybridmesh router
retrain`` is the same, for the pair fashion-mnist unless ``--pair``).

Data: the router-train split of the pair's declared data with its ground-truth label
("the cloud fixes the edge"), plus every reconciled example in the outbox for the pair:
the item's input (stored in the pair's own datatype and shape), the edge model's output
(the pair's output tensor, as probabilities by the pair's output kind) recomputed from
it, and the label "the cloud disagreed with the edge" (the cloud model is the teacher
there: no ground truth exists at a site).

Comparison on held-out data: the calibration split is halved by index parity; both the
serving policy and the candidate get their threshold for the same cloud-share target on
the even half, and are compared on the odd half (accuracy at that share). The test split
stays untouched. The candidate is published (signed, promoted) only when its held-out
accuracy beats the serving policy's by more than ``--min-gain``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from hybridmesh.common.v1 import tensor_pb2
from ota.artifacts import ArtifactRef
from registry.signing import PRIVATE_KEY_FILE, load_private_key
from registry.store import RegistryStore
from router_service.escalation import PolicyArtifactError, latest_policy, load_policy
from router_service.features import router_features
from router_service.outbox import Outbox
from router_service.policy_updater import POLICY_KIND
from services.classification import to_probabilities
from services.errors import InvalidArgumentError
from services.tensors import DATATYPE_BY_KSERVE_NAME, decode_tensor
from services.views import apply_view
from training.arguments import DEFAULT_RESULTS
from training.calibration import operating_point, threshold_for_cloud_share
from training.train_policy import (
    SplitOutputs,
    candidate_classifiers,
    pair_models,
    run_model,
    split_outputs,
    write_policy,
)
from workload.catalog import CatalogError, ModelPair


@dataclass(frozen=True)
class Examples:
    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.bool_]

    @property
    def count(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Comparison:
    reconciled_examples: int
    reconciled_corrections: int
    target_cloud_share: float
    serving_version: str
    serving_accuracy: float
    serving_cloud_share: float
    candidate_accuracy: float
    candidate_cloud_share: float
    min_gain: float

    @property
    def better(self) -> bool:
        return self.candidate_accuracy > self.serving_accuracy + self.min_gain


def reconciled_examples(
    outbox: Path, pair: ModelPair, edge_model: Path, views: tuple[str, ...] = ()
) -> Examples:
    """Features and "the cloud disagreed" labels of the pair's reconciled items (with
    the edge model run on each of ``views`` too, as the router does)."""
    # Outbox() would create a missing file (and its schema): a misspelt --outbox must not
    # read as "no reconciled items" and exit 0.
    if not outbox.is_file():
        raise CatalogError(f"--outbox {outbox}: no such file")
    try:
        store = Outbox(outbox, max_items=1, synchronous="NORMAL")
    except sqlite3.DatabaseError as error:
        raise CatalogError(f"--outbox {outbox}: not a router outbox ({error})") from error
    try:
        items = [item for item in store.reconciled() if item.pair == pair.name]
    finally:
        store.close()
    if not items:
        return Examples(np.zeros((0, 0), np.float32), np.zeros(0, np.bool_))
    inputs = np.concatenate([_decode(item.input, pair) for item in items])
    output = run_model(edge_model, pair, inputs)
    as_probabilities = pair.output_kind == "probabilities"
    probabilities = to_probabilities(output, as_probabilities)
    view_outputs = {
        view: to_probabilities(
            run_model(edge_model, pair, apply_view(view, inputs)), as_probabilities
        )
        for view in views
    }
    features = router_features(probabilities, inputs, view_outputs)
    labels = np.array([not item.agrees for item in items], dtype=np.bool_)
    return Examples(features, labels)


def fit_candidate(train: SplitOutputs, learned: Examples, views: tuple[str, ...], kind: str) -> Any:
    """A ``kind`` classifier fitted on router-train (ground truth: the cloud fixes the
    edge) plus the reconciled examples (the cloud disagreed), with ``views``' features."""
    features, labels = train.features_for(views), train.cloud_fixes_edge
    if learned.count:
        features = np.concatenate([features, learned.features])
        labels = np.concatenate([labels, learned.labels])
    return candidate_classifiers()[kind].fit(features, labels)


def _decode(serialized: bytes, pair: ModelPair) -> npt.NDArray[np.generic]:
    """A stored input, checked against the pair's input contract (datatype and shape)."""
    tensor = tensor_pb2.Tensor.FromString(serialized)
    try:
        return decode_tensor(
            tensor,
            "input",
            expected_datatype=DATATYPE_BY_KSERVE_NAME[pair.input.datatype],
            expected_shape=pair.input.shape,
            max_batch_size=max(tensor.shape[0], 1) if tensor.shape else 1,
        )
    except InvalidArgumentError as error:
        raise CatalogError(
            f"pair {pair.name}: a reconciled input does not match the pair's input "
            f"contract ({error}); was the catalog changed since it was stored?"
        ) from error


def _at_share(
    scores_a: npt.NDArray[np.float32],
    scores_b: npt.NDArray[np.float32],
    half_b: SplitOutputs,
    share: float,
) -> tuple[float, float]:
    threshold = threshold_for_cloud_share(scores_a, share)
    point = operating_point(
        scores_b, threshold, half_b.edge_correct, half_b.cloud_correct, cloud_price_micros=0
    )
    return point.accuracy, point.cloud_share


def _half(outputs: SplitOutputs, parity: int) -> SplitOutputs:
    index = np.arange(len(outputs.labels)) % 2 == parity
    return SplitOutputs(
        outputs.inputs[index],
        outputs.labels[index],
        outputs.edge_probabilities[index],
        outputs.edge_correct[index],
        outputs.cloud_correct[index],
        {view: values[index] for view, values in outputs.view_probabilities.items()},
    )


def retrain(args: argparse.Namespace) -> tuple[Comparison, Any, SplitOutputs]:
    models = pair_models(args.catalog, args.pair, args.store)
    try:
        serving_dir = latest_policy(args.policies / args.pair)
    except PolicyArtifactError as error:
        raise CatalogError(
            f"pair {args.pair}: no policy to retrain in {args.policies / args.pair} "
            f"(`hybridmesh policy train --pair {args.pair}` first)"
        ) from error
    serving = load_policy(serving_dir)
    train = split_outputs(models, "router_train")
    calibration = split_outputs(models, "calibration")
    half_a, half_b = _half(calibration, 0), _half(calibration, 1)
    # The candidate sees what the serving policy sees: its declared views.
    views = serving.metadata.views
    learned = reconciled_examples(args.outbox, models.pair, models.edge, views)
    classifier = fit_candidate(train, learned, views, classifier_kind(serving_dir))

    def scores(half: SplitOutputs) -> npt.NDArray[np.float32]:
        result: npt.NDArray[np.float32] = classifier.predict_proba(half.features_for(views))[:, 1]
        return result.astype(np.float32)

    share = args.target_cloud_share
    serving_accuracy, serving_share = _at_share(
        serving.score(half_a.features_for(views)),
        serving.score(half_b.features_for(views)),
        half_b,
        share,
    )
    candidate_accuracy, candidate_share = _at_share(scores(half_a), scores(half_b), half_b, share)
    comparison = Comparison(
        reconciled_examples=learned.count,
        reconciled_corrections=int(learned.labels.sum()),
        target_cloud_share=share,
        serving_version=serving.version,
        serving_accuracy=serving_accuracy,
        serving_cloud_share=serving_share,
        candidate_accuracy=candidate_accuracy,
        candidate_cloud_share=candidate_share,
        min_gain=args.min_gain,
    )
    return comparison, classifier, calibration


def classifier_kind(policy: Path) -> str:
    """The serving policy's classifier kind (the candidate is trained the same way)."""
    kind = json.loads((policy / "policy.json").read_text()).get("classifier")
    return kind if kind in candidate_classifiers() else "logistic_regression"


def report(comparison: Comparison) -> str:
    c = comparison
    verdict = "better: publish" if c.better else "not better: keep the serving policy"
    return "\n".join(
        [
            f"reconciled examples used: {c.reconciled_examples} "
            f"({c.reconciled_corrections} where the cloud disagreed)",
            f"held-out (calibration, odd half), cloud share target {c.target_cloud_share:.0%}:",
            f"  serving v{c.serving_version}: accuracy {c.serving_accuracy:.2%} "
            f"at cloud share {c.serving_cloud_share:.1%}",
            f"  candidate:  accuracy {c.candidate_accuracy:.2%} "
            f"at cloud share {c.candidate_cloud_share:.1%}",
            f"verdict: {verdict} (min gain {c.min_gain:.2%})",
        ]
    )


def run(args: argparse.Namespace) -> int:
    """``hybridmesh policy retrain`` / ``hybridmesh router retrain`` (arguments:
    ``training.arguments.add_retrain_arguments``); 2 on a catalog or data problem."""
    try:
        return _run(args)
    except CatalogError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2


def _run(args: argparse.Namespace) -> int:
    comparison, classifier, calibration = retrain(args)
    sys.stdout.write(report(comparison) + "\n")
    report_path: Path = args.report or (
        args.out / "retrain.json" if args.out else DEFAULT_RESULTS / args.pair / "retrain.json"
    )
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(
        json.dumps(
            {"pair": args.pair} | asdict(comparison) | {"better": comparison.better}, indent=2
        )
        + "\n"
    )
    sys.stdout.write(f"report: {report_path}\n")
    if not comparison.better:
        return 0
    serving = latest_policy(args.policies / args.pair)
    version = int(serving.name) + 1
    directory = (args.out or args.policies / args.pair) / str(version)
    views = load_policy(serving).metadata.views
    calibration_features = calibration.features_for(views)
    calibration_scores = classifier.predict_proba(calibration_features)[:, 1].astype(np.float32)
    threshold = threshold_for_cloud_share(calibration_scores, args.target_cloud_share)
    expected = operating_point(
        calibration_scores,
        threshold,
        calibration.edge_correct,
        calibration.cloud_correct,
        cloud_price_micros=args.cloud_price_micros,
    )
    write_policy(
        directory,
        classifier,
        classifier_kind(serving),
        calibration_features[:1],
        pair=args.pair,
        version=version,
        threshold=threshold,
        num_classes=calibration.edge_probabilities.shape[1],
        views=views,
        extra={
            "label": "cloud-fixes-edge (router-train) + cloud-disagreed (reconciled)",
            "target": {"kind": "cloud-share", "value": args.target_cloud_share},
            "calibration": {
                "split": f"calibration ({len(calibration.labels):,})",
                "expected": expected.as_dict(),
            },
            "models": pair_models(args.catalog, args.pair, args.store).names,
            "retrained_from": comparison.serving_version,
            "comparison": asdict(comparison),
        },
    )
    sys.stdout.write(f"wrote {directory}\n")
    if args.registry_root and args.keys:
        key = load_private_key(args.keys / PRIVATE_KEY_FILE)
        store = RegistryStore(args.registry_root)
        store.publish(directory, ArtifactRef(POLICY_KIND, args.pair, version), key)
        store.promote(POLICY_KIND, args.pair, version, key)
        sys.stdout.write(f"published and promoted {args.pair} policy v{version}\n")
    return 0
