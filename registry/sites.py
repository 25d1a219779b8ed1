"""What every edge site reports it serves: the fleet's version mix, kept on disk."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ota.registry_client import SiteServes

SITES_FILE = "sites.json"


@dataclass(frozen=True)
class SiteReport:
    site: str
    served: tuple[SiteServes, ...]
    reported_at: float  # unix seconds


class SiteBook:
    """The latest report per site; written through to ``<root>/sites.json``."""

    def __init__(self, root: Path) -> None:
        self._path = root / SITES_FILE
        self._reports: dict[str, SiteReport] = {}
        if self._path.exists():
            for raw in json.loads(self._path.read_text()):
                served = tuple(
                    SiteServes(s["kind"], s["name"], s["version"], tuple(s["refused_versions"]))
                    for s in raw["served"]
                )
                self._reports[raw["site"]] = SiteReport(raw["site"], served, raw["reported_at"])

    def record(self, report: SiteReport) -> None:
        self._reports[report.site] = report
        self._path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text(json.dumps([asdict(r) for r in self.reports()], indent=1) + "\n")
        os.replace(temporary, self._path)

    def reports(self) -> list[SiteReport]:
        return [self._reports[site] for site in sorted(self._reports)]

    def version_mix(self) -> dict[tuple[str, str, int], int]:
        """(kind, name, version) -> how many sites serve it."""
        mix: dict[tuple[str, str, int], int] = {}
        for report in self._reports.values():
            for served in report.served:
                key = (served.kind, served.name, served.version)
                mix[key] = mix.get(key, 0) + 1
        return mix
