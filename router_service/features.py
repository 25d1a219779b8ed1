"""Features for the learned router, computed the same way in training and in serving.

From the edge model's output: top-1 probability, margin to the runner-up, entropy, and
the full probability vector (which class the edge believes, and how the mass spreads).
From the request: cheap statistics of the input (mean, spread, ink coverage), which
say whether an item looks unusual without running anything else.

From each declared test-time view (``services.views``: the edge model run once more on,
e.g., the mirrored input): the view's top-1 probability, whether the two views agree on
the class, their symmetric KL divergence and L1 distance, the top-1 probability and
margin of their mean, and the view's probability of the edge's class
(``view_<name>_<feature>``). This is information the edge's confidence lacks (issue 18:
confidence-only routers tie max-softmax; the second view does not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

# log(p) of a zero probability is taken at this floor (its term is 0 either way).
LOG_FLOOR = 1e-12
# A pixel counts as ink above this share of the full scale.
INK_LEVEL = 0.1
SUMMARY_FEATURES = ("top1_probability", "margin", "entropy", "input_mean", "input_std", "input_ink")
VIEW_FEATURES = (
    "top1_probability",
    "agreement",
    "symmetric_kl",
    "l1_distance",
    "mean_top1",
    "mean_margin",
    "edge_class_probability",
)
VIEW_PREFIX = "view_"
# Per uint8 level: the level, its square, and whether it counts as ink ([256, 3] int64).
_LEVELS = np.arange(256, dtype=np.int64)
_UINT8_WEIGHTS = np.stack(
    [_LEVELS, _LEVELS * _LEVELS, (_LEVELS > INK_LEVEL * 255.0).astype(np.int64)], axis=1
)

Views = Mapping[str, npt.NDArray[np.float32]]


def feature_names(num_classes: int, views: Sequence[str] = ()) -> list[str]:
    """The feature columns, in order: summary, per-class probabilities, then each view's
    features in the declared order of ``views``."""
    return [
        *SUMMARY_FEATURES,
        *(f"probability_{index}" for index in range(num_classes)),
        *(f"{VIEW_PREFIX}{view}_{name}" for view in views for name in VIEW_FEATURES),
    ]


def views_of(names: Sequence[str], num_classes: int) -> tuple[str, ...]:
    """The views a feature list needs, in order; ValueError unless ``names`` is exactly
    ``feature_names(num_classes, views)`` for them (a policy's features must be
    computable from what it declares)."""
    base = len(SUMMARY_FEATURES) + num_classes
    tail = list(names[base:])
    if len(tail) % len(VIEW_FEATURES):
        raise ValueError(f"{len(tail)} view features is not a whole number of views")
    views = tuple(
        tail[start][len(VIEW_PREFIX) : -len(VIEW_FEATURES[0]) - 1]
        for start in range(0, len(tail), len(VIEW_FEATURES))
    )
    if list(names) != feature_names(num_classes, views):
        raise ValueError(f"feature names {list(names)} are not a known feature set")
    return views


def router_features(
    probabilities: npt.NDArray[np.float32],
    inputs: npt.NDArray[np.generic],
    views: Views | None = None,
) -> npt.NDArray[np.float32]:
    """[n, 6 + classes + 7 x views] float32 features for n items.

    ``probabilities``: [n, classes] edge softmax output. ``inputs``: the model input,
    [n, ...]; integer inputs are taken on the 0..255 scale. ``views``: each declared
    view's [n, classes] softmax output, in the policy's declared order.
    """
    if probabilities.ndim != 2 or probabilities.shape[0] != inputs.shape[0]:
        raise ValueError(f"probabilities {probabilities.shape} and inputs {inputs.shape} disagree")
    for name, view in (views or {}).items():
        if view.shape != probabilities.shape:
            raise ValueError(f"view {name} {view.shape} and probabilities disagree")
    if probabilities.shape[0] == 1:
        base = _one_item(probabilities, inputs)
        if not views:
            return base
        extra = [_one_item_view(probabilities[0], view[0]) for view in views.values()]
        return np.concatenate(
            [base, np.asarray([[v for row in extra for v in row]], dtype=np.float32)], axis=1
        )
    ordered = np.sort(probabilities, axis=1)[:, ::-1]
    top1 = ordered[:, 0]
    margin = ordered[:, 0] - ordered[:, 1] if ordered.shape[1] > 1 else ordered[:, 0]
    clipped = np.clip(probabilities, LOG_FLOOR, 1.0)
    entropy = -(probabilities * np.log(clipped)).sum(axis=1)
    flat = inputs.reshape(inputs.shape[0], -1).astype(np.float32)
    if np.issubdtype(inputs.dtype, np.integer):
        flat = flat / 255.0
    summary = np.stack(
        [
            top1,
            margin,
            entropy,
            flat.mean(axis=1),
            flat.std(axis=1),
            (flat > INK_LEVEL).mean(axis=1),
        ],
        axis=1,
    )
    parts = [summary, probabilities]
    parts += [_view_features(probabilities, view) for view in (views or {}).values()]
    features: npt.NDArray[np.float32] = np.concatenate(parts, axis=1).astype(np.float32)
    return features


def _view_features(
    probabilities: npt.NDArray[np.float32], view: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """[n, 7] features of one view beside the edge's own output (``VIEW_FEATURES``)."""
    edge_class = probabilities.argmax(axis=1)
    clipped_edge = np.clip(probabilities, LOG_FLOOR, 1.0)
    clipped_view = np.clip(view, LOG_FLOOR, 1.0)
    log_ratio = np.log(clipped_edge) - np.log(clipped_view)
    symmetric_kl = 0.5 * ((probabilities - view) * log_ratio).sum(axis=1)
    mean = np.sort((probabilities + view) / 2, axis=1)[:, ::-1]
    mean_margin = mean[:, 0] - mean[:, 1] if mean.shape[1] > 1 else mean[:, 0]
    result: npt.NDArray[np.float32] = np.stack(
        [
            view.max(axis=1),
            (view.argmax(axis=1) == edge_class).astype(np.float32),
            symmetric_kl,
            np.abs(probabilities - view).sum(axis=1),
            mean[:, 0],
            mean_margin,
            view[np.arange(len(view)), edge_class],
        ],
        axis=1,
    ).astype(np.float32)
    return result


def _one_item_view(edge: npt.NDArray[np.float32], view: npt.NDArray[np.float32]) -> list[float]:
    """``_view_features`` of one item with scalar arithmetic (the router's usual request)."""
    p = [float(value) for value in edge.tolist()]
    q = [float(value) for value in view.tolist()]
    edge_class = max(range(len(p)), key=p.__getitem__)
    view_class = max(range(len(q)), key=q.__getitem__)
    symmetric_kl = 0.5 * sum(
        (a - b) * (math.log(min(max(a, LOG_FLOOR), 1.0)) - math.log(min(max(b, LOG_FLOOR), 1.0)))
        for a, b in zip(p, q, strict=True)
    )
    mean = sorted(((a + b) / 2 for a, b in zip(p, q, strict=True)), reverse=True)
    return [
        q[view_class],
        1.0 if view_class == edge_class else 0.0,
        symmetric_kl,
        sum(abs(a - b) for a, b in zip(p, q, strict=True)),
        mean[0],
        mean[0] - mean[1] if len(mean) > 1 else mean[0],
        q[edge_class],
    ]


def _one_item(
    probabilities: npt.NDArray[np.float32], inputs: npt.NDArray[np.generic]
) -> npt.NDArray[np.float32]:
    """The same features for a single item (the router's usual request), with scalar
    arithmetic instead of a dozen numpy calls (``bench/decision_bench.py`` measures it);
    equal to the vectorised path within float32 rounding
    (``tests/test_router_learning.py``)."""
    row = [float(value) for value in probabilities[0].tolist()]
    ordered = sorted(row, reverse=True)
    top1 = ordered[0]
    margin = top1 - ordered[1] if len(ordered) > 1 else top1
    entropy = -sum(
        value * math.log(min(max(value, LOG_FLOOR), 1.0)) for value in row if value > 0.0
    )
    pixels = inputs.reshape(-1)
    count = pixels.size
    if pixels.dtype == np.uint8:
        # One histogram, then prepared per-level weights: the exact integer sums of the
        # pixels, their squares and the ink pixels in two numpy calls instead of five.
        total, squares, ink_count = (np.bincount(pixels, minlength=256) @ _UINT8_WEIGHTS).tolist()
        mean = total / count / 255.0
        variance = squares / count / (255.0 * 255.0) - mean * mean
        ink = ink_count / count
    elif np.issubdtype(inputs.dtype, np.integer):
        wide = pixels.astype(np.int64)
        mean = int(wide.sum()) / count / 255.0
        variance = int(np.dot(wide, wide)) / count / (255.0 * 255.0) - mean * mean
        ink = int(np.count_nonzero(wide > INK_LEVEL * 255.0)) / count
    else:
        values = pixels.astype(np.float64)
        mean = float(values.mean())
        variance = float(values.var())
        ink = int(np.count_nonzero(values > INK_LEVEL)) / count
    features = np.empty((1, len(SUMMARY_FEATURES) + len(row)), dtype=np.float32)
    features[0, : len(SUMMARY_FEATURES)] = (
        top1,
        margin,
        entropy,
        mean,
        math.sqrt(max(variance, 0.0)),
        ink,
    )
    features[0, len(SUMMARY_FEATURES) :] = probabilities[0]
    return features
