"""A site's first versions, from the image.

At a site a versioned root (``<root>/<name>/<version>/``: the edge node's model store, the
router's policy roots) lives on a writable volume that starts empty, and the image ships a
read-only copy of the versions it was built with. Seeding copies the image's newest
version of each name that has no version on the volume yet. A name with any version on
the volume is left alone: what over-the-air updates and rollbacks installed there wins
over the image, and a restart never undoes it. A copy is staged beside its place and
renamed, so a reader never sees half a version; the services verify what they load.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from workload.model_store import versions

STAGING_PREFIX = ".seed-"


def seed_versions(seed: Path, root: Path, names: Sequence[str] = ()) -> list[Path]:
    """Copy into ``root`` the newest version under ``seed`` of each of ``names`` (every
    name in ``seed`` when empty) that has no version in ``root``; the directories made.
    A missing ``seed`` seeds nothing."""
    if not seed.is_dir():
        return []
    wanted = list(names) or sorted(p.name for p in seed.iterdir() if p.is_dir())
    seeded = []
    for name in wanted:
        available = versions(seed / name)
        if not available or versions(root / name):
            continue
        source = seed / name / str(available[-1])
        target = root / name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f"{STAGING_PREFIX}*"):  # an interrupted seed
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target.parent))
        shutil.copytree(source, staging, dirs_exist_ok=True)
        staging.rename(target)
        seeded.append(target)
    return seeded
