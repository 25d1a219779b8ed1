"""What every edge site reports it serves: the fleet's version mix, kept on disk."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ota.artifacts import KINDS
from ota.registry_client import SiteServes
from services.logging import get_logger
from services.validation import TIMESTAMP_MAX_SECONDS, TIMESTAMP_MIN_SECONDS

SITES_FILE = "sites.json"

_log = get_logger("registry.sites")


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
            self._load()

    def _load(self) -> None:
        """Every valid record; a bad one is logged and skipped, so one record (or a
        damaged file) cannot break every listing."""
        try:
            records = json.loads(self._path.read_text())
        except (OSError, ValueError) as error:
            _log.error(
                "site book unreadable; starting empty", path=str(self._path), error=str(error)
            )
            return
        if not isinstance(records, list):
            _log.error("site book is not a list; starting empty", path=str(self._path))
            return
        for index, raw in enumerate(records):
            try:
                report = _parse_report(raw)
            except (KeyError, TypeError, ValueError) as error:
                _log.error(
                    "site record skipped", path=str(self._path), index=index, error=str(error)
                )
                continue
            self._reports[report.site] = report

    def record(self, report: SiteReport) -> None:
        """A site's edge node reports its models and its router its policies: a report
        replaces the site's entries of the kinds it lists and keeps the others."""
        previous = self._reports.get(report.site)
        if previous is not None:
            kinds = {served.kind for served in report.served}
            kept = tuple(s for s in previous.served if s.kind not in kinds)
            report = SiteReport(report.site, kept + report.served, report.reported_at)
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


def _parse_report(raw: Any) -> SiteReport:
    """One stored record, checked as strictly as a report arriving over the wire."""
    site = raw["site"]
    if not isinstance(site, str) or not site:
        raise ValueError(f"site {site!r} is not a site id")
    reported_at = raw["reported_at"]
    if (
        isinstance(reported_at, bool)
        or not isinstance(reported_at, int | float)
        or not math.isfinite(reported_at)
        or not TIMESTAMP_MIN_SECONDS <= reported_at <= TIMESTAMP_MAX_SECONDS + 1
    ):
        raise ValueError(f"reported_at {reported_at!r} is not a time in years 1..9999")
    served = []
    for entry in raw["served"]:
        kind, name, version = entry["kind"], entry["name"], entry["version"]
        refused = tuple(entry["refused_versions"])
        if kind not in KINDS or not isinstance(name, str):
            raise ValueError(f"served entry {entry!r} has no known kind and a name")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (version, *refused)):
            raise ValueError(f"served entry {entry!r} has a version that is not an integer")
        served.append(SiteServes(kind, name, version, refused))
    return SiteReport(site, tuple(served), float(reported_at))
