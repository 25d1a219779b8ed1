"""The learned escalation policy: a versioned artifact evaluated in process.

A policy directory holds ``policy.json`` (version, threshold, feature names, operator
target, calibration report, sha256 of the classifier) and ``classifier.onnx`` whose
first output is the escalation score in [0, 1] per item ([n] or [n, 2] probabilities).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

POLICY_FILE = "policy.json"
CLASSIFIER_FILE = "classifier.onnx"
POLICY_SCHEMA = "hybridmesh.router-policy/v1"


class PolicyArtifactError(Exception):
    """The policy artifact is missing, malformed, or does not match its hash."""


@dataclass(frozen=True)
class PolicyMetadata:
    version: str
    threshold: float
    feature_names: tuple[str, ...]
    classifier_sha256: str
    target: dict[str, Any]
    calibration: dict[str, Any]
    pair: str


def read_policy_metadata(directory: Path) -> PolicyMetadata:
    try:
        raw = json.loads((directory / POLICY_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PolicyArtifactError(f"{directory / POLICY_FILE}: {error}") from error
    if raw.get("schema") != POLICY_SCHEMA:
        raise PolicyArtifactError(f"{directory}: schema is {raw.get('schema')!r}")
    try:
        return PolicyMetadata(
            version=str(raw["version"]),
            threshold=float(raw["threshold"]),
            feature_names=tuple(raw["feature_names"]),
            classifier_sha256=str(raw["classifier_sha256"]),
            target=dict(raw["target"]),
            calibration=dict(raw["calibration"]),
            pair=str(raw["pair"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise PolicyArtifactError(f"{directory}: bad field {error}") from error


def latest_policy(root: Path) -> Path:
    """The highest-numbered version directory under a pair's policy root."""
    versions = (
        [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()] if root.is_dir() else []
    )
    if not versions:
        raise PolicyArtifactError(f"{root}: no policy versions")
    return max(versions, key=lambda p: int(p.name))


class EscalationClassifier:
    """Scores items; ``score >= threshold`` means the cloud is worth calling."""

    def __init__(self, directory: Path) -> None:
        self.metadata = read_policy_metadata(directory)
        model_bytes = (directory / CLASSIFIER_FILE).read_bytes()
        digest = hashlib.sha256(model_bytes).hexdigest()
        if digest != self.metadata.classifier_sha256:
            raise PolicyArtifactError(
                f"{directory / CLASSIFIER_FILE}: sha256 {digest} does not match policy.json"
            )
        options = ort.SessionOptions()
        # Microsecond-scale model: threads would cost more than they save.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            model_bytes, options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        # Classifier exports have a label output too; the score is the probabilities.
        outputs = self._session.get_outputs()
        self._output = next(
            (o.name for o in outputs if o.name == "probabilities"),
            next(o.name for o in outputs if o.type == "tensor(float)"),
        )

    @property
    def version(self) -> str:
        return self.metadata.version

    @property
    def threshold(self) -> float:
        return self.metadata.threshold

    def score(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """[n] escalation scores for [n, features] inputs."""
        if features.shape[1] != len(self.metadata.feature_names):
            raise ValueError(
                f"{features.shape[1]} features, policy expects {len(self.metadata.feature_names)}"
            )
        (raw,) = self._session.run([self._output], {self._input: features})
        scores = np.asarray(raw, dtype=np.float32)
        if scores.ndim == 2:
            scores = scores[:, -1]
        return scores
