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
    size = next(f.size_bytes for f in manifest.files if f.path == manifest.model_file)
    assert f"{size:,} bytes" in card
    assert manifest.provenance["command"] in card


@pytest.mark.parametrize("version_dir", VERSIONS, ids=[d.parent.name for d in VERSIONS])
def test_committed_model_takes_uint8_and_any_batch(version_dir: Path) -> None:
    """The wire contract lives in the graph: uint8 pixels in, scaling inside, FP32 logits."""
    manifest = load_verified(version_dir)
    session = ort.InferenceSession(str(version_dir / manifest.model_file))
    (image,), (logits,) = session.get_inputs(), session.get_outputs()
    assert (image.name, image.type) == ("image", "tensor(uint8)")
    assert (logits.name, logits.type) == ("logits", "tensor(float)")
    assert isinstance(image.shape[0], str) and image.shape[1:] == [1, 28, 28]
    test = load_split("test")
    for batch in (1, 7, 64):
        (out,) = session.run(["logits"], {"image": test.images[:batch]})
        assert out.shape == (batch, 10) and out.dtype == np.float32
    # Same pixels as float would be a different (wrong) wire type: the graph refuses it.
    with pytest.raises(Exception, match="tensor\\(float\\)"):
        session.run(["logits"], {"image": test.images[:1].astype(np.float32)})
