"""Escalation policies, one per model pair: versioned artifacts evaluated in process.

A policy directory (``<policies>/<pair>/<version>/``) holds ``policy.json`` (kind,
version, threshold, feature names, operator target, calibration report) and, for a
``learned`` policy, ``classifier.onnx`` (sha256 in policy.json) whose first output is the
escalation score in [0, 1] per item ([n] or [n, 2] probabilities). A ``max-softmax``
policy has no classifier: its score is 1 - the edge's top-1 probability (the confidence
baseline every report shows; Jitkrittum et al., NeurIPS 2023).

A pair with no policy at all is served by ``MaxSoftmaxPolicy.default`` (version
``max-softmax-default``, threshold a router setting), named as such in every decision:
never another pair's policy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from router_service.features import SUMMARY_FEATURES, VIEW_FEATURES, feature_names
from router_service.linear_score import LinearLogisticScore
from services.logging import get_logger

POLICY_FILE = "policy.json"
CLASSIFIER_FILE = "classifier.onnx"
POLICY_SCHEMA = "hybridmesh.router-policy/v1"
LEARNED, MAX_SOFTMAX = "learned", "max-softmax"
DEFAULT_POLICY_VERSION = "max-softmax-default"
# The numpy score must match the session's to this (float32 rounding of a 16-term sum).
LINEAR_SCORE_TOLERANCE = 1e-6
PROBE_ROWS = 256

_log = get_logger("router.escalation")


class PolicyArtifactError(Exception):
    """The policy artifact is missing, malformed, or does not match its hash."""


@dataclass(frozen=True)
class PolicyMetadata:
    kind: str
    version: str
    threshold: float
    feature_names: tuple[str, ...]
    classifier_sha256: str
    target: dict[str, Any]
    calibration: dict[str, Any]
    pair: str
    # Test-time views (services.views) whose edge outputs the features include, in
    # order; a policy with views needs the edge tier to return them (``<output>_view_<v>``).
    views: tuple[str, ...] = ()


def read_policy_metadata(directory: Path) -> PolicyMetadata:
    try:
        raw = json.loads((directory / POLICY_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PolicyArtifactError(f"{directory / POLICY_FILE}: {error}") from error
    if raw.get("schema") != POLICY_SCHEMA:
        raise PolicyArtifactError(f"{directory}: schema is {raw.get('schema')!r}")
    try:
        kind = str(raw.get("kind", LEARNED))
        if kind not in (LEARNED, MAX_SOFTMAX):
            raise PolicyArtifactError(f"{directory}: unknown policy kind {kind!r}")
        names = tuple(str(name) for name in raw["feature_names"])
        views = tuple(str(view) for view in raw.get("views", []))
        if kind == LEARNED:
            _check_feature_names(directory, names, views)
        return PolicyMetadata(
            kind=kind,
            version=str(raw["version"]),
            threshold=float(raw["threshold"]),
            feature_names=names,
            classifier_sha256=str(raw.get("classifier_sha256", "")),
            target=dict(raw["target"]),
            calibration=dict(raw["calibration"]),
            pair=str(raw["pair"]),
            views=views,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise PolicyArtifactError(f"{directory}: bad field {error}") from error


def _check_feature_names(directory: Path, names: tuple[str, ...], views: tuple[str, ...]) -> None:
    """A learned policy's features must be computable from what it declares: its names
    are exactly ``features.feature_names(classes, views)`` for its declared views."""
    classes = len(names) - len(SUMMARY_FEATURES) - len(VIEW_FEATURES) * len(views)
    if classes < 1 or list(names) != feature_names(classes, views):
        raise PolicyArtifactError(
            f"{directory}: feature names are not the feature set of views {list(views)}"
        )


def latest_policy(root: Path) -> Path:
    """The highest-numbered version directory under a pair's policy root."""
    versions = (
        [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()] if root.is_dir() else []
    )
    if not versions:
        raise PolicyArtifactError(f"{root}: no policy versions")
    return max(versions, key=lambda p: int(p.name))


class ScoringPolicy(Protocol):
    """What the router needs from a pair's policy: ``score >= threshold`` means the
    cloud is worth calling for that item."""

    metadata: PolicyMetadata

    @property
    def version(self) -> str: ...

    @property
    def threshold(self) -> float: ...

    def score(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...


class MaxSoftmaxPolicy:
    """Score = 1 - top-1 probability (``features[:, 0]``, see ``features.py``)."""

    def __init__(self, metadata: PolicyMetadata) -> None:
        self.metadata = metadata

    @classmethod
    def default(cls, pair: str, threshold: float) -> MaxSoftmaxPolicy:
        """The explicit policy of a pair that has none: escalate when the edge's top-1
        probability is below 1 - ``threshold``."""
        return cls(
            PolicyMetadata(
                kind=MAX_SOFTMAX,
                version=DEFAULT_POLICY_VERSION,
                threshold=threshold,
                feature_names=(),
                classifier_sha256="",
                target={},
                calibration={},
                pair=pair,
            )
        )

    @property
    def version(self) -> str:
        return self.metadata.version

    @property
    def threshold(self) -> float:
        return self.metadata.threshold

    def score(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """[n] scores for [n, features] inputs whose first column is top-1 probability."""
        scores: npt.NDArray[np.float32] = (1.0 - features[:, 0]).astype(np.float32)
        return scores


def load_policy(directory: Path) -> ScoringPolicy:
    """The policy in ``directory``, of whichever kind its policy.json says."""
    metadata = read_policy_metadata(directory)
    if metadata.kind == MAX_SOFTMAX:
        return MaxSoftmaxPolicy(metadata)
    return EscalationClassifier(directory)


def load_pair_policies(
    policies_dir: Path, pairs: list[str], default_threshold: float
) -> dict[str, ScoringPolicy]:
    """Each pair's newest policy under ``policies_dir/<pair>/``; the explicit max-softmax
    default for a pair with none. Raises PolicyArtifactError when a policy there was
    made for another pair (a copy in the wrong place)."""
    policies: dict[str, ScoringPolicy] = {}
    for pair in pairs:
        root = policies_dir / pair
        try:
            directory = latest_policy(root)
        except PolicyArtifactError:
            policies[pair] = MaxSoftmaxPolicy.default(pair, default_threshold)
            continue
        policy = load_policy(directory)
        if policy.metadata.pair != pair:
            raise PolicyArtifactError(
                f"{directory}: policy is for pair {policy.metadata.pair!r}, not {pair!r}"
            )
        policies[pair] = policy
    return policies


class EscalationClassifier:
    """A learned policy: scores items with its ONNX classifier (a logistic regression's
    own weights in numpy when they reproduce the session, ``linear_score.py``)."""

    def __init__(self, directory: Path) -> None:
        self.metadata = read_policy_metadata(directory)
        if self.metadata.kind != LEARNED:
            raise PolicyArtifactError(f"{directory}: a {self.metadata.kind} policy, not learned")
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
        self._outputs = [self._output]
        self.linear = self._checked_linear(model_bytes, directory)

    def _checked_linear(self, model_bytes: bytes, directory: Path) -> LinearLogisticScore | None:
        linear = LinearLogisticScore.from_onnx(model_bytes)
        if linear is None:
            return None
        # Probe rows around the features' own scale: probabilities, statistics, views.
        probe = (
            np.random.default_rng(0)
            .normal(0.5, 0.5, (PROBE_ROWS, len(self.metadata.feature_names)))
            .astype(np.float32)
        )
        gap = float(np.abs(linear(probe) - self._session_score(probe)).max())
        if gap > LINEAR_SCORE_TOLERANCE:
            _log.warning("linear score disagrees with the session", policy=str(directory), gap=gap)
            return None
        return linear

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
        if self.linear is not None:
            return self.linear(features)
        return self._session_score(features)

    def _session_score(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """[n] scores from the ONNX session itself (the artifact's reference)."""
        (raw,) = self._session.run(self._outputs, {self._input: features})
        scores = np.asarray(raw, dtype=np.float32)
        if scores.ndim == 2:
            scores = scores[:, -1]
        return scores
