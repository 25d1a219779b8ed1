"""workload.fashion_mnist: real Debian data, fixed disjoint seeded splits."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from workload.fashion_mnist import SPLIT_SIZES, load_split, split_indices

EDGE_MODEL = Path(__file__).resolve().parent.parent / "models/store/fashion-edge/1/model.onnx"
# The splits the committed models and router policies were built on. If these change
# (seed, sizes, numpy's generator), every calibration downstream is silently invalid.
SPLIT_DIGESTS = {
    "model_train": "d6d71f88e630e349be1a9338ee10856f64c39977034ebb33985d2b09934ad914",
    "router_train": "3517a1175a2f8177e2abf041bafd8200fd17a3ad6eb41ee0f39a413fc633c256",
    "calibration": "a1ae206f66149ccdea954bb29d9c8e3332bf13f6a96e3739bb47cc87e96d8be9",
}


def test_splits_are_disjoint_sized_and_cover_the_training_file() -> None:
    indices = split_indices()
    assert SPLIT_SIZES == {"model_train": 48_000, "router_train": 6_000, "calibration": 6_000}
    assert {name: len(ix) for name, ix in indices.items()} == SPLIT_SIZES
    together = np.concatenate(list(indices.values()))
    assert len(np.unique(together)) == 60_000


def test_splits_are_fixed_by_the_seed() -> None:
    first, again = split_indices(), split_indices()
    for name in SPLIT_SIZES:
        assert np.array_equal(first[name], again[name])
        assert hashlib.sha256(first[name].tobytes()).hexdigest() == SPLIT_DIGESTS[name]
    other = split_indices(seed=1)
    assert not np.array_equal(first["calibration"], other["calibration"])


def test_split_contents_are_real_labelled_images() -> None:
    test = load_split("test")
    assert test.images.shape == (10_000, 1, 28, 28) and test.images.dtype == np.uint8
    assert test.labels.shape == (10_000,) and test.labels.dtype == np.int64
    assert np.bincount(test.labels).tolist() == [1000] * 10  # t10k is balanced
    calibration = load_split("calibration")
    assert calibration.images.shape == (6_000, 1, 28, 28)
    assert calibration.labels.dtype == np.int64
    assert set(np.unique(calibration.labels)) == set(range(10))
    assert calibration.images.max() == 255 and calibration.images.mean() > 50
    # Images and labels stay aligned through the split: the committed edge model, which
    # never saw the calibration split, gets most of them right (misaligned: ~10 %).
    session = ort.InferenceSession(str(EDGE_MODEL))
    (logits,) = session.run(["logits"], {"image": calibration.images})
    assert (np.asarray(logits).argmax(axis=1) == calibration.labels).mean() > 0.85


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_split("validation")


def test_a_truncated_or_foreign_idx_file_is_refused(tmp_path: Path) -> None:
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    header = struct.pack(">IIII", 2051, 10, 28, 28)
    images.write_bytes(gzip.compress(header + bytes(9 * 784)))  # one image short
    with pytest.raises(ValueError, match="header says"):
        load_split("test", tmp_path)
    images.write_bytes(gzip.compress(struct.pack(">IIII", 2049, 10, 28, 28)))
    with pytest.raises(ValueError, match="IDX magic 2049, expected 2051"):
        load_split("test", tmp_path)  # a failed read is not cached
