"""A second model pair, built by configuration only: scikit-learn's digits, a logistic
regression at the edge and an MLP in the cloud (trained in seconds, exported with
skl2onnx: input FP32 [n, 64] named ``pixels``, output FP32 [n, 10] ``probabilities``),
written into a model store, with a catalog entry and a labelled ``.npz`` of the items
neither model was trained on (the pair's router-train / calibration / test data)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from workload.model_store import ModelManifest, TensorEntry, write_version

PAIR = "digits"
EDGE, CLOUD = "digits-edge", "digits-cloud"
# The catalog entry: everything the mesh, the router and training need to know.
CATALOG_ENTRY = """
[pairs.digits]
edge_model = "digits-edge"
cloud_model = "digits-cloud"
input = { name = "pixels", datatype = "FP32", shape = [-1, 64] }
output = { name = "probabilities", datatype = "FP32", shape = [-1, 10] }
output_kind = "probabilities"
data = { npz = "digits.npz", seed = 5, router_train = 0.4, calibration = 0.3 }
"""


@dataclass(frozen=True)
class DigitsPair:
    store: Path
    catalog: Path
    held_out: npt.NDArray[np.float32]  # items neither model was trained on
    held_out_labels: npt.NDArray[np.int64]
    models: dict[str, Any]


def manifest(name: str, accuracy: float, version: int = 1) -> ModelManifest:
    return ModelManifest(
        name=name,
        version=version,
        task="classification",
        model_file="model.onnx",
        files=(),
        inputs=(TensorEntry("pixels", "FP32", (-1, 64)),),
        outputs=(TensorEntry("probabilities", "FP32", (-1, 10)),),
        labels=tuple(str(digit) for digit in range(10)),
        output_kind="probabilities",
        max_batch_size=32,
        preprocessing="8x8 pixel intensities 0..16 as float32",
        metrics={"test_accuracy": accuracy},
    )


def build_digits_pair(base: Path, store: Path | None = None, catalog_head: str = "") -> DigitsPair:
    """Train and store both models under ``store`` (default ``base/store``), write
    ``base/digits.npz`` and ``base/catalog.toml`` (``catalog_head`` first: other pairs)."""
    store = store or base / "store"
    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.data.astype(np.float32), digits.target, test_size=0.33, random_state=3
    )
    models: dict[str, Any] = {
        EDGE: LogisticRegression(max_iter=300).fit(train_x, train_y),
        CLOUD: MLPClassifier((128,), max_iter=300, random_state=3).fit(train_x, train_y),
    }
    for name, model in models.items():
        onnx_model = to_onnx(model, train_x[:1], options={id(model): {"zipmap": False}})
        onnx_model.graph.input[0].name = "pixels"
        for node in onnx_model.graph.node:
            node.input[:] = ["pixels" if i == "X" else i for i in node.input]
        accuracy = float(model.score(test_x, test_y))
        write_version(
            store, manifest(name, accuracy), {"model.onnx": onnx_model.SerializeToString()}
        )
    labels = test_y.astype(np.int64)
    np.savez(base / "digits.npz", inputs=test_x, labels=labels)
    (base / "catalog.toml").write_text(catalog_head + CATALOG_ENTRY)
    return DigitsPair(store, base / "catalog.toml", test_x, labels, models)
