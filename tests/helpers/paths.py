"""Where the tests find the repository's committed artifacts."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STORE = REPO / "models" / "store"
EDGE_MODEL = "fashion-edge"
POLICY_ROOT = REPO / "models" / "policies" / "fashion-mnist"
