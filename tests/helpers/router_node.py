"""A router's settings for tests: port 0, the committed policy and catalog, its own
outbox and audit log."""

from __future__ import annotations

import tempfile
from pathlib import Path

from router_service.config import RouterSettings
from tests.helpers.paths import POLICY_ROOT, REPO

# The site token the router presents to the cloud (the test clouds accept it).
TOKEN = "site-token"


def router_settings(edge: str, cloud: str, **overrides: object) -> RouterSettings:
    values: dict[str, object] = {
        "port": 0,
        "edge_target": edge,
        "cloud_target": cloud,
        "cloud_site_token": TOKEN,
        "policies_dir": POLICY_ROOT.parent,
        "catalog": REPO / "models" / "catalog.toml",
        "shutdown_grace_seconds": 0.0,
    }
    # Each router gets its own outbox and audit log (tests pass their own to share them).
    state = Path(tempfile.mkdtemp(prefix="hybridmesh-router-"))
    values["outbox_path"] = state / "outbox.sqlite"
    values["audit_log_path"] = state / "audit.log"
    values.update(overrides)
    return RouterSettings.model_validate(values)
