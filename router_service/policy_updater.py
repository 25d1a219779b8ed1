"""Over-the-air updates of a pair's router policy (escalation classifier + threshold).

The registry serves policies as artifacts of kind ``router-policy`` named after the pair.
A promoted version that differs from the serving one is downloaded and verified like an
edge model (signed manifest, every file's sha256), installed under the pair's policy root,
loaded (``EscalationClassifier`` checks the classifier's own sha256 against policy.json)
and checked against the serving policy: same pair, same features, a threshold in (0, 1)
and finite scores on a probe batch. Then ``install`` swaps it in. A version that fails is
refused and never retried, not even after a restart: fetching, verifying and the refused
versions (``<staging>/refused.json``) are the OTA client library's (``ota.updates``), as
for the edge node's models. Whether a policy is *better* is decided before it is published
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

from ota.artifacts import ArtifactRef
from ota.fetch import ArtifactSource
from ota.refused import RefusedVersions
from ota.updates import SiteUpdates, VerificationError
from router_service.escalation import (
    DEFAULT_POLICY_VERSION,
    PolicyArtifactError,
    ScoringPolicy,
    load_policy,
)
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
        current: Callable[[], ScoringPolicy],
        install: Callable[[ScoringPolicy], None],
    ) -> None:
        self._updates = SiteUpdates(source, POLICY_KIND, staging, trusted)
        self._pair = pair
        self._root = policy_root
        self._current = current
        self._install = install

    @property
    def refused(self) -> RefusedVersions:
        return self._updates.refused

    async def poll_once(self) -> PolicyUpdate | None:
        wanted = await self._updates.wanted(self._pair, self._current().version)
        return None if wanted is None else await self.apply(wanted)

    async def apply(self, version: int) -> PolicyUpdate:
        ref = ArtifactRef(POLICY_KIND, self._pair, version)
        serving = self._current()
        target = self._root / str(version)
        try:
            timings = await self._updates.install(ref, target)
        except VerificationError as error:
            return self._refuse(ref, str(error), serving)
        started = time.perf_counter()
        try:
            candidate = await asyncio.to_thread(load_policy, target)
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

    def _refuse(self, ref: ArtifactRef, reason: str, serving: ScoringPolicy) -> PolicyUpdate:
        self._updates.refuse(ref)
        _log.warning("router policy refused", pair=ref.name, version=ref.version, reason=reason)
        return PolicyUpdate(ref.name, ref.version, "refused", reason, serving.version)


def check_compatible(serving: ScoringPolicy, candidate: ScoringPolicy) -> str:
    """Why ``candidate`` may not replace ``serving``, or "" when it may. A pair served by
    the max-softmax default has no features to compare against: any policy for the
    pair whose scores check out may replace it."""
    new, old = candidate.metadata, serving.metadata
    if new.pair != old.pair:
        return f"policy is for pair {new.pair!r}, not {old.pair!r}"
    if old.version != DEFAULT_POLICY_VERSION and new.feature_names != old.feature_names:
        return "feature names differ from the serving policy's"
    if not 0.0 < new.threshold < 1.0:
        return f"threshold {new.threshold} is outside (0, 1)"
    probe = np.random.default_rng(0).random((PROBE_ITEMS, max(len(new.feature_names), 1)))
    scores = candidate.score(probe.astype(np.float32))
    if scores.shape != (PROBE_ITEMS,) or not np.all(np.isfinite(scores)):
        return "scores on a probe batch are not one finite number per item"
    return ""
