"""The audit trail at the CLI's default level: ``hybridmesh up`` runs every service at
"warning", and one CLOUD_ONLY request still leaves exactly one record in the router's
audit log and one in the cloud's intake log (issue 16: both stayed at 0 bytes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from hybridmesh.common.v1 import routing_pb2
from hybridmesh.router.v1 import router_service_pb2_grpc
from router_service.audit import content_sha256
from tests.helpers.requests import router_request
from workload.fashion_mnist import load_split

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def records(path: str) -> list[dict[str, object]]:
    file = Path(path)
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []


def test_one_cloud_only_request_leaves_one_audit_and_one_intake_record(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}

    def hybridmesh(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "localmesh.cli", "--state-dir", str(tmp_path), *arguments],
            cwd=REPO,
            env=environment,
            check=True,
            timeout=120,
            capture_output=True,
            text=True,
        )

    hybridmesh("up", "--detach", "--random-ports")  # the CLI's default level
    try:
        state = json.loads((tmp_path / "state.json").read_text())
        logs = state["audit_logs"]
        assert records(logs["router_audit"]) == [] and records(logs["cloud_intake"]) == []
        request = router_request(
            load_split("test").images[:1], preference=routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY
        )
        request.request_id = "audit-default-level"
        with grpc.insecure_channel(state["endpoints"]["router"]) as channel:
            reply = router_service_pb2_grpc.RouterServiceStub(channel).Infer(request, timeout=10)
        assert reply.decision.served_by == routing_pb2.TIER_CLOUD
        assert reply.decision.data_left_site
        # Written before the reply (before the bytes left / before validation): no waiting.
        audit = records(logs["router_audit"])
        intake = records(logs["cloud_intake"])
        # The services really ran at "warning": their own logs hold no info line.
        router_log = Path(state["logs"]["router"]).read_text().splitlines()
        assert not [line for line in router_log if '"level": "info"' in line]
    finally:
        hybridmesh("down")
    assert [(r["request_id"], r["purpose"], r["stream"]) for r in audit] == [
        ("audit-default-level", "cloud-only", "audit")
    ]
    assert audit[0]["content_sha256"] == content_sha256(request.inputs)
    assert audit[0]["privacy_class"] == "PRIVACY_CLASS_PUBLIC"
    assert [(r["request_id"], r["stream"], r["reconciliation"]) for r in intake] == [
        ("audit-default-level", "intake", False)
    ]
