"""Edge fold sets (out-of-fold router training data): verified on load, each item run
through the fold model that did not train on it, views included."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from services.views import apply_view
from tests.helpers.paths import EDGE_MODEL, REPO, STORE
from workload.fashion_mnist import load_split
from workload.folds import (
    FOLDS_FILE,
    FOLDS_SCHEMA,
    FoldSetError,
    fold_of,
    load_fold_set,
    out_of_fold_outputs,
)

COMMITTED_FOLDS = REPO / "models" / "folds" / EDGE_MODEL / "1"


def fold_set_of_distinct_models(directory: Path, folds: int) -> list[bytes]:
    """``folds`` fold files: the committed edge model with its last bias nudged by k, so
    each fold model's output differs and a mix-up of folds shows."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(STORE / EDGE_MODEL / "1" / "model.onnx")
    bias = next(t for t in reversed(model.graph.initializer) if len(t.dims) == 1)
    original = numpy_helper.to_array(bias).copy()
    files, entries = [], []
    for k in range(folds):
        bias.CopyFrom(numpy_helper.from_array(original + np.float32(k), bias.name))
        data = model.SerializeToString()
        (directory / f"fold-{k}.onnx").write_bytes(data)
        files.append(data)
        entries.append({"file": f"fold-{k}.onnx", "sha256": hashlib.sha256(data).hexdigest()})
    metadata = {
        "schema": FOLDS_SCHEMA,
        "split": "model_train",
        "folds": folds,
        "seed": 3,
        "fold_models": entries,
    }
    (directory / FOLDS_FILE).write_text(json.dumps(metadata))
    return files


def test_each_item_is_answered_by_its_held_out_fold_model(tmp_path: Path) -> None:
    files = fold_set_of_distinct_models(tmp_path, 3)
    fold_set = load_fold_set(tmp_path)
    images = load_split("calibration").images[:90]
    result = out_of_fold_outputs(fold_set, images, "image", "logits", views=("hflip",))
    assert np.array_equal(result.fold, fold_of(90, 3, seed=3))
    for k, data in enumerate(files):
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        mine = np.flatnonzero(result.fold == k)
        (direct,) = session.run(["logits"], {"image": images[mine]})
        (flipped,) = session.run(["logits"], {"image": apply_view("hflip", images[mine])})
        np.testing.assert_allclose(result.outputs[mine], direct, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            result.view_outputs["hflip"][mine], flipped, rtol=1e-5, atol=1e-5
        )


def test_a_tampered_or_missing_fold_model_is_refused(tmp_path: Path) -> None:
    fold_set_of_distinct_models(tmp_path, 2)
    data = bytearray((tmp_path / "fold-1.onnx").read_bytes())
    data[-3] ^= 1
    (tmp_path / "fold-1.onnx").write_bytes(bytes(data))
    with pytest.raises(FoldSetError, match=re.escape("fold-1.onnx")):
        load_fold_set(tmp_path)
    (tmp_path / "fold-1.onnx").unlink()
    with pytest.raises(FoldSetError, match=re.escape("fold-1.onnx")):
        load_fold_set(tmp_path)
    with pytest.raises(FoldSetError, match=re.escape(FOLDS_FILE)):
        load_fold_set(tmp_path / "nothing")


@pytest.mark.skipif(not COMMITTED_FOLDS.exists(), reason="no committed fold set")
def test_the_committed_fold_set_verifies_and_its_card_figures_hold() -> None:
    fold_set = load_fold_set(COMMITTED_FOLDS)
    assert fold_set.folds == 5 and fold_set.split == "model_train"
    data = load_split("model_train")
    fold = fold_of(len(data.labels), fold_set.folds, fold_set.seed)
    entry = fold_set.metadata["fold_models"][0]
    held_out = np.flatnonzero(fold == 0)
    assert entry["held_out_items"] == len(held_out)
    session = ort.InferenceSession(str(fold_set.models[0]), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": data.images[held_out]})
    accuracy = float((np.asarray(logits).argmax(axis=1) == data.labels[held_out]).mean())
    assert accuracy == pytest.approx(entry["out_of_fold_accuracy"], abs=1e-4)
    assert "Training cost" in (COMMITTED_FOLDS / "MODEL_CARD.md").read_text()
