"""A learned policy's logistic regression evaluated with numpy, from its own ONNX graph.

Training exports logistic regression as ``Scaler -> LinearClassifier`` (skl2onnx, post
transform LOGISTIC). For one item, an onnxruntime ``run`` costs ~7-25 µs of call
overhead around a 16-term dot product; the same arithmetic in numpy costs a few µs. The
ONNX artifact stays the source of truth: the weights are read from it, and the router
uses them only after they reproduce the session's scores on a probe batch
(``EscalationClassifier``); any other graph is scored by onnxruntime.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper
from scipy.special import expit

SCALER, LINEAR_CLASSIFIER = "Scaler", "LinearClassifier"


class LinearLogisticScore:
    """score = sigmoid(((x - offset) * scale) @ weights + intercept): the probability of
    the classifier's last class label. The scaler is folded into the weights once
    (float64), so scoring is one dot product and a sigmoid."""

    def __init__(
        self,
        offset: npt.NDArray[np.float32],
        scale: npt.NDArray[np.float32],
        weights: npt.NDArray[np.float32],
        intercept: float,
    ) -> None:
        scaled = scale.astype(np.float64) * weights.astype(np.float64)
        self.weights: npt.NDArray[np.float64] = np.broadcast_to(scaled, weights.shape).copy()
        self.intercept = float(intercept) - float(
            np.broadcast_to(offset.astype(np.float64), weights.shape) @ self.weights
        )

    @classmethod
    def from_onnx(cls, model_bytes: bytes) -> LinearLogisticScore | None:
        """The graph's score if it is exactly Scaler -> LinearClassifier with a LOGISTIC
        post transform and one coefficient row per class; None for any other graph."""
        graph = onnx.load_from_string(model_bytes).graph
        if [node.op_type for node in graph.node] != [SCALER, LINEAR_CLASSIFIER]:
            return None
        scaler, linear = graph.node
        if linear.input[0] != scaler.output[0]:
            return None
        features = graph.input[0].type.tensor_type.shape.dim[1].dim_value
        scaler_attributes = {a.name: helper.get_attribute_value(a) for a in scaler.attribute}
        attributes = {a.name: helper.get_attribute_value(a) for a in linear.attribute}
        labels = attributes.get("classlabels_ints") or attributes.get("classlabels_strings")
        coefficients = np.asarray(attributes.get("coefficients", []), dtype=np.float32)
        intercepts = np.asarray(attributes.get("intercepts", []), dtype=np.float32)
        if (
            attributes.get("post_transform") != b"LOGISTIC"
            or attributes.get("multi_class", 0) != 0
            or not labels
            or features < 1
            or coefficients.size != len(labels) * features
            or intercepts.size != len(labels)
        ):
            return None
        offset = np.asarray(scaler_attributes.get("offset", [0.0]), dtype=np.float32)
        scale = np.asarray(scaler_attributes.get("scale", [1.0]), dtype=np.float32)
        weights = coefficients.reshape(len(labels), features)[-1].copy()
        return cls(offset, scale, weights, float(intercepts[-1]))

    def __call__(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """[n] float32 scores for [n, features] float32 inputs."""
        if features.shape[0] == 1:
            # One item (the usual request): scalar math after the one dot product.
            logit = float(features[0] @ self.weights) + self.intercept
            return np.array([_sigmoid(logit)], dtype=np.float32)
        logits = features @ self.weights + self.intercept
        scores: npt.NDArray[np.float32] = expit(logits).astype(np.float32)
        return scores


def _sigmoid(logit: float) -> float:
    # scipy's expit on one Python float costs ~4 µs; this ~0.2. Either branch keeps
    # exp's argument <= 0 (no overflow for extreme logits).
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    exp = math.exp(logit)
    return exp / (1.0 + exp)
