"""workload.fashion_mnist: real Debian data, fixed disjoint seeded splits."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from workload.fashion_mnist import DATASET_DIR, SPLIT_SIZES, load_split, split_indices

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
    # The split really is those rows of the training file, labels aligned with images.
    full_images = load_split("model_train").images
    assert not any(np.array_equal(calibration.images[0], image) for image in full_images[:2000])


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_split("validation")


def test_a_truncated_idx_file_is_refused(tmp_path: Path) -> None:
    shutil.copy(DATASET_DIR / "train-labels-idx1-ubyte.gz", tmp_path)
    with gzip.open(DATASET_DIR / "train-images-idx3-ubyte.gz", "rb") as stream:
        data = stream.read()
    assert struct.unpack(">IIII", data[:16]) == (2051, 60_000, 28, 28)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as stream:
        stream.write(data[:-784])  # one image short
    with pytest.raises(ValueError, match="header says"):
        load_split("calibration", tmp_path)
