"""A pair's labelled data, as its catalog entry declares it: router-train, calibration
and test splits of inputs in the pair's own dtype and shape, with integer labels.

Built-in loaders (``data = { loader = "fashion-mnist" }``) keep their own fixed splits.
An ``.npz`` file (``data = { npz = "file.npz" }``) holds ``inputs`` and ``labels``; one
permutation seeded with the declared seed cuts it into disjoint splits, so the same file
and seed always give the same splits. The test split is for reports only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

from services.tensors import DATATYPE_BY_KSERVE_NAME, DATATYPE_TO_NUMPY
from workload import fashion_mnist
from workload.catalog import CatalogError, DataSource, ModelPair

POLICY_SPLITS = ("router_train", "calibration", "test")
# The edge model's own training split: only built-in loaders have it (out-of-fold data,
# ``workload.folds``).
MODEL_TRAIN_SPLIT = "model_train"


@dataclass(frozen=True)
class PairSplit:
    """Inputs [n, ...] in the pair's dtype and int64 labels [n]."""

    name: str
    inputs: npt.NDArray[np.generic]
    labels: npt.NDArray[np.int64]


def _fashion_mnist(split: str) -> PairSplit:
    data = fashion_mnist.load_split(split)
    return PairSplit(split, data.images, data.labels)


BUILTIN_LOADERS: dict[str, Callable[[str], PairSplit]] = {"fashion-mnist": _fashion_mnist}


def load_pair_split(pair: ModelPair, split: str) -> PairSplit:
    """One of ``POLICY_SPLITS`` of the pair's declared data, checked against the pair's
    input contract. Raises CatalogError naming the pair when something does not fit."""
    if split not in POLICY_SPLITS and not (
        split == MODEL_TRAIN_SPLIT and has_model_train_split(pair)
    ):
        raise ValueError(f"unknown split {split!r}; splits are {POLICY_SPLITS}")
    if pair.data is None:
        raise CatalogError(
            f"pair {pair.name}: declares no data; add data = {{ npz = ... }} or "
            "data = { loader = ... } to its catalog entry (docs/models.md)"
        )
    if pair.data.loader is not None:
        result = BUILTIN_LOADERS[pair.data.loader](split)
    else:
        inputs, labels = _npz(pair.data)
        index = npz_split_indices(len(labels), pair.data)[split]
        result = PairSplit(split, inputs[index], labels[index])
    _check(pair, result)
    return result


def has_model_train_split(pair: ModelPair) -> bool:
    """Whether the pair's data has the edge's training split (built-in loaders do)."""
    return pair.data is not None and pair.data.loader is not None


@cache
def _npz_cached(path: Path) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.int64]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            inputs, labels = data["inputs"], data["labels"]
    except (OSError, KeyError, ValueError) as error:
        raise CatalogError(f"{path}: needs arrays inputs and labels ({error})") from error
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CatalogError(f"{path}: labels must be a 1-d integer array, got {labels.dtype}")
    if len(inputs) != len(labels):
        raise CatalogError(f"{path}: {len(inputs)} inputs but {len(labels)} labels")
    inputs.setflags(write=False)
    return inputs, labels.astype(np.int64)


def _npz(source: DataSource) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.int64]]:
    assert source.npz is not None
    return _npz_cached(source.npz.resolve())


def npz_split_indices(total: int, source: DataSource) -> dict[str, npt.NDArray[np.int64]]:
    """Disjoint, sorted index sets covering ``range(total)``, fixed by the seed."""
    order = np.random.default_rng(source.seed).permutation(total)
    router_train = round(source.fractions[0] * total)
    calibration = round(source.fractions[1] * total)
    cuts = {
        "router_train": order[:router_train],
        "calibration": order[router_train : router_train + calibration],
        "test": order[router_train + calibration :],
    }
    return {name: np.sort(index).astype(np.int64) for name, index in cuts.items()}


def _check(pair: ModelPair, split: PairSplit) -> None:
    want = DATATYPE_TO_NUMPY[DATATYPE_BY_KSERVE_NAME[pair.input.datatype]]
    where = f"pair {pair.name}, {split.name} split"
    if split.inputs.dtype != want:
        raise CatalogError(
            f"{where}: inputs are {split.inputs.dtype}, the pair's input "
            f"{pair.input.name} is {pair.input.datatype} ({want})"
        )
    shape = split.inputs.shape
    contract = pair.input.shape
    if len(shape) != len(contract) or any(
        want_dim not in (-1, got) for got, want_dim in zip(shape[1:], contract[1:], strict=True)
    ):
        raise CatalogError(f"{where}: inputs have shape {list(shape)}, the pair's is {contract}")
    if not len(split.labels):
        raise CatalogError(f"{where}: is empty")
    classes = pair.output.shape[-1]
    if classes > 0 and (split.labels.min() < 0 or split.labels.max() >= classes):
        raise CatalogError(f"{where}: labels outside 0..{classes - 1}")
