"""Canary of a candidate model version on the edge's golden set, before it serves.

The golden set is a small labelled sample kept at the edge (``golden.npz``: uint8 images
[n, 1, 28, 28] and int64 labels [n] for the Fashion-MNIST pair). A candidate passes when
its accuracy is not more than ``max_accuracy_drop`` below the current version's and its
answers agree with the current version's on at least ``min_agreement`` of the images: a
better model may disagree a little, a broken one disagrees a lot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from workload.fashion_mnist import Split

GOLDEN_FILE = "golden.npz"


@dataclass(frozen=True)
class GoldenSet:
    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]

    @classmethod
    def of(cls, split: Split) -> GoldenSet:
        return cls(split.images, split.labels.astype(np.int64))

    @classmethod
    def load(cls, path: Path) -> GoldenSet:
        with np.load(path) as data:
            images, labels = data["images"], data["labels"]
        if images.dtype != np.uint8 or len(images) != len(labels) or not len(labels):
            raise ValueError(f"{path}: expected uint8 images and as many int64 labels")
        return cls(images, labels.astype(np.int64))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, images=self.images, labels=self.labels)


@dataclass(frozen=True)
class CanaryMargins:
    max_accuracy_drop: float = 0.005
    min_agreement: float = 0.90


@dataclass(frozen=True)
class CanaryVerdict:
    passed: bool
    current_accuracy: float
    candidate_accuracy: float
    agreement: float
    reason: str


def judge(
    current: npt.NDArray[np.int64],
    candidate: npt.NDArray[np.int64],
    labels: npt.NDArray[np.int64],
    margins: CanaryMargins,
) -> CanaryVerdict:
    """Compare the two versions' predicted classes on the golden set."""
    current_accuracy = float(np.mean(current == labels))
    candidate_accuracy = float(np.mean(candidate == labels))
    agreement = float(np.mean(current == candidate))
    figures = (
        f"accuracy {candidate_accuracy:.2%} vs {current_accuracy:.2%} now, "
        f"agreement {agreement:.2%}"
    )
    if candidate_accuracy < current_accuracy - margins.max_accuracy_drop:
        return CanaryVerdict(
            False,
            current_accuracy,
            candidate_accuracy,
            agreement,
            f"accuracy regressed beyond {margins.max_accuracy_drop:.1%}: {figures}",
        )
    if agreement < margins.min_agreement:
        return CanaryVerdict(
            False,
            current_accuracy,
            candidate_accuracy,
            agreement,
            f"agreement below {margins.min_agreement:.0%}: {figures}",
        )
    return CanaryVerdict(True, current_accuracy, candidate_accuracy, agreement, figures)
