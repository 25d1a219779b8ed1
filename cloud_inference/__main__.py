"""python -m cloud_inference: serve CloudService in front of Triton (HYBRIDMESH_CLOUD_*)."""

from __future__ import annotations

import asyncio
import os

from cloud_inference.app import CloudNode
from cloud_inference.config import CloudSettings
from services.environment import warn_unknown_variables
from services.logging import configure_logging
from services.server import serve_until_signalled
from services.telemetry import create_telemetry
from workload.triton_repository import cloud_models


async def _serve(settings: CloudSettings) -> None:
    telemetry = create_telemetry(
        settings.service_name, metrics_port=settings.metrics_port, metrics_host=settings.host
    )
    await serve_until_signalled(
        CloudNode(settings, telemetry, cloud_models(settings.catalog)), telemetry
    )


def main() -> None:
    settings = CloudSettings()
    configure_logging(settings.log_level)
    warn_unknown_variables(os.environ, settings.service_name)
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()
