"""workload.fashion_mnist: real Debian data, fixed disjoint seeded splits."""

from __future__ import annotations

import numpy as np

from workload.fashion_mnist import SPLIT_SIZES, load_split, split_indices


def test_splits_are_disjoint_sized_and_cover_the_training_file() -> None:
    indices = split_indices()
    assert {name: len(ix) for name, ix in indices.items()} == SPLIT_SIZES
    together = np.concatenate(list(indices.values()))
    assert len(np.unique(together)) == 60_000


def test_splits_are_fixed_by_the_seed() -> None:
    first, again = split_indices(), split_indices()
    for name in SPLIT_SIZES:
        assert np.array_equal(first[name], again[name])
    other = split_indices(seed=1)
    assert not np.array_equal(first["calibration"], other["calibration"])


def test_split_contents_are_real_labelled_images() -> None:
    test = load_split("test")
    assert test.images.shape == (10_000, 1, 28, 28) and test.images.dtype == np.uint8
    assert test.labels.shape == (10_000,)
    assert np.bincount(test.labels).tolist() == [1000] * 10  # t10k is balanced
    calibration = load_split("calibration")
    assert calibration.images.shape == (6_000, 1, 28, 28)
    assert set(np.unique(calibration.labels)) == set(range(10))
    assert calibration.images.max() == 255 and calibration.images.mean() > 50
