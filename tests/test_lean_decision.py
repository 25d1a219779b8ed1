"""The lean decision (issue 21): the learned policy's logistic regression scored in numpy
from its own ONNX graph gives the ONNX session's scores and the same decisions, on real
data; any other graph stays with the session. Pure, no sockets."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from router_service.app import pairs_from_catalog
from router_service.escalation import (
    CLASSIFIER_FILE,
    LINEAR_SCORE_TOLERANCE,
    POLICY_FILE,
    EscalationClassifier,
    latest_policy,
)
from router_service.features import router_features
from router_service.linear_score import LinearLogisticScore
from router_service.routing import edge_probabilities
from services.classification import softmax
from services.tensors import encode_tensor
from services.views import apply_view
from training.train_policy import SplitOutputs, pair_models, run_model, split_outputs

REPO = Path(__file__).resolve().parent.parent
POLICY_ROOT = REPO / "models" / "policies" / "fashion-mnist"


@pytest.fixture(scope="module")
def test_split() -> SplitOutputs:
    """The real test split (10,000 Fashion-MNIST images) through the real edge model."""
    models = pair_models(REPO / "models/catalog.toml", "fashion-mnist", REPO / "models/store")
    return split_outputs(models, "test")


def test_committed_policy_is_scored_in_numpy() -> None:
    classifier = EscalationClassifier(latest_policy(POLICY_ROOT))
    assert classifier.linear is not None


def test_numpy_scores_and_decisions_equal_the_sessions_on_real_data(
    test_split: SplitOutputs,
) -> None:
    classifier = EscalationClassifier(latest_policy(POLICY_ROOT))
    assert classifier.linear is not None
    features = test_split.features_for(classifier.metadata.views)
    reference = classifier._session_score(features)
    lean = classifier.score(features)
    np.testing.assert_allclose(lean, reference, rtol=0, atol=LINEAR_SCORE_TOLERANCE)
    threshold = classifier.threshold
    np.testing.assert_array_equal(lean >= threshold, reference >= threshold)
    # Both sides of the threshold are exercised (the policy escalates about 20 %).
    assert 0.1 < float((reference >= threshold).mean()) < 0.3
    # One item at a time, the router's usual request: features and score as it serves.
    probabilities, inputs = test_split.edge_probabilities, test_split.inputs
    for index in range(0, len(inputs), 10):
        views = {
            view: test_split.view_probabilities[view][index : index + 1]
            for view in classifier.metadata.views
        }
        one = classifier.score(
            router_features(probabilities[index : index + 1], inputs[index : index + 1], views)
        )
        assert one.shape == (1,) and one.dtype == np.float32
        assert abs(float(one[0]) - float(reference[index])) <= LINEAR_SCORE_TOLERANCE
        assert (one[0] >= threshold) == (reference[index] >= threshold)


def test_the_lean_decision_equals_the_previous_one_on_real_data(
    test_split: SplitOutputs,
) -> None:
    """Item by item as the router serves it (edge logits tensor -> one-row softmax ->
    one-item features -> numpy score) against the previous path (numpy softmax,
    vectorised features, the ONNX session), on the whole test split: the same decision
    for every item, scores within float32 rounding."""
    models = pair_models(REPO / "models/catalog.toml", "fashion-mnist", REPO / "models/store")
    (pair,) = (
        p for p in pairs_from_catalog(REPO / "models/catalog.toml") if p.name == "fashion-mnist"
    )
    classifier = EscalationClassifier(latest_policy(POLICY_ROOT))
    logits = run_model(models.edge, models.pair, test_split.inputs)
    # The served policy's views (v2: hflip), each the edge model on the view's input.
    view_logits = {
        view: run_model(models.edge, models.pair, apply_view(view, test_split.inputs))
        for view in classifier.metadata.views
    }
    previous_features = router_features(
        softmax(logits),
        test_split.inputs,
        {view: softmax(value) for view, value in view_logits.items()},
    )
    previous = classifier._session_score(previous_features)
    threshold = classifier.threshold
    lean = np.empty_like(previous)
    top1 = np.empty_like(previous)
    for index in range(len(logits)):
        output = encode_tensor(models.pair.output.name, logits[index : index + 1])
        views = {
            view: edge_probabilities(
                pair, encode_tensor(models.pair.output.name, value[index : index + 1])
            )
            for view, value in view_logits.items()
        }
        features = router_features(
            edge_probabilities(pair, output), test_split.inputs[index : index + 1], views
        )
        lean[index] = classifier.score(features)[0]
        top1[index] = features[0, 0]
    np.testing.assert_array_equal(lean >= threshold, previous >= threshold)
    np.testing.assert_allclose(lean, previous, rtol=0, atol=2 * LINEAR_SCORE_TOLERANCE)
    np.testing.assert_allclose(top1, previous_features[:, 0], rtol=0, atol=1e-6)


def _policy_with_graph(tmp_path: Path, change: str) -> Path:
    """A copy of the committed policy whose classifier graph is changed (its sha256 in
    policy.json follows, so the artifact itself is valid)."""
    copy = tmp_path / "fashion-mnist" / "1"
    shutil.copytree(latest_policy(POLICY_ROOT), copy)
    model = onnx.load(copy / CLASSIFIER_FILE)
    linear = model.graph.node[1]
    kept = [a for a in linear.attribute if a.name != "post_transform"]
    del linear.attribute[:]
    linear.attribute.extend(kept)
    linear.attribute.append(helper.make_attribute("post_transform", change))
    data = model.SerializeToString()
    (copy / CLASSIFIER_FILE).write_bytes(data)
    metadata = json.loads((copy / POLICY_FILE).read_text())
    metadata["classifier_sha256"] = hashlib.sha256(data).hexdigest()
    (copy / POLICY_FILE).write_text(json.dumps(metadata))
    return copy


def test_another_graph_is_scored_by_the_session(tmp_path: Path, test_split: SplitOutputs) -> None:
    """A graph the numpy path does not reproduce (no logistic post transform: raw
    margins) is left to onnxruntime, and its scores are the session's own."""
    directory = _policy_with_graph(tmp_path, "NONE")
    assert LinearLogisticScore.from_onnx((directory / CLASSIFIER_FILE).read_bytes()) is None
    classifier = EscalationClassifier(directory)
    assert classifier.linear is None
    features = test_split.features_for(classifier.metadata.views)[:200]
    np.testing.assert_array_equal(classifier.score(features), classifier._session_score(features))
    # ... and those are not probabilities: the numpy sigmoid would have been wrong.
    assert float(np.abs(classifier.score(features)).max()) > 1.0


def test_sigmoid_keeps_extreme_logits_finite() -> None:
    score = LinearLogisticScore(
        np.zeros(2, np.float32), np.ones(2, np.float32), np.ones(2, np.float32), 0.0
    )
    extreme = np.array([[1e6, 1e6]], dtype=np.float32)
    assert score(extreme).tolist() == [1.0]
    assert score(-extreme).tolist() == [0.0]
    both = score(np.concatenate([extreme, -extreme]))
    assert both.tolist() == [1.0, 0.0]
