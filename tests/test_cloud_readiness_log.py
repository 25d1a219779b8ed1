"""cloud-inference says why it is not serving (issue 20 #5): with Triton unreachable it
stays NOT_SERVING and logs the reason once per change, not at every poll."""

from __future__ import annotations

import socket

import pytest
from structlog.testing import capture_logs

from tests.helpers.cloud_service import NOT_SERVING, cloud_settings, start_cloud, triton_checks
from tests.helpers.waiting import eventually


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_unreachable_triton_is_logged_once_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"127.0.0.1:{_closed_port()}"
    with capture_logs() as logs:
        cloud = await start_cloud(cloud_settings(url, health_poll_s=0.05), wait_ready=False)
        checks = triton_checks(cloud.node, monkeypatch)
        try:
            await eventually(lambda: checks() >= 5)  # several polls
            assert await cloud.health() == NOT_SERVING
            with_reason = [e for e in logs if e["event"] == "not serving"]
            assert len(with_reason) == 1, with_reason
            assert f"Triton at {url} unreachable" in with_reason[0]["reason"]
            assert "UNAVAILABLE" in with_reason[0]["reason"]
        finally:
            await cloud.stop()
