"""Features for the learned router, computed the same way in training and in serving.

From the edge model's output: top-1 probability, margin to the runner-up, entropy, and
the full probability vector (which class the edge believes, and how the mass spreads).
From the request: cheap statistics of the input (mean, spread, ink coverage), which
say whether an item looks unusual without running anything else.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

SUMMARY_FEATURES = ("top1_probability", "margin", "entropy", "input_mean", "input_std", "input_ink")


def feature_names(num_classes: int) -> list[str]:
    return [*SUMMARY_FEATURES, *(f"probability_{index}" for index in range(num_classes))]


def router_features(
    probabilities: npt.NDArray[np.float32], inputs: npt.NDArray[np.generic]
) -> npt.NDArray[np.float32]:
    """[n, 6 + classes] float32 features for n items.

    ``probabilities``: [n, classes] edge softmax output. ``inputs``: the model input,
    [n, ...]; integer inputs are taken on the 0..255 scale.
    """
    if probabilities.ndim != 2 or probabilities.shape[0] != inputs.shape[0]:
        raise ValueError(f"probabilities {probabilities.shape} and inputs {inputs.shape} disagree")
    ordered = np.sort(probabilities, axis=1)[:, ::-1]
    top1 = ordered[:, 0]
    margin = ordered[:, 0] - ordered[:, 1] if ordered.shape[1] > 1 else ordered[:, 0]
    clipped = np.clip(probabilities, 1e-12, 1.0)
    entropy = -(probabilities * np.log(clipped)).sum(axis=1)
    flat = inputs.reshape(inputs.shape[0], -1).astype(np.float32)
    if np.issubdtype(inputs.dtype, np.integer):
        flat = flat / 255.0
    summary = np.stack(
        [top1, margin, entropy, flat.mean(axis=1), flat.std(axis=1), (flat > 0.1).mean(axis=1)],
        axis=1,
    )
    features: npt.NDArray[np.float32] = np.concatenate([summary, probabilities], axis=1).astype(
        np.float32
    )
    return features
