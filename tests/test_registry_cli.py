"""The operator's CLI against a real registry process: keygen, publish, promote, list,
rollback, and a clear error for a version that does not exist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.load import ServerProcess
from services.access_rules import OPERATOR
from tests.helpers.credentials import make_credentials
from tests.helpers.ota_site import COMMITTED_STORE, make_version
from tests.helpers.paths import EDGE_MODEL

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localmesh.cli", "registry", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_publish_promote_list_and_rollback(tmp_path: Path) -> None:
    keys, root = tmp_path / "keys", tmp_path / "registry"
    assert cli("keygen", "--keys", str(keys)).returncode == 0
    v2 = make_version(tmp_path / "publisher", 2)
    for version, source in ((1, COMMITTED_STORE / EDGE_MODEL / "1"), (2, v2)):
        published = cli(
            "publish", "--root", str(root), "--keys", str(keys),
            "--name", EDGE_MODEL, "--version", str(version), str(source),
        )  # fmt: skip
        assert published.returncode == 0, published.stderr
        assert f"published model {EDGE_MODEL} v{version}" in published.stdout
    credentials = make_credentials(tmp_path / "credentials")
    registry = ServerProcess(
        ["-m", "registry"],
        env={
            "HYBRIDMESH_REGISTRY_PORT": "{port}",
            "HYBRIDMESH_REGISTRY_ROOT": str(root),
            "HYBRIDMESH_REGISTRY_TOKEN_SHA256": json.dumps(credentials.hashes([OPERATOR])),
        },
    )
    token = ("--token-file", str(credentials.token_file(OPERATOR)))
    try:
        await registry.wait_serving()
        target = ("--registry", registry.address, "--name", EDGE_MODEL, *token)
        signed = (*target, "--keys", str(keys))
        assert cli("promote", *signed, "--version", "1").returncode == 0
        assert cli("promote", *signed, "--version", "2").returncode == 0
        listed = cli("list", "--registry", registry.address, *token)
        missing = cli("promote", *signed, "--version", "9")
        rolled = cli("rollback", *signed)
        after = cli("list", "--registry", registry.address, *token)
        anonymous = cli("list", "--registry", registry.address)
    finally:
        registry.stop()
    assert f"{EDGE_MODEL}" in listed.stdout and "[1, 2] promoted 2" in listed.stdout
    assert missing.returncode == 1
    assert "NOT_FOUND: artifact.version" in missing.stderr
    assert "v1 again" in rolled.stdout and "[1, 2] promoted 1" in after.stdout
    assert anonymous.returncode == 1 and "UNAUTHENTICATED" in anonymous.stderr
