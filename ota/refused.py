"""The versions a site refused: kept on disk, so a refused version is never retried, not
even after a restart, and never blocks a newer one."""

from __future__ import annotations

import json
import os
from pathlib import Path

REFUSED_FILE = "refused.json"


class RefusedVersions:
    """Refused versions by artifact name, written through to ``<directory>/refused.json``
    (``{"<name>": [versions...]}``)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / REFUSED_FILE
        self._versions: dict[str, set[int]] = {}
        if self.path.exists():
            loaded = json.loads(self.path.read_text())
            self._versions = {name: set(found) for name, found in loaded.items()}

    def of(self, name: str) -> tuple[int, ...]:
        return tuple(sorted(self._versions.get(name, ())))

    def is_refused(self, name: str, version: int) -> bool:
        return version in self._versions.get(name, ())

    def add(self, name: str, version: int) -> None:
        self._versions.setdefault(name, set()).add(version)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        document = {n: sorted(v) for n, v in self._versions.items()}
        temporary.write_text(json.dumps(document) + "\n")
        os.replace(temporary, self.path)  # atomic: a crash leaves the old or the new list
