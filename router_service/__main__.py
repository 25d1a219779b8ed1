"""python -m router_service: the front door at an edge site (HYBRIDMESH_ROUTER_*)."""

from __future__ import annotations

import asyncio

from router_service.app import RouterNode, pairs_from_catalog
from router_service.config import RouterSettings
from services.logging import configure_logging
from services.server import serve_until_signalled
from services.telemetry import create_telemetry


async def _serve(settings: RouterSettings) -> None:
    telemetry = create_telemetry(settings.service_name)
    await serve_until_signalled(
        RouterNode(settings, telemetry, pairs_from_catalog(settings.catalog)), telemetry
    )


def main() -> None:
    settings = RouterSettings()
    configure_logging(settings.log_level)
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()
