"""Features, calibration and the policy artifact (pure, no sockets)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from router_service.escalation import (
    CLASSIFIER_FILE,
    POLICY_FILE,
    EscalationClassifier,
    PolicyArtifactError,
    latest_policy,
)
from router_service.features import SUMMARY_FEATURES, feature_names, router_features
from training.calibration import (
    accuracy_curve,
    operating_point,
    random_curve,
    share_needed,
    threshold_for_cloud_share,
    threshold_for_edge_error,
)

POLICY_ROOT = Path(__file__).resolve().parent.parent / "models" / "policies" / "fashion-mnist"


def test_features_from_a_known_distribution() -> None:
    probabilities = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]], dtype=np.float32)
    images = np.zeros((2, 1, 2, 2), dtype=np.uint8)
    images[0] = 255
    features = router_features(probabilities, images)
    assert features.shape == (2, len(SUMMARY_FEATURES) + 3)
    assert feature_names(3)[: len(SUMMARY_FEATURES)] == list(SUMMARY_FEATURES)
    top1, margin, entropy, mean, std, ink = features[0, :6]
    assert top1 == pytest.approx(0.7) and margin == pytest.approx(0.5)
    assert entropy == pytest.approx(
        -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)), rel=1e-5
    )
    assert (mean, std, ink) == (pytest.approx(1.0), pytest.approx(0.0), pytest.approx(1.0))
    assert features[1, 2] == pytest.approx(np.log(3), rel=1e-5)  # maximal entropy
    np.testing.assert_allclose(features[:, 6:], probabilities)
    with pytest.raises(ValueError, match="disagree"):
        router_features(probabilities, images[:1])


def test_one_items_features_equal_the_batched_ones_on_real_data() -> None:
    """The single-item fast path (the router's request) and the vectorised path
    (training, batches) agree within float32 rounding, on real images and real edge
    outputs, for integer and float inputs."""
    import onnxruntime as ort

    from services.classification import softmax
    from workload.fashion_mnist import load_split

    images = load_split("test").images[:300]
    session = ort.InferenceSession(
        str(Path(__file__).resolve().parent.parent / "models/store/fashion-edge/1/model.onnx")
    )
    (logits,) = session.run(["logits"], {"image": images})
    probabilities = softmax(np.asarray(logits))
    for inputs in (images, images.astype(np.float32) / 255.0):
        batched = router_features(probabilities, inputs)
        for index in range(len(images)):
            one = router_features(probabilities[index : index + 1], inputs[index : index + 1])
            np.testing.assert_allclose(one[0], batched[index], rtol=0, atol=2e-6)


def test_cloud_share_threshold_never_exceeds_the_target() -> None:
    scores = np.random.default_rng(0).random(1000).astype(np.float32)
    for share in (0.0, 0.05, 0.2, 0.5, 1.0):
        threshold = threshold_for_cloud_share(scores, share)
        assert (scores >= threshold).mean() <= share + 1e-12
        assert (scores >= threshold).mean() >= share - 0.002
    tied = np.array([0.5] * 10)
    assert (tied >= threshold_for_cloud_share(tied, 0.3)).mean() == 0.0  # ties stay together


def test_edge_error_threshold_meets_the_target_with_fewest_escalations() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    edge_correct = np.array([True, True, True, False, True, False, False, False])
    threshold = threshold_for_edge_error(scores, edge_correct, max_error=0.25)
    kept = scores < threshold
    assert (~edge_correct[kept]).mean() <= 0.25
    assert kept.sum() == 5  # keeping a sixth item would push the error to 2/6


def test_curves_and_operating_points() -> None:
    edge = np.array([True, False, False, True])
    cloud = np.array([True, True, False, True])
    shares = np.array([0.0, 0.25, 0.5, 1.0])
    perfect = np.array([0.0, 1.0, 0.5, 0.0])  # item 1 is the one the cloud fixes
    curve = accuracy_curve(perfect, edge, cloud, shares)
    np.testing.assert_allclose(curve, [0.5, 0.75, 0.75, 0.75])
    np.testing.assert_allclose(random_curve(edge, cloud, shares), [0.5, 0.5625, 0.625, 0.75])
    assert share_needed(curve, shares, 0.75) == 0.25
    assert share_needed(curve, shares, 0.9) is None
    point = operating_point(perfect, 1.0, edge, cloud, cloud_price_micros=1500)
    assert (point.cloud_share, point.accuracy, point.cost_per_1000_micros) == (0.25, 0.75, 375_000)


def test_committed_policy_loads_and_scores_in_range() -> None:
    classifier = EscalationClassifier(latest_policy(POLICY_ROOT))
    metadata = json.loads((latest_policy(POLICY_ROOT) / POLICY_FILE).read_text())
    assert classifier.version == metadata["version"]
    assert metadata["target"] == {"kind": "cloud-share", "value": 0.2}
    assert metadata["calibration"]["expected"]["cloud_share"] <= 0.2
    features = (
        np.random.default_rng(1).random((5, len(metadata["feature_names"]))).astype(np.float32)
    )
    scores = classifier.score(features)
    assert scores.shape == (5,) and ((scores >= 0) & (scores <= 1)).all()


def test_tampered_or_missing_policy_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "fashion-mnist" / "1"
    shutil.copytree(latest_policy(POLICY_ROOT), copy)
    data = bytearray((copy / CLASSIFIER_FILE).read_bytes())
    data[-5] ^= 1
    (copy / CLASSIFIER_FILE).write_bytes(bytes(data))
    with pytest.raises(PolicyArtifactError, match="sha256"):
        EscalationClassifier(copy)
    (copy / POLICY_FILE).write_text("{}")
    with pytest.raises(PolicyArtifactError, match="schema"):
        EscalationClassifier(copy)
    shutil.copytree(copy, tmp_path / "fashion-mnist" / "12")
    assert latest_policy(tmp_path / "fashion-mnist").name == "12"
    with pytest.raises(PolicyArtifactError, match="no policy"):
        latest_policy(tmp_path / "nothing")
