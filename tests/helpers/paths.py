"""Where the tests find the repository's committed artifacts."""

from __future__ import annotations

from pathlib import Path

from router_service.escalation import latest_policy

REPO = Path(__file__).resolve().parents[2]
STORE = REPO / "models" / "store"
EDGE_MODEL = "fashion-edge"
POLICY_ROOT = REPO / "models" / "policies" / "fashion-mnist"
# The fashion-mnist policy version the router serves from the repository (the newest).
SERVED_POLICY_VERSION = latest_policy(POLICY_ROOT).name
