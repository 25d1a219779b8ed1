"""One site's updates of one artifact kind, the steps every updater shares: is there a
version to move to (an operator-signed, current promotion statement: ``ota.promotions``),
fetch it verified (signature first, then every file) into its place, and refuse a version
for good. What "loads" and "is good enough" mean stays with the updater (the edge
canaries a model, the router checks a policy's compatibility)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ota.artifacts import ArtifactError, ArtifactRef
from ota.fetch import ArtifactSource, fetch_verified
from ota.promotions import PromotionError, PromotionGuard, verify_promotion
from ota.refused import RefusedVersions
from ota.signatures import SignatureError
from services.logging import get_logger

DOWNLOADS_DIR = "downloads"
_log = get_logger("ota.updates")


class VerificationError(Exception):
    """The candidate's signature or one of its files did not verify."""


class SiteUpdates:
    """Updates of artifacts of ``kind`` from ``source``; ``staging`` holds downloads in
    progress, the refused versions (``refused.json``) and the highest promotion
    statement accepted per artifact (``promotions.json``)."""

    def __init__(
        self,
        source: ArtifactSource,
        kind: str,
        staging: Path,
        trusted: Mapping[str, Ed25519PublicKey],
    ) -> None:
        self.source = source
        self.kind = kind
        self._downloads = staging / DOWNLOADS_DIR
        self._trusted = trusted
        staging.mkdir(parents=True, exist_ok=True)
        self.refused = RefusedVersions(staging)
        self.promotions = PromotionGuard(staging)
        # Why the last statement seen for a name was refused ("" once one is accepted).
        self.statement_refusals: dict[str, str] = {}

    async def wanted(self, name: str, serving: str) -> int | None:
        """The promoted version of ``name``, when an operator-signed statement that is
        not stale says so and that version is neither serving nor refused."""
        signed = await self.source.promotion(self.kind, name)
        if signed is None:
            return None
        try:
            promotion = verify_promotion(self._trusted, signed, self.kind, name)
            self.promotions.check(promotion, int(serving) if serving.isdigit() else None)
        except PromotionError as error:
            if self.statement_refusals.get(name) != str(error):
                # Once per statement, not at every poll.
                _log.warning(
                    "promotion statement refused", kind=self.kind, name=name, reason=str(error)
                )
            self.statement_refusals[name] = str(error)
            return None
        self.promotions.accept(promotion)
        self.statement_refusals[name] = ""
        if str(promotion.version) == serving:
            return None
        return None if self.refused.is_refused(name, promotion.version) else promotion.version

    async def install(self, ref: ArtifactRef, target: Path) -> dict[str, float]:
        """Fetch ``ref`` verified and move it to ``target``, unless it is there already;
        the download and verify times. VerificationError when it does not verify."""
        if await asyncio.to_thread(target.is_dir):
            return {}
        try:
            fetched = await fetch_verified(self.source, ref, self._downloads, self._trusted)
        except (SignatureError, ArtifactError) as error:
            raise VerificationError(f"verification failed: {error}") from None
        await asyncio.to_thread(shutil.move, fetched.directory, target)
        return {"download": fetched.download_s, "verify": fetched.verify_s}

    def refuse(self, ref: ArtifactRef) -> None:
        self.refused.add(ref.name, ref.version)
