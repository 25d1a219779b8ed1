"""One site's updates of one artifact kind, the steps every updater shares: is there a
version to move to, fetch it verified (signature first, then every file) into its place,
and refuse a version for good. What "loads" and "is good enough" mean stays with the
updater (the edge canaries a model, the router checks a policy's compatibility)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ota.artifacts import ArtifactError, ArtifactRef
from ota.fetch import ArtifactSource, fetch_verified
from ota.refused import RefusedVersions
from ota.signatures import SignatureError

DOWNLOADS_DIR = "downloads"


class VerificationError(Exception):
    """The candidate's signature or one of its files did not verify."""


class SiteUpdates:
    """Updates of artifacts of ``kind`` from ``source``; ``staging`` holds downloads in
    progress and the refused versions (``refused.json``)."""

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

    async def wanted(self, name: str, serving: str) -> int | None:
        """The promoted version of ``name``, when it is neither serving nor refused."""
        promoted = await self.source.promoted(self.kind, name)
        if promoted is None or str(promoted) == serving:
            return None
        return None if self.refused.is_refused(name, promoted) else promoted

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
