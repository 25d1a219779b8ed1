"""Drifted workloads: the Fashion-MNIST test split under a shifted capture, generated
deterministically (seeded) with OpenCV for tests and benchmarks.

Each drift kind models one way a deployed camera's images move away from the data the
edge model and the router's threshold were fitted on. The default severities
(``DRIFTS``) are chosen to be plainly visible yet label-preserving (a person can still
name the garment):

- ``brightness_contrast`` — new lighting: ``out = saturate(alpha * x + beta)`` with
  ``alpha = 0.6`` (contrast cut by 40 %) and ``beta = +60`` (the black background turns
  grey); ``cv2.convertScaleAbs``.
- ``gaussian_noise`` — sensor noise: additive zero-mean Gaussian noise, ``sigma = 30``
  grey levels, saturated to [0, 255]; fresh noise per image from the seed.
- ``gaussian_blur`` — defocus: ``cv2.GaussianBlur`` with ``sigma = 1.2`` px (kernel size
  derived by OpenCV from sigma).
- ``cutout`` — occlusion: one black ``10 x 10`` px square (``cv2.rectangle``, filled) per
  image, its centre uniform over the 28 x 28 image (clipped at the borders), so part of
  the garment is hidden in most images.

Images are ``uint8 [n, 1, 28, 28]`` as in ``workload.fashion_mnist``; labels are never
changed. The same ``seed`` gives byte-identical output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np
import numpy.typing as npt

from workload.fashion_mnist import Split, load_split

DRIFT_SEED = 20261130
Images = npt.NDArray[np.uint8]


class Drift(Protocol):
    """A label-preserving image shift: ``apply`` maps ``uint8 [n, 1, H, W]`` to the same
    shape and dtype, drawing any randomness from ``rng`` only."""

    @property
    def kind(self) -> str: ...

    @property
    def severity(self) -> str: ...

    def apply(self, images: Images, rng: np.random.Generator) -> Images: ...


@dataclass(frozen=True)
class BrightnessContrast:
    """``saturate(alpha * x + beta)``: ``alpha`` < 1 cuts contrast, ``beta`` > 0 brightens
    (grey levels)."""

    alpha: float = 0.6
    beta: float = 60.0
    kind: str = field(default="brightness_contrast", init=False)

    @property
    def severity(self) -> str:
        return f"alpha={self.alpha:g}, beta={self.beta:+g}"

    def apply(self, images: Images, rng: np.random.Generator) -> Images:
        del rng  # deterministic without randomness
        flat = images.reshape(-1, images.shape[-1])  # pointwise: any 2-D layout will do
        shifted = cv2.convertScaleAbs(flat, alpha=self.alpha, beta=self.beta)
        return np.ascontiguousarray(shifted, dtype=np.uint8).reshape(images.shape)


@dataclass(frozen=True)
class GaussianNoise:
    """Additive zero-mean Gaussian noise of standard deviation ``sigma`` grey levels,
    saturated to [0, 255]."""

    sigma: float = 30.0
    kind: str = field(default="gaussian_noise", init=False)

    @property
    def severity(self) -> str:
        return f"sigma={self.sigma:g}"

    def apply(self, images: Images, rng: np.random.Generator) -> Images:
        noise = rng.normal(0.0, self.sigma, size=images.shape).astype(np.float32)
        # cv2.add saturates on the cast back to uint8 (no wrap-around at 0 or 255).
        noisy = cv2.add(
            images.reshape(-1, images.shape[-1]).astype(np.float32),
            noise.reshape(-1, images.shape[-1]),
            dtype=cv2.CV_8U,
        )
        return np.ascontiguousarray(noisy, dtype=np.uint8).reshape(images.shape)


@dataclass(frozen=True)
class GaussianBlur:
    """Gaussian defocus of standard deviation ``sigma`` px (OpenCV picks the kernel size
    from sigma; borders reflected)."""

    sigma: float = 1.2
    kind: str = field(default="gaussian_blur", init=False)

    @property
    def severity(self) -> str:
        return f"sigma={self.sigma:g} px"

    def apply(self, images: Images, rng: np.random.Generator) -> Images:
        del rng
        out = np.empty_like(images)
        # One image at a time: blurring a stacked batch would bleed across images.
        for index, image in enumerate(images.reshape(-1, *images.shape[-2:])):
            out.reshape(-1, *images.shape[-2:])[index] = cv2.GaussianBlur(
                image, (0, 0), sigmaX=self.sigma
            )
        return out


@dataclass(frozen=True)
class Cutout:
    """One filled black ``size x size`` px square per image, centre uniform over the
    image (clipped at the borders)."""

    size: int = 10
    kind: str = field(default="cutout", init=False)

    @property
    def severity(self) -> str:
        return f"{self.size}x{self.size} px"

    def apply(self, images: Images, rng: np.random.Generator) -> Images:
        height, width = images.shape[-2:]
        planes = images.reshape(-1, height, width)
        out = planes.copy()
        centres_y = rng.integers(0, height, size=len(planes))
        centres_x = rng.integers(0, width, size=len(planes))
        half = self.size // 2
        for index in range(len(planes)):
            top_left = (int(centres_x[index]) - half, int(centres_y[index]) - half)
            bottom_right = (top_left[0] + self.size - 1, top_left[1] + self.size - 1)
            cv2.rectangle(out[index], top_left, bottom_right, color=(0,), thickness=cv2.FILLED)
        return out.reshape(images.shape)


# The documented default severities (see the module docstring), by kind.
DRIFTS: dict[str, Drift] = {
    drift.kind: drift for drift in (BrightnessContrast(), GaussianNoise(), GaussianBlur(), Cutout())
}


def _rng(seed: int, kind: str) -> np.random.Generator:
    # Each kind draws from its own stream, so adding a kind changes no other's output.
    return np.random.default_rng([seed, *kind.encode()])


def drifted(split: Split, drift: Drift, seed: int = DRIFT_SEED) -> Split:
    """``split`` with every image shifted by ``drift``; same order, labels unchanged.
    Images ``uint8 [n, 1, 28, 28]``, labels ``int64 [n]``."""
    images = drift.apply(np.asarray(split.images, dtype=np.uint8), _rng(seed, drift.kind))
    return Split(f"{split.name}+{drift.kind}", images, split.labels.copy())


@dataclass(frozen=True)
class DriftStream:
    """A request stream: ``images uint8 [n, 1, 28, 28]``, ``labels int64 [n]``,
    ``source int64 [n]`` (index into the source split) and ``is_drifted bool [n]``
    (False for the first ``shift_at`` items, True after)."""

    name: str
    images: Images
    labels: npt.NDArray[np.int64]
    source: npt.NDArray[np.int64]
    is_drifted: npt.NDArray[np.bool_]
    shift_at: int


def step_shift(
    drift: Drift | None,
    length: int,
    shift_at: int,
    seed: int = DRIFT_SEED,
    split: Split | None = None,
) -> DriftStream:
    """A stream of ``length`` requests drawn from ``split`` (default: the test split) in a
    seeded order: clean for the first ``shift_at``, shifted by ``drift`` after (``drift``
    None: clean throughout; ``shift_at`` 0: drifted throughout). A stream longer than the
    split repeats it, each pass in a fresh seeded order (drift randomness is fresh too).

    Raises ValueError when ``length`` < 1 or ``shift_at`` is outside ``[0, length]``."""
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    if not 0 <= shift_at <= length:
        raise ValueError(f"shift_at must be within [0, length={length}], got {shift_at}")
    source_split = split if split is not None else load_split("test")
    order_rng = np.random.default_rng(seed)
    passes = -(-length // len(source_split.labels))
    source = np.concatenate(
        [order_rng.permutation(len(source_split.labels)) for _ in range(passes)]
    )[:length].astype(np.int64)
    images = np.array(source_split.images[source], dtype=np.uint8)
    if drift is not None and shift_at < length:
        tail = images[shift_at:]
        images[shift_at:] = drift.apply(tail, _rng(seed, drift.kind))
    is_drifted = np.arange(length) >= shift_at if drift is not None else np.zeros(length, bool)
    name = f"{source_split.name}+step({drift.kind if drift else 'none'}@{shift_at})"
    return DriftStream(
        name=name,
        images=images,
        labels=source_split.labels[source].copy(),
        source=source,
        is_drifted=is_drifted,
        shift_at=shift_at,
    )
