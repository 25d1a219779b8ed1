"""Fashion-MNIST from Debian's dataset-fashion-mnist, with fixed, disjoint, seeded splits.

The 60,000-image training file is carved into model-train / router-train / calibration by
one seeded permutation; the 10,000-image t10k file is the test split, never used to fit
or tune anything.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLIT_SEED = 20260611
SPLIT_SIZES = {"model_train": 48_000, "router_train": 6_000, "calibration": 6_000}
SPLITS = (*SPLIT_SIZES, "test")
LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


@dataclass(frozen=True)
class Split:
    """uint8 images [n, 1, 28, 28] and int64 labels [n]."""

    name: str
    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]


def _read_idx(path: Path, magic: int) -> npt.NDArray[np.uint8]:
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    found, count = struct.unpack(">II", data[:8])
    if found != magic:
        raise ValueError(f"{path}: IDX magic {found}, expected {magic}")
    shape: tuple[int, ...] = (count,)
    header = 8  # magic, count
    if magic == IMAGES_MAGIC:
        rows, cols = struct.unpack(">II", data[8:16])
        shape, header = (count, 1, rows, cols), 16
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: {len(data) - header} bytes of data, header says {shape}")
    # Read-only views of the cached file: callers that mutate must copy.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


@cache
def _files(kind: str, directory: Path) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    images = _read_idx(directory / f"{kind}-images-idx3-ubyte.gz", IMAGES_MAGIC)
    labels = _read_idx(directory / f"{kind}-labels-idx1-ubyte.gz", LABELS_MAGIC)
    return images, labels.astype(np.int64)


def split_indices(total: int = 60_000, seed: int = SPLIT_SEED) -> dict[str, npt.NDArray[np.int64]]:
    """Disjoint index sets into the training file, fixed by ``seed``."""
    order = np.random.default_rng(seed).permutation(total)
    indices: dict[str, npt.NDArray[np.int64]] = {}
    start = 0
    for name, size in SPLIT_SIZES.items():
        indices[name] = np.sort(order[start : start + size]).astype(np.int64)
        start += size
    return indices


def load_split(name: str, directory: Path = DATASET_DIR) -> Split:
    """One split by name: model_train, router_train, calibration or test."""
    if name == "test":
        images, labels = _files("t10k", directory)
        return Split(name, images, labels)
    if name not in SPLIT_SIZES:
        raise ValueError(f"unknown split {name!r}; splits are {SPLITS}")
    images, labels = _files("train", directory)
    chosen = split_indices(len(labels))[name]
    return Split(name, images[chosen], labels[chosen])


GOLDEN_SIZE = 1000


def golden_split(size: int = GOLDEN_SIZE) -> Split:
    """The edge canary's labelled images: the first ``size`` of the calibration split
    (never used to train the edge model, never the test split)."""
    calibration = load_split("calibration")
    return Split("golden", calibration.images[:size], calibration.labels[:size])
