"""The over-the-air bench runs against the real control plane (token + signed promotion):
it broke silently once when the registry started to require both, because no test ran it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(180)


def test_one_round_switches_the_edge_node_to_the_promoted_version(tmp_path: Path) -> None:
    out = tmp_path / "ota_bench.json"
    subprocess.run(
        [sys.executable, "-m", "bench.ota_bench", "--rounds", "1", "--out", str(out)],
        cwd=REPO,
        check=True,
        timeout=170,
    )
    report = json.loads(out.read_text())
    assert len(report["rounds"]) == 1
    assert set(report["median_ms"]) >= {"download", "verify", "load", "canary", "switch"}
    assert all(value >= 0 for value in report["median_ms"].values())
