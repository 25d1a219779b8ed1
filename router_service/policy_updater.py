"""Over-the-air updates of a pair's router policy (escalation classifier + threshold).

The registry serves policies as artifacts of kind ``router-policy`` named after the pair.
A promoted version that differs from the serving one is downloaded and verified like an
edge model (signed manifest, every file's sha256), installed under the pair's policy root,
loaded (``EscalationClassifier`` checks the classifier's own sha256 against policy.json)
and checked against the serving policy: same pair, same features, a threshold in (0, 1)
and finite scores on a probe batch. Then ``install`` swaps it in. A version that fails is
refused and never retried. Whether a policy is *better* is decided before it is published
(``training.retrain`` compares it with the serving one on held-out data).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from registry.artifacts import ArtifactError, ArtifactRef
from registry.download import ArtifactSource, fetch_verified
from registry.signing import SignatureError
from router_service.escalation import EscalationClassifier, PolicyArtifactError
from services.logging import get_logger

POLICY_KIND = "router-policy"
PROBE_ITEMS = 64
_log = get_logger("router_service.policy_updater")


@dataclass(frozen=True)
class PolicyUpdate:
    pair: str
    version: int
    outcome: str  # "switched" | "refused"
    reason: str = ""
    previous_version: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)


class PolicyUpdater:
    def __init__(  # noqa: PLR0917 (the collaborators, each with its own type)
        self,
        source: ArtifactSource,
        pair: str,
        policy_root: Path,
        staging: Path,
        trusted: Mapping[str, Ed25519PublicKey],
        current: Callable[[], EscalationClassifier],
        install: Callable[[EscalationClassifier], None],
    ) -> None:
        self._source = source
        self._pair = pair
        self._root = policy_root
        self._staging = staging
        self._trusted = trusted
        self._current = current
        self._install = install
        self.refused: set[int] = set()

    async def poll_once(self) -> PolicyUpdate | None:
        promoted = await self._source.promoted(POLICY_KIND, self._pair)
        if promoted is None or str(promoted) == self._current().version:
            return None
        if promoted in self.refused:
            return None
        return await self.apply(promoted)

    async def apply(self, version: int) -> PolicyUpdate:
        ref = ArtifactRef(POLICY_KIND, self._pair, version)
        serving = self._current()
        timings: dict[str, float] = {}
        target = self._root / str(version)
        if not target.is_dir():
            try:
                fetched = await fetch_verified(self._source, ref, self._staging, self._trusted)
            except (SignatureError, ArtifactError) as error:
                return self._refuse(ref, f"verification failed: {error}", serving)
            timings["download"], timings["verify"] = fetched.download_s, fetched.verify_s
            await asyncio.to_thread(shutil.move, fetched.directory, target)
        started = time.perf_counter()
        try:
            candidate = await asyncio.to_thread(EscalationClassifier, target)
            problem = check_compatible(serving, candidate)
        except (PolicyArtifactError, OSError, ValueError, RuntimeError) as error:
            problem = f"does not load: {error}"
        timings["load_and_check"] = time.perf_counter() - started
        if problem:
            await asyncio.to_thread(shutil.rmtree, target, True)
            return self._refuse(ref, problem, serving)
        self._install(candidate)
        update = PolicyUpdate(self._pair, version, "switched", "", serving.version, timings)
        _log.info(
            "router policy update", pair=self._pair, version=version, previous=serving.version
        )
        return update

    def _refuse(self, ref: ArtifactRef, reason: str, serving: EscalationClassifier) -> PolicyUpdate:
        self.refused.add(ref.version)
        _log.warning("router policy refused", pair=ref.name, version=ref.version, reason=reason)
        return PolicyUpdate(ref.name, ref.version, "refused", reason, serving.version)


def check_compatible(serving: EscalationClassifier, candidate: EscalationClassifier) -> str:
    """Why ``candidate`` may not replace ``serving``, or "" when it may."""
    new, old = candidate.metadata, serving.metadata
    if new.pair != old.pair:
        return f"policy is for pair {new.pair!r}, not {old.pair!r}"
    if new.feature_names != old.feature_names:
        return "feature names differ from the serving policy's"
    if not 0.0 < new.threshold < 1.0:
        return f"threshold {new.threshold} is outside (0, 1)"
    probe = np.random.default_rng(0).random((PROBE_ITEMS, len(new.feature_names)))
    scores = candidate.score(probe.astype(np.float32))
    if scores.shape != (PROBE_ITEMS,) or not np.all(np.isfinite(scores)):
        return "scores on a probe batch are not one finite number per item"
    return ""
