"""Each committed model reaches its card's test accuracy (to 0.1 pp) with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from workload.fashion_mnist import load_split
from workload.model_store import latest_versions, load_verified

STORE = Path(__file__).resolve().parent.parent / "models" / "store"
VERSIONS = latest_versions(STORE)


@pytest.mark.parametrize("version_dir", VERSIONS, ids=[d.parent.name for d in VERSIONS])
def test_committed_model_matches_its_card(version_dir: Path) -> None:
    manifest = load_verified(version_dir)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(version_dir / manifest.model_file), options)
    test = load_split("test")
    predictions = []
    for start in range(0, len(test.labels), 1000):
        (logits,) = session.run(["logits"], {"image": test.images[start : start + 1000]})
        predictions.append(np.asarray(logits).argmax(axis=1))
    accuracy = float((np.concatenate(predictions) == test.labels).mean())
    assert abs(accuracy - manifest.metrics["test_accuracy"]) <= 0.001
    card = (version_dir / "MODEL_CARD.md").read_text()
    assert f"{manifest.metrics['test_accuracy'] * 100:.2f} %" in card
    assert manifest.model_sha256 in card
