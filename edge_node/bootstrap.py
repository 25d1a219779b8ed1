"""Before an edge node's first load: the promoted version of each served model that its
store lacks, fetched from the registry and verified (signature first, then every file).

No canary here: nothing is serving yet to compare a candidate with, and the operator's
signature is what vouches for it; every later update is canaried (``edge_node.updater``).
A version that does not verify is refused for good, as the updater refuses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from edge_node.updater import MODEL_KIND
from ota.artifacts import ArtifactRef
from ota.updates import SiteUpdates, VerificationError
from services.logging import get_logger

_log = get_logger("edge_node.bootstrap")


async def fetch_promoted(updates: SiteUpdates, store: Path, names: Sequence[str]) -> list[Path]:
    """Install into ``store`` the promoted version of each of ``names`` not installed
    there yet; the version directories installed."""
    installed = []
    for name in names:
        version = await updates.wanted(name, "")
        if version is None:
            continue
        ref = ArtifactRef(MODEL_KIND, name, version)
        target = store / name / str(version)
        if await asyncio.to_thread(target.is_dir):
            continue
        await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
        try:
            await updates.install(ref, target)
        except VerificationError as error:
            updates.refuse(ref)
            _log.warning("model fetch refused", model=name, version=version, reason=str(error))
            continue
        _log.info("model fetched before first load", model=name, version=version)
        installed.append(target)
    return installed
