"""Train, calibrate and evaluate a model pair's router escalation policy.

``hybridmesh policy train --pair NAME --target cloud-share=0.2`` runs the pair's edge
and cloud models (named in ``models/catalog.toml``, tensors and output kind from the
catalog and the manifests) over
the router-train, calibration and test splits of the pair's declared data
(``workload.pair_data``), fits the classifier on router-train, picks the classifier and
the threshold on calibration for the ONE operator target, writes a versioned policy to
``<policies>/<pair>/<version>/`` and the evaluation report (the test split, used only for
reporting) to ``results/policies/<pair>/evaluation.{json,md,png}``.

The ship rule (``training.comparison``): every candidate classifier is fitted twice,
on router-train and on calibration, and scores the split it was not fitted on, so the
pooled held-out data is both splits and no item is scored by a router fitted on it. A
learned classifier ships only when the paired-bootstrap interval of its cloud-share
ratio to max-softmax (at 50, 75, 90 and 95 % of the accuracy gap) lies below 1.0 at
every level; otherwise the policy is ``max-softmax``, named as such. The shipped
classifier is then fitted on router-train and its threshold chosen on calibration.
``hybridmesh policy evaluate --pair NAME`` re-evaluates an existing policy version
without training anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from router_service.escalation import (
    CLASSIFIER_FILE,
    LEARNED,
    MAX_SOFTMAX,
    POLICY_FILE,
    POLICY_SCHEMA,
    PolicyArtifactError,
    ScoringPolicy,
    latest_policy,
    load_policy,
)
from router_service.features import feature_names, router_features
from services.classification import to_probabilities
from services.views import apply_view
from training.arguments import report_base
from training.calibration import (
    OperatingPoint,
    accuracy_curve,
    operating_point,
    random_curve,
    share_needed,
    threshold_for_cloud_share,
    threshold_for_edge_error,
)
from training.comparison import (
    BOOTSTRAP_SEED,
    CONFIDENCE,
    GAP_LEVELS,
    RESAMPLES,
    Comparison,
    bonferroni,
    compare,
    ship_choice,
)
from workload.catalog import CatalogError, ModelPair, check_against_store, load_catalog
from workload.folds import (
    FOLDS_FILE,
    FOLDS_ROOT,
    FoldSetError,
    fold_set_dir,
    load_fold_set,
    out_of_fold_outputs,
)
from workload.pair_data import MODEL_TRAIN_SPLIT, has_model_train_split, load_pair_split

SHARES = np.linspace(0.0, 1.0, 401)
DEFAULT_POLICIES = Path("models/policies")
DEFAULT_FOLDS = FOLDS_ROOT
SEED = 11
# The max-softmax baseline's name among the candidates (policy kind max-softmax).
MAX_SOFTMAX_CANDIDATE = "max_softmax"


@dataclass(frozen=True)
class PairModels:
    """A catalog pair and the ONNX files of its newest edge and cloud model versions."""

    pair: ModelPair
    edge: Path
    cloud: Path

    @property
    def names(self) -> dict[str, str]:
        return {"edge": self.pair.edge_model, "cloud": self.pair.cloud_model}


def pair_models(catalog: Path, pair_name: str, store: Path) -> PairModels:
    """The pair from the catalog, its models checked against its contract in the store.
    Raises CatalogError naming what is wrong."""
    pairs = load_catalog(catalog)
    if pair_name not in pairs:
        raise CatalogError(f"{catalog}: no pair {pair_name!r}; pairs: {sorted(pairs)}")
    pair = pairs[pair_name]
    manifests = check_against_store({pair_name: pair}, store)

    def model_file(name: str) -> Path:
        manifest = manifests[name]
        return store / name / str(manifest.version) / manifest.model_file

    return PairModels(pair, model_file(pair.edge_model), model_file(pair.cloud_model))


@dataclass(frozen=True)
class SplitOutputs:
    inputs: npt.NDArray[np.generic]
    labels: npt.NDArray[np.int64]
    edge_probabilities: npt.NDArray[np.float32]
    edge_correct: npt.NDArray[np.bool_]
    cloud_correct: npt.NDArray[np.bool_]
    # Each declared view's edge probabilities, in the pair's declared order.
    view_probabilities: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)

    @property
    def features(self) -> npt.NDArray[np.float32]:
        return router_features(self.edge_probabilities, self.inputs, self.view_probabilities)

    def features_for(self, views: tuple[str, ...]) -> npt.NDArray[np.float32]:
        """The features of a policy that declares ``views`` (a subset of the pair's)."""
        return router_features(
            self.edge_probabilities,
            self.inputs,
            {view: self.view_probabilities[view] for view in views},
        )

    @property
    def max_softmax(self) -> npt.NDArray[np.float32]:
        result: npt.NDArray[np.float32] = 1.0 - self.edge_probabilities.max(axis=1)
        return result.astype(np.float32)

    @property
    def cloud_fixes_edge(self) -> npt.NDArray[np.bool_]:
        result: npt.NDArray[np.bool_] = ~self.edge_correct & self.cloud_correct
        return result

    def subset(self, index: npt.NDArray[np.int64]) -> SplitOutputs:
        """The items at ``index``, in that order."""
        return SplitOutputs(
            inputs=self.inputs[index],
            labels=self.labels[index],
            edge_probabilities=self.edge_probabilities[index],
            edge_correct=self.edge_correct[index],
            cloud_correct=self.cloud_correct[index],
            view_probabilities={k: v[index] for k, v in self.view_probabilities.items()},
        )


def concatenate_outputs(parts: Sequence[SplitOutputs]) -> SplitOutputs:
    """The items of every part, in order (same views in every part)."""
    return SplitOutputs(
        inputs=np.concatenate([part.inputs for part in parts]),
        labels=np.concatenate([part.labels for part in parts]),
        edge_probabilities=np.concatenate([part.edge_probabilities for part in parts]),
        edge_correct=np.concatenate([part.edge_correct for part in parts]),
        cloud_correct=np.concatenate([part.cloud_correct for part in parts]),
        view_probabilities={
            view: np.concatenate([part.view_probabilities[view] for part in parts])
            for view in parts[0].view_probabilities
        },
    )


@dataclass(frozen=True)
class OutOfFoldData:
    """Out-of-fold edge outputs on the model-train split (``workload.folds``): ``outputs``
    with each item's edge output from the fold model that never saw it, ``fold`` [n] the
    fold of each item. The cloud's outputs there are in-sample (it was fitted on
    model-train): its correctness is optimistic on these items."""

    outputs: SplitOutputs
    fold: npt.NDArray[np.int64]
    folds: int
    directory: Path

    def fold_outputs(self) -> list[tuple[str, SplitOutputs]]:
        return [
            (f"out-of-fold {k}", self.outputs.subset(np.flatnonzero(self.fold == k)))
            for k in range(self.folds)
        ]


def out_of_fold_data(models: PairModels, folds_root: Path) -> OutOfFoldData | None:
    """The pair's out-of-fold data, or None when its edge model has no fold set under
    ``folds_root`` (``make models`` trains one) or its data has no model-train split.
    Raises CatalogError for a fold set that does not verify."""
    edge_version = int(models.edge.parent.name)
    directory = fold_set_dir(models.pair.edge_model, edge_version, folds_root)
    if not (directory / FOLDS_FILE).exists() or not has_model_train_split(models.pair):
        return None
    try:
        fold_set = load_fold_set(directory)
    except FoldSetError as error:
        raise CatalogError(f"pair {models.pair.name}: {error}") from error
    data = load_pair_split(models.pair, MODEL_TRAIN_SPLIT)
    oof = out_of_fold_outputs(
        fold_set, data.inputs, models.pair.input.name, models.pair.output.name,
        views=models.pair.views,
    )  # fmt: skip
    probabilities = models.pair.output_kind == "probabilities"
    cloud_output = run_model(models.cloud, models.pair, data.inputs)
    outputs = SplitOutputs(
        inputs=data.inputs,
        labels=data.labels,
        edge_probabilities=to_probabilities(oof.outputs, probabilities),
        edge_correct=oof.outputs.argmax(axis=1) == data.labels,
        cloud_correct=cloud_output.argmax(axis=1) == data.labels,
        view_probabilities={
            view: to_probabilities(oof.view_outputs[view], probabilities)
            for view in models.pair.views
        },
    )
    return OutOfFoldData(outputs, oof.fold, fold_set.folds, directory)


def run_model(
    model_path: Path, pair: ModelPair, inputs: npt.NDArray[np.generic]
) -> npt.NDArray[np.float32]:
    """The model's output tensor (the pair's output name) for ``inputs``, in chunks."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    chunks = [
        session.run([pair.output.name], {pair.input.name: inputs[i : i + 1000]})[0]
        for i in range(0, len(inputs), 1000)
    ]
    result: npt.NDArray[np.float32] = np.concatenate(chunks).astype(np.float32)
    return result


def split_outputs(models: PairModels, split: str) -> SplitOutputs:
    data = load_pair_split(models.pair, split)
    edge_output = run_model(models.edge, models.pair, data.inputs)
    cloud_output = run_model(models.cloud, models.pair, data.inputs)
    probabilities = models.pair.output_kind == "probabilities"
    views = {
        view: to_probabilities(
            run_model(models.edge, models.pair, apply_view(view, data.inputs)), probabilities
        )
        for view in models.pair.views
    }
    return SplitOutputs(
        inputs=data.inputs,
        labels=data.labels,
        edge_probabilities=to_probabilities(
            edge_output, models.pair.output_kind == "probabilities"
        ),
        edge_correct=edge_output.argmax(axis=1) == data.labels,
        cloud_correct=cloud_output.argmax(axis=1) == data.labels,
        view_probabilities=views,
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


def run_cli(command: Any, args: argparse.Namespace) -> int:
    """Run ``command(args)``; a catalog or data problem is one line naming the pair."""
    try:
        report = command(args)
    except (CatalogError, PolicyArtifactError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    sys.stdout.write(report["markdown"] + "\n")
    sys.stdout.write(f"report: {report_base(args, 'evaluation').with_suffix('.md')}\n")
    return 0


def labels_for(outputs: SplitOutputs, label: str) -> npt.NDArray[np.bool_]:
    """What a classifier learns: the cloud fixes the edge, or the edge is wrong."""
    result: npt.NDArray[np.bool_] = (
        outputs.cloud_fixes_edge if label == "cloud-fixes-edge" else ~outputs.edge_correct
    )
    return result


@dataclass(frozen=True)
class HeldOut:
    """The ship rule's evidence: every candidate against max-softmax on pooled held-out
    items, and the candidate that ships (None: max-softmax ships)."""

    comparisons: dict[str, Comparison]
    shipped: str | None
    items: str
    confidence: float
    resamples: int
    # The shipped (else best) candidate at a plain 95 % on the pooled items and on each
    # kind of item in the pool.
    plain: dict[str, Comparison] = field(default_factory=dict)
    plain_router: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "data": self.items,
            "confidence": self.confidence,
            "resamples": self.resamples,
            "seed": BOOTSTRAP_SEED,
            "rule": "a learned classifier ships only when the upper bound of its ratio's "
            "interval is below 1.0 at every gap level; else max-softmax",
            "candidates": {name: c.as_dict() for name, c in self.comparisons.items()},
            "shipped": self.shipped or MAX_SOFTMAX_CANDIDATE,
            "plain_95": {
                "router": self.plain_router,
                "parts": {part: c.as_dict() for part, c in self.plain.items()},
            },
        }


def held_out_comparison(
    first: SplitOutputs,
    second: SplitOutputs,
    label: str,
    *,
    out_of_fold: OutOfFoldData | None = None,
    resamples: int = RESAMPLES,
    candidates: dict[str, Any] | None = None,
) -> HeldOut:
    """Cross-fitting over groups: router-train (``first``), calibration (``second``) and,
    with ``out_of_fold``, each model-train fold. Each candidate is fitted on all groups
    but one to score that one, so every pooled item is scored by a router that never saw
    it; the pooled scores are compared with max-softmax (paired bootstrap, Bonferroni over
    the candidates). Without out-of-fold data this is two-fold: each split scored by the
    candidate fitted on the other."""
    candidates = candidate_classifiers() if candidates is None else candidates
    groups = [("router-train", first), ("calibration", second)]
    if out_of_fold is not None:
        groups += out_of_fold.fold_outputs()
    for _, outputs in groups:
        labels = labels_for(outputs, label)
        if labels.all() or not labels.any():
            raise CatalogError(
                f"every item of a {len(labels):,}-item split has the same label ({label}); "
                "a classifier cannot learn from that (more data, or the other --label)"
            )
    features = [outputs.features for _, outputs in groups]
    targets = [labels_for(outputs, label) for _, outputs in groups]
    scores: dict[str, npt.NDArray[np.float32]] = {
        MAX_SOFTMAX_CANDIDATE: np.concatenate([outputs.max_softmax for _, outputs in groups])
    }
    for name, classifier in candidates.items():
        held_out_scores = []
        for index in range(len(groups)):
            rest = [j for j in range(len(groups)) if j != index]
            fitted = clone(classifier).fit(
                np.concatenate([features[j] for j in rest]),
                np.concatenate([targets[j] for j in rest]),
            )
            held_out_scores.append(fitted.predict_proba(features[index])[:, 1])
        scores[name] = np.concatenate(held_out_scores).astype(np.float32)
    confidence = bonferroni(len(candidates), CONFIDENCE)
    edge_correct = np.concatenate([outputs.edge_correct for _, outputs in groups])
    cloud_correct = np.concatenate([outputs.cloud_correct for _, outputs in groups])
    comparisons = compare(
        scores,
        MAX_SOFTMAX_CANDIDATE,
        edge_correct,
        cloud_correct,
        resamples=resamples,
        confidence=confidence,
    )
    shipped = ship_choice(comparisons)
    # The goal's figure (issue 18): the shipped (else best) candidate at a plain 95 %, on
    # all pooled items and on each kind of item, so neither kind hides behind the other.
    best = shipped or min(
        candidates, key=lambda c: float(np.mean([lv.ratio for lv in comparisons[c].levels]))
    )
    sizes = np.cumsum([0, *(len(outputs.labels) for _, outputs in groups)])
    real = np.arange(sizes[2])
    # Only a pool of two kinds of item gets this table: it costs another bootstrap.
    parts: dict[str, npt.NDArray[np.int64]] = {}
    if out_of_fold is not None:
        parts["pooled"] = np.arange(sizes[-1])
        parts["router-train + calibration (served edge model)"] = real
        parts["model-train out-of-fold (fold models)"] = np.arange(sizes[2], sizes[-1])
    plain = {
        part: compare(
            {
                best: scores[best][index],
                MAX_SOFTMAX_CANDIDATE: scores[MAX_SOFTMAX_CANDIDATE][index],
            },
            MAX_SOFTMAX_CANDIDATE,
            edge_correct[index],
            cloud_correct[index],
            resamples=resamples,
        )[best]
        for part, index in parts.items()
    }
    items = f"router-train ({len(first.labels):,}) + calibration ({len(second.labels):,})"
    if out_of_fold is not None:
        items += (
            f" + model-train out-of-fold ({len(out_of_fold.outputs.labels):,}, edge outputs "
            f"from {out_of_fold.folds} fold models, `{out_of_fold.directory}`); "
            f"{len(groups)} groups, each scored by the candidates fitted on the other "
            f"{len(groups) - 1}"
        )
    else:
        items += ", each scored by the candidates fitted on the other"
    return HeldOut(
        comparisons=comparisons,
        shipped=shipped,
        items=items,
        confidence=confidence,
        resamples=resamples,
        plain={part: comparison for part, comparison in plain.items()},
        plain_router=best,
    )


def train(args: argparse.Namespace) -> dict[str, Any]:
    models = pair_models(args.catalog, args.pair, args.store)
    train_out = split_outputs(models, "router_train")
    calibration = split_outputs(models, "calibration")
    labels = labels_for(train_out, args.label)
    if labels.all() or not labels.any():
        raise CatalogError(
            f"pair {args.pair}: every router-train item has the same label ({args.label}); "
            "a classifier cannot learn from that (more data, or the other --label)"
        )

    out_of_fold = out_of_fold_data(models, getattr(args, "folds", DEFAULT_FOLDS))
    # The ship rule on pooled held-out data (router-train, calibration and the
    # out-of-fold model-train items, each scored by candidates fitted on the others),
    # never on test.
    try:
        held_out = held_out_comparison(
            train_out,
            calibration,
            args.label,
            out_of_fold=out_of_fold,
            resamples=getattr(args, "resamples", RESAMPLES),
        )
    except CatalogError as error:
        raise CatalogError(f"pair {args.pair}: {error}") from error
    chosen = held_out.shipped or MAX_SOFTMAX_CANDIDATE
    views = models.pair.views if chosen != MAX_SOFTMAX_CANDIDATE else ()
    # The shipped classifier learns from router-train and the out-of-fold items;
    # calibration stays held out for the threshold.
    fit_on = (
        train_out if out_of_fold is None else concatenate_outputs([train_out, out_of_fold.outputs])
    )
    classifier: Any = None
    if chosen != MAX_SOFTMAX_CANDIDATE:
        classifier = candidate_classifiers()[chosen].fit(
            fit_on.features_for(views), labels_for(fit_on, args.label)
        )
        calibration_scores = classifier.predict_proba(calibration.features_for(views))[:, 1]
        calibration_scores = calibration_scores.astype(np.float32)
    else:
        calibration_scores = calibration.max_softmax
    kind, value = args.target
    if kind == "cloud-share":
        threshold = threshold_for_cloud_share(calibration_scores, value)
    else:
        threshold = threshold_for_edge_error(calibration_scores, calibration.edge_correct, value)
    expected = operating_point(
        calibration_scores,
        threshold,
        calibration.edge_correct,
        calibration.cloud_correct,
        cloud_price_micros=args.cloud_price_micros,
    )

    version = args.version or _next_version(args.policies / args.pair)
    policy_dir = args.policies / args.pair / str(version)
    write_policy(
        policy_dir,
        classifier,
        chosen,
        train_out.features_for(views)[:1],
        pair=args.pair,
        version=version,
        threshold=threshold,
        num_classes=train_out.edge_probabilities.shape[1],
        views=views,
        extra={
            "label": args.label,
            "target": {"kind": kind, "value": value},
            "calibration": {
                "split": f"calibration ({len(calibration.labels):,})",
                "expected": expected.as_dict(),
            },
            "held_out_comparison": held_out.as_dict(),
            "models": models.names,
            "fitted_on": f"router-train ({len(train_out.labels):,})"
            + (
                ""
                if out_of_fold is None
                else f" + model-train out-of-fold ({len(out_of_fold.outputs.labels):,})"
            ),
            "command": f"hybridmesh policy train --pair {args.pair} --target {kind}={value}",
        },
    )
    return evaluate_policy(models, policy_dir, args)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate an existing policy version of the pair on its test split (nothing is
    fitted or tuned): the same policy always gives the same figures."""
    models = pair_models(args.catalog, args.pair, args.store)
    root = args.policies / args.pair
    directory = root / str(args.version) if args.version else latest_policy(root)
    return evaluate_policy(models, directory, args)


def evaluate_policy(
    models: PairModels, policy_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    # The artifact as the router will run it: scores from the exported ONNX, in process.
    deployed = load_policy(policy_dir)
    if deployed.metadata.pair != models.pair.name:
        raise CatalogError(
            f"{policy_dir}: policy is for pair {deployed.metadata.pair!r}, not {models.pair.name!r}"
        )
    metadata = json.loads((policy_dir / POLICY_FILE).read_text())
    views = deployed.metadata.views
    test = split_outputs(models, "test")
    test_scores = deployed.score(test.features_for(views))
    decision_us = _decision_latency_us(deployed, test)
    # The artifact itself against max-softmax, with intervals: on calibration (held out
    # from its fit: train fits on router-train) and on test (the final table).
    calibration = split_outputs(models, "calibration")
    resamples = getattr(args, "resamples", RESAMPLES)
    intervals = {
        name: compare(
            {
                "policy": deployed.score(outputs.features_for(views)),
                MAX_SOFTMAX_CANDIDATE: outputs.max_softmax,
            },
            MAX_SOFTMAX_CANDIDATE,
            outputs.edge_correct,
            outputs.cloud_correct,
            resamples=resamples,
        )["policy"].as_dict()
        for name, outputs in (("calibration", calibration), ("test", test))
    }
    price = args.cloud_price_micros
    at_threshold = operating_point(
        test_scores,
        deployed.threshold,
        test.edge_correct,
        test.cloud_correct,
        cloud_price_micros=price,
    )
    report = evaluation_report(
        test,
        scores=test_scores,
        chosen=at_threshold,
        metadata=metadata,
        decision_us=decision_us,
        price=price,
        intervals=intervals,
        root=policy_dir.parent.parent,
    )
    write_report(report, report_base(args, "evaluation"))
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
    num_classes: int,
    views: tuple[str, ...] = (),
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write a policy version directory: policy.json and, for a learned policy, the
    classifier exported to ONNX (its sha256 in policy.json). ``chosen`` is a candidate
    classifier's name or ``max_softmax`` (kind max-softmax: no classifier file)."""
    directory.mkdir(parents=True, exist_ok=False)
    learned: dict[str, Any] = {}
    if chosen != MAX_SOFTMAX_CANDIDATE:
        onnx_model = to_onnx(
            classifier,
            sample_features,
            options={id(classifier): {"zipmap": False}}
            if chosen == "gradient_boosted_trees"
            else {"zipmap": False},
            target_opset=17,
        )
        onnx_bytes = onnx_model.SerializeToString()
        (directory / CLASSIFIER_FILE).write_bytes(onnx_bytes)
        learned = {"classifier_sha256": hashlib.sha256(onnx_bytes).hexdigest()}
    metadata = {
        "schema": POLICY_SCHEMA,
        "kind": MAX_SOFTMAX if chosen == MAX_SOFTMAX_CANDIDATE else LEARNED,
        "pair": pair,
        "version": str(version),
        "threshold": threshold,
        "feature_names": feature_names(num_classes, views),
        "views": list(views),
        **learned,
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


def _decision_latency_us(policy: ScoringPolicy, test: SplitOutputs) -> dict[str, float]:
    """Median per-item cost of the features (with the policy's views) and the policy's
    score, batch 1, in process. The views' extra edge runs are not included."""
    probabilities, inputs = test.edge_probabilities[:1], test.inputs[:1]
    views = {view: test.view_probabilities[view][:1] for view in policy.metadata.views}
    single = router_features(probabilities, inputs, views)
    for _ in range(200):
        policy.score(single)
    runs = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(500):
            policy.score(single)
        runs.append((time.perf_counter() - started) / 500 * 1e6)
    feature_runs = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(500):
            router_features(probabilities, inputs, views)
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
    intervals: dict[str, Any] | None = None,
    root: Path = DEFAULT_POLICIES,
) -> dict[str, Any]:
    test_curves = curves(scores, test)
    edge_accuracy = float(test.edge_correct.mean())
    cloud_accuracy = float(test.cloud_correct.mean())
    gap = cloud_accuracy - edge_accuracy
    levels = []
    for closed in GAP_LEVELS:
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
        }
        | {
            "kind": metadata.get("kind", LEARNED),
            "views": metadata.get("views", []),
            "root": str(root),
        },
        "test_split": f"test ({len(test.labels):,}), used only here",
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
        "held_out_comparison": metadata.get("held_out_comparison"),
        "intervals": intervals or {},
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
    lines += _interval_lines(report)
    latency = report["decision_latency"]
    root = policy.get("root", str(DEFAULT_POLICIES))
    where = "" if root == str(DEFAULT_POLICIES) else f" --policies {root}"
    lines += [
        "",
        f"Decision latency in process (median of 7 x 500, batch 1): features "
        f"{latency['features_us_median']:.1f} µs + classifier "
        f"{latency['classifier_us_median']:.1f} µs.",
        "",
        f"Regenerate: `hybridmesh policy evaluate --pair {policy['pair']}{where} --version "
        f"{policy['version']}` (this policy, nothing retrained); a new version: `hybridmesh "
        f"policy train --pair {policy['pair']}{where} --target "
        f"{policy['target']['kind']}={policy['target']['value']}`.",
    ]
    return "\n".join(lines)


def _ratio_cell(level: dict[str, float]) -> str:
    return (
        f"{level['share'] * 100:.1f} % vs {level['baseline_share'] * 100:.1f} % = "
        f"{level['ratio']:.2f}x [{level['low']:.2f}, {level['high']:.2f}]"
    )


def _comparison_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One row per router: at each gap level its share vs max-softmax's, the ratio and
    its interval; the verdict of the ship rule."""
    levels = next(iter(rows.values()))["levels"]
    header = " | ".join(f"{level['gap_closed'] * 100:.0f} % of the gap" for level in levels)
    lines = [
        f"| router | {header} | beats max-softmax |",
        "| --- |" + " --- |" * (len(levels) + 1),
    ]
    for name, row in rows.items():
        cells = " | ".join(_ratio_cell(level) for level in row["levels"])
        lines.append(f"| {name} | {cells} | {'yes' if row['beats_baseline'] else 'no'} |")
    return lines


def _interval_lines(report: dict[str, Any]) -> list[str]:
    """The ship rule's evidence and the paired-bootstrap intervals, as markdown."""
    lines: list[str] = []
    held_out = report.get("held_out_comparison")
    policy = report["policy"]
    if held_out:
        first = next(iter(held_out["candidates"].values()))
        lines += [
            "",
            "## Ship rule: candidates against max-softmax on pooled held-out data",
            "",
            f"Data: {held_out['data']} ({first['items']:,} items; the test split is not "
            f"used). Cell: cloud share the router needs vs max-softmax's, their ratio and its "
            f"{held_out['confidence'] * 100:.1f} % paired-bootstrap interval "
            f"({held_out['resamples']:,} resamples, seed {held_out['seed']}; 95 % "
            f"Bonferroni-adjusted over {len(held_out['candidates'])} candidates). Rule: "
            f"{held_out['rule']}.",
            "",
            *_comparison_table(held_out["candidates"]),
            "",
            f"Shipped: **{held_out['shipped']}** (policy kind `{policy['kind']}`"
            + (f", views {policy['views']}" if policy["views"] else "")
            + ").",
        ]
        lines += _goal_lines(held_out.get("plain_95"))
    intervals = report.get("intervals") or {}
    if intervals:
        first = next(iter(intervals.values()))
        lines += [
            "",
            "## This policy against max-softmax, with intervals",
            "",
            f"Cell as above; 95 % paired-bootstrap interval, {first['resamples']:,} resamples. "
            "Calibration is held out from the policy's fit (it picks only the threshold); "
            "test is used for nothing else.",
            "",
            *_comparison_table(
                {
                    f"v{policy['version']} on {split} ({row['items']:,})": row
                    for split, row in intervals.items()
                }
            ),
        ]
    return lines


# Issue 18's goal: at most this ratio at these gap levels, the 95 % interval below 1.0.
GOAL_RATIO, GOAL_LEVELS = 0.8, (0.5, 0.75, 0.9)


def goal_met(row: dict[str, Any]) -> bool:
    """The learned router needs at most ``GOAL_RATIO`` x max-softmax's cloud share at each
    of ``GOAL_LEVELS`` and its 95 % interval's upper bound is below 1.0 there."""
    levels = [level for level in row["levels"] if level["gap_closed"] in GOAL_LEVELS]
    return bool(levels) and all(
        level["ratio"] <= GOAL_RATIO and level["high"] < 1.0 for level in levels
    )


def _goal_lines(plain: dict[str, Any] | None) -> list[str]:
    """The shipped (else best) candidate at a plain 95 % on the pool and on each kind of
    item in it, with the goal's verdict."""
    if not plain or not plain.get("parts"):
        return []
    parts = plain["parts"]
    first = next(iter(parts.values()))
    lines = [
        "",
        f"### `{plain['router']}` at a plain 95 % interval, pooled and by kind of item",
        "",
        f"Same held-out scores, 95 % paired-bootstrap interval ({first['resamples']:,} "
        f"resamples). Goal (issue 18): at most {GOAL_RATIO}x max-softmax's cloud share at "
        + "/".join(f"{level * 100:.0f}" for level in GOAL_LEVELS)
        + " % of the gap with the interval's upper bound below 1.0.",
        "",
        *_comparison_table({f"{part} ({row['items']:,})": row for part, row in parts.items()}),
        "",
    ]
    lines += [
        f"Goal on {part}: **{'met' if goal_met(row) else 'not met'}**."
        for part, row in parts.items()
    ]
    return lines


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
    axis.set_title(f"{report['policy']['pair']}: accuracy against cloud share (test split)")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(base.with_suffix(".png"), dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """``python -m training.train_policy`` (what ``make bench`` runs) is ``hybridmesh policy
    train`` for the pair fashion-mnist unless ``--pair`` says otherwise."""
    from localmesh.cli import main as hybridmesh

    given = sys.argv[1:] if argv is None else argv
    return hybridmesh(["policy", "train", "--pair", "fashion-mnist", *given])


if __name__ == "__main__":
    sys.exit(main())
