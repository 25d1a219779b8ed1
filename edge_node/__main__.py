"""python -m edge_node: serve the local model store (configured by HYBRIDMESH_EDGE_*)."""

from __future__ import annotations

import asyncio
import os

from edge_node.app import EdgeNode
from edge_node.config import EdgeSettings
from services.config import settings_from_environment
from services.environment import warn_unknown_variables
from services.logging import configure_logging
from services.server import serve_until_signalled
from services.telemetry import create_telemetry


async def _serve(settings: EdgeSettings) -> None:
    telemetry = create_telemetry(
        settings.service_name, metrics_port=settings.metrics_port, metrics_host=settings.host
    )
    await serve_until_signalled(EdgeNode(settings, telemetry), telemetry)


def main() -> None:
    settings = settings_from_environment(EdgeSettings)
    configure_logging(settings.log_level)
    warn_unknown_variables(os.environ, settings.service_name)
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()
