"""python -m router_service: the front door at an edge site (HYBRIDMESH_ROUTER_*)."""

from __future__ import annotations

import asyncio
import os

from edge_node.config import EdgeSettings
from router_service.app import RouterNode, pairs_from_catalog
from router_service.config import RouterSettings
from services.environment import warn_unknown_variables
from services.logging import configure_logging
from services.server import serve_until_signalled
from services.telemetry import create_telemetry


async def _serve(settings: RouterSettings) -> None:
    telemetry = create_telemetry(
        settings.service_name, metrics_port=settings.metrics_port, metrics_host=settings.host
    )
    # A co-located edge reads its own HYBRIDMESH_EDGE_* settings.
    edge_settings = EdgeSettings() if settings.edge_mode == "in-process" else None
    node = RouterNode(
        settings, telemetry, pairs_from_catalog(settings.catalog), edge_settings=edge_settings
    )
    await serve_until_signalled(node, telemetry)


def main() -> None:
    settings = RouterSettings()
    configure_logging(settings.log_level)
    warn_unknown_variables(os.environ, settings.service_name)
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()
