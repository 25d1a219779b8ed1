"""Logits -> probabilities and top-k, the same way on every tier."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from hybridmesh.common.v1 import model_pb2


def softmax(logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """Row-wise softmax over the last axis, numerically stable."""
    shifted = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: npt.NDArray[np.float32] = exp / exp.sum(axis=-1, keepdims=True)
    return result


def softmax_one_row(logits: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
    """``softmax`` of a [1, classes] array with scalar math (~3 µs instead of six numpy
    calls' ~10); equal to it within float32 rounding. [1, classes] float32."""
    row = logits.reshape(-1).tolist()
    top = max(row)
    exp = [math.exp(value - top) for value in row]
    total = sum(exp)
    return np.array([[value / total for value in exp]], dtype=np.float32)


def top_k(
    probabilities: npt.NDArray[np.float32], labels: Sequence[str], k: int
) -> list[model_pb2.Classification]:
    """One Classification per row, the k most probable classes first."""
    k = max(1, min(k, probabilities.shape[-1]))
    # argsort of the negation keeps the lower index first on ties, deterministically.
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    results = []
    for row, indices in zip(probabilities, order, strict=True):
        results.append(
            model_pb2.Classification(
                top_k=[
                    model_pb2.ClassScore(
                        class_index=int(index),
                        label=labels[index] if index < len(labels) else str(index),
                        probability=float(row[index]),
                    )
                    for index in indices
                ]
            )
        )
    return results


def to_probabilities(
    scores: npt.NDArray[np.floating[Any]], outputs_probabilities: bool
) -> npt.NDArray[np.float32]:
    """A model's [n, classes] output as probabilities: passed through when the model
    outputs probabilities (catalog ``output_kind``), else softmax of its logits."""
    return scores.astype(np.float32) if outputs_probabilities else softmax(scores)
