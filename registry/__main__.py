"""python -m registry: serve the artifact registry (configured by HYBRIDMESH_REGISTRY_*)."""

from __future__ import annotations

import asyncio
import os

from registry.app import RegistryNode
from registry.config import RegistrySettings
from services.config import settings_from_environment
from services.environment import warn_unknown_variables
from services.logging import configure_logging
from services.server import serve_until_signalled
from services.telemetry import create_telemetry


async def _serve(settings: RegistrySettings) -> None:
    telemetry = create_telemetry(
        settings.service_name, metrics_port=settings.metrics_port, metrics_host=settings.host
    )
    await serve_until_signalled(RegistryNode(settings, telemetry), telemetry)


def main() -> None:
    settings = settings_from_environment(RegistrySettings)
    configure_logging(settings.log_level)
    warn_unknown_variables(os.environ, settings.service_name)
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()
