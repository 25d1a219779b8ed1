"""CPU time of server processes from ``/proc/<pid>/stat`` (utime + stime), for "CPU
microseconds per request": read before and after a load phase, divide by the requests.

A service with several workers (services/workers.py) counts as its parent plus its live
children; a child that exits during the phase takes its CPU time with it (the kernel adds
it to the parent's cutime only when reaped), so phases should not span restarts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (resolution: one clock tick, 10 ms).
    ProcessLookupError if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    # Fields after the command name (which may hold spaces): state is field 3, utime 14.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (from /proc/<pid>/task/*/children)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return children


def service_cpu_s(pid: int) -> float:
    """CPU seconds of a service: ``pid`` and its children (its workers)."""
    total = process_cpu_s(pid)
    for child in child_pids(pid):
        try:
            total += process_cpu_s(child)
        except ProcessLookupError:
            continue
    return total


@dataclass
class CpuMeter:
    """CPU seconds used by named services between ``start()`` and ``per_request_us()``."""

    pids: Mapping[str, int]
    _started: dict[str, float] | None = None

    def start(self) -> None:
        self._started = {name: service_cpu_s(pid) for name, pid in self.pids.items()}

    def per_request_us(self, requests: int) -> dict[str, float]:
        """Service name -> CPU microseconds per request since ``start()``."""
        if self._started is None:
            raise RuntimeError("CpuMeter.start() was not called")
        if requests <= 0:
            raise ValueError(f"requests must be positive, got {requests}")
        return {
            name: (service_cpu_s(pid) - self._started[name]) / requests * 1e6
            for name, pid in self.pids.items()
        }
