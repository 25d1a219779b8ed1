"""Process-group inspection from /proc (orphans left behind, zombies)."""

from __future__ import annotations

from pathlib import Path


def process_group(pgid: int) -> dict[int, str]:
    """pid -> state letter of every process in group ``pgid`` (from /proc)."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            members[int(entry.name)] = fields[0]
    return members


def alive(pids: list[int]) -> list[int]:
    """The pids that still run. A zombie has exited; reaping it is its parent's job."""
    running = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            running.append(pid)
    return running


def children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found
