"""Out-of-fold (OOF) edge outputs on the model-train split: router training data that
looks like the edge's behaviour on unseen items.

The served edge model was fitted on all of model-train, so its outputs there are
over-confident and useless for teaching a router. Instead, K edge "fold models" are
trained with the edge's own recipe, fold model k on every model-train item except fold
k (``workload.train_edge_folds``, ``make models``); each item's OOF output is that of the
one fold model that never saw it. This module is the torch-free half: the fold
assignment, reading and verifying a fold set, and running it (onnxruntime).

Layout: ``models/folds/<edge model>/<edge version>/`` with ``folds.json`` (split, K,
seed, per-fold file, sha256, training seconds, OOF accuracy) beside ``fold-<k>.onnx`` and
``MODEL_CARD.md``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

FOLDS_FILE = "folds.json"
FOLDS_SCHEMA = "hybridmesh.edge-folds/v1"
FOLDS_ROOT = Path("models/folds")
FOLD_SEED = 20261130


class FoldSetError(ValueError):
    """A fold set is missing, malformed, or a file does not match its sha256."""


def fold_of(items: int, folds: int, seed: int = FOLD_SEED) -> npt.NDArray[np.int64]:
    """[items] fold index (0..folds-1) of each item: a seeded permutation dealt round-robin,
    so fold sizes differ by at most one."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    result = np.empty(items, dtype=np.int64)
    result[np.random.default_rng(seed).permutation(items)] = np.arange(items) % folds
    return result


@dataclass(frozen=True)
class FoldSet:
    """A verified fold set: ``models[k]`` is fold model k's ONNX file."""

    directory: Path
    split: str
    folds: int
    seed: int
    models: tuple[Path, ...]
    metadata: dict[str, Any]


def fold_set_dir(edge_model: str, edge_version: int, root: Path = FOLDS_ROOT) -> Path:
    return root / edge_model / str(edge_version)


def load_fold_set(directory: Path) -> FoldSet:
    """Read ``folds.json`` and check every fold file's sha256. Raises FoldSetError."""
    try:
        metadata = json.loads((directory / FOLDS_FILE).read_text())
    except (OSError, ValueError) as error:
        raise FoldSetError(f"{directory / FOLDS_FILE}: {error}") from error
    if metadata.get("schema") != FOLDS_SCHEMA:
        raise FoldSetError(f"{directory / FOLDS_FILE}: schema is not {FOLDS_SCHEMA}")
    models = []
    for entry in metadata["fold_models"]:
        path = directory / entry["file"]
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            raise FoldSetError(f"{path}: missing or its sha256 differs from {FOLDS_FILE}")
        models.append(path)
    if len(models) != metadata["folds"]:
        raise FoldSetError(
            f"{directory}: {len(models)} fold models, folds.json says K={metadata['folds']}"
        )
    return FoldSet(
        directory,
        metadata["split"],
        int(metadata["folds"]),
        int(metadata["seed"]),
        tuple(models),
        metadata,
    )


@dataclass(frozen=True)
class OutOfFold:
    """Each item's output from the fold model that did not train on it: ``outputs``
    [n, classes] float32, ``view_outputs`` the same per view, ``fold`` [n] int64."""

    outputs: npt.NDArray[np.float32]
    view_outputs: dict[str, npt.NDArray[np.float32]]
    fold: npt.NDArray[np.int64]


def out_of_fold_outputs(
    fold_set: FoldSet,
    inputs: npt.NDArray[np.generic],
    input_name: str,
    output_name: str,
    *,
    views: Sequence[str] = (),
    batch: int = 1000,
) -> OutOfFold:
    """Run every item of ``inputs`` (the fold set's whole split, in split order) through
    its held-out fold model, and through it again for each view in ``views``."""
    # Here, not at the top: the training venv (torch) imports fold_of without grpc.
    from services.views import apply_view

    fold = fold_of(len(inputs), fold_set.folds, fold_set.seed)
    outputs: npt.NDArray[np.float32] | None = None
    view_outputs: dict[str, npt.NDArray[np.float32]] = {}
    for k, model in enumerate(fold_set.models):
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        index = np.flatnonzero(fold == k)
        for name, transformed in (
            ("", inputs[index]),
            *((view, apply_view(view, inputs[index])) for view in views),
        ):
            result = np.concatenate(
                [
                    np.asarray(
                        session.run([output_name], {input_name: transformed[i : i + batch]})[0]
                    )
                    for i in range(0, len(index), batch)
                ]
            ).astype(np.float32)
            if name == "":
                if outputs is None:
                    outputs = np.zeros((len(inputs), result.shape[1]), np.float32)
                outputs[index] = result
            else:
                view_outputs.setdefault(name, np.zeros((len(inputs), result.shape[1]), np.float32))
                view_outputs[name][index] = result
    assert outputs is not None
    return OutOfFold(outputs, view_outputs, fold)
