"""cloud-inference says why it is not serving (issue 20 #5): with Triton unreachable it
stays NOT_SERVING and logs the reason once per change, not at every poll."""

from __future__ import annotations

import asyncio
import socket

from structlog.testing import capture_logs

from tests.test_cloud_support import NOT_SERVING, cloud_settings, start_cloud


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_unreachable_triton_is_logged_once_with_the_reason() -> None:
    url = f"127.0.0.1:{_closed_port()}"
    with capture_logs() as logs:
        cloud = await start_cloud(cloud_settings(url, health_poll_s=0.05), wait_ready=False)
        try:
            await asyncio.sleep(0.5)  # several polls
            assert await cloud.health() == NOT_SERVING
            with_reason = [e for e in logs if e["event"] == "not serving"]
            assert len(with_reason) == 1, with_reason
            assert f"Triton at {url} unreachable" in with_reason[0]["reason"]
            assert "UNAVAILABLE" in with_reason[0]["reason"]
        finally:
            await cloud.stop()
