"""workload.drift: seeded, label-preserving drifted streams from the real test split."""

from __future__ import annotations

import numpy as np
import pytest

from workload.drift import (
    DRIFTS,
    BrightnessContrast,
    Cutout,
    GaussianBlur,
    GaussianNoise,
    drifted,
    step_shift,
)
from workload.fashion_mnist import Split, load_split


@pytest.fixture(scope="module")
def sample() -> Split:
    test = load_split("test")
    return Split("test", test.images[:500], test.labels[:500])


def test_there_are_at_least_four_kinds_each_with_a_stated_severity() -> None:
    assert set(DRIFTS) >= {"brightness_contrast", "gaussian_noise", "gaussian_blur", "cutout"}
    for kind, drift in DRIFTS.items():
        assert drift.kind == kind
        assert drift.severity


@pytest.mark.parametrize("kind", sorted(DRIFTS))
def test_each_kind_is_deterministic_shape_and_dtype_preserving_and_keeps_labels(
    sample: Split, kind: str
) -> None:
    first = drifted(sample, DRIFTS[kind], seed=7)
    again = drifted(sample, DRIFTS[kind], seed=7)
    assert first.images.dtype == np.uint8
    assert first.images.shape == sample.images.shape == (500, 1, 28, 28)
    assert np.array_equal(first.images, again.images)
    assert np.array_equal(first.labels, sample.labels)
    # A real shift: a good share of pixels moved, and the source is untouched.
    assert (first.images != sample.images).mean() > 0.03
    assert np.array_equal(sample.images, load_split("test").images[:500])


@pytest.mark.parametrize("kind", ["gaussian_noise", "cutout"])
def test_random_kinds_depend_on_the_seed(sample: Split, kind: str) -> None:
    one = drifted(sample, DRIFTS[kind], seed=1)
    two = drifted(sample, DRIFTS[kind], seed=2)
    assert not np.array_equal(one.images, two.images)


def test_each_kind_does_what_its_name_says(sample: Split) -> None:
    images = sample.images.astype(np.float64)
    background = sample.images == 0
    shifted = drifted(sample, BrightnessContrast(alpha=0.5, beta=50)).images
    assert np.all(shifted[background] == 50)
    assert shifted.std() < images.std()

    noisy = drifted(sample, GaussianNoise(sigma=20)).images.astype(np.float64)
    inside = (sample.images > 40) & (sample.images < 215)  # away from saturation
    assert abs((noisy - images)[inside].std() - 20) < 1.5
    assert abs((noisy - images)[inside].mean()) < 1.0

    blurred = drifted(sample, GaussianBlur(sigma=1.5)).images.astype(np.float64)
    # Blur smooths: the mean absolute horizontal gradient drops a lot.
    assert np.abs(np.diff(blurred, axis=-1)).mean() < 0.7 * np.abs(np.diff(images, axis=-1)).mean()

    occluded = drifted(sample, Cutout(size=8)).images
    zeroed = (occluded == 0) & (sample.images != 0)
    assert zeroed.reshape(500, -1).any(axis=1).mean() > 0.5  # most images lose some ink
    assert np.all(zeroed.reshape(500, -1).sum(axis=1) <= 64)  # never more than the square
    assert np.all((occluded == sample.images) | (occluded == 0))


def test_step_shift_is_clean_then_drifted_and_deterministic() -> None:
    stream = step_shift(DRIFTS["gaussian_blur"], length=12_000, shift_at=3_000, seed=5)
    again = step_shift(DRIFTS["gaussian_blur"], length=12_000, shift_at=3_000, seed=5)
    test = load_split("test")
    assert stream.images.shape == (12_000, 1, 28, 28) and stream.images.dtype == np.uint8
    assert np.array_equal(stream.images, again.images)
    assert np.array_equal(stream.labels, test.labels[stream.source])
    assert stream.is_drifted.tolist() == [False] * 3_000 + [True] * 9_000
    assert np.array_equal(stream.images[:3_000], test.images[stream.source[:3_000]])
    changed = (stream.images[3_000:] != test.images[stream.source[3_000:]]).reshape(9_000, -1)
    assert changed.any(axis=1).mean() > 0.99
    # Longer than the split: every item is used once per pass before any repeats.
    assert len(np.unique(stream.source[:10_000])) == 10_000


def test_step_shift_rejects_a_shift_outside_the_stream() -> None:
    with pytest.raises(ValueError, match="shift_at"):
        step_shift(DRIFTS["cutout"], length=100, shift_at=101)
    with pytest.raises(ValueError, match="length"):
        step_shift(DRIFTS["cutout"], length=0, shift_at=0)
