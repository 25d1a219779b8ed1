"""python -m router_service: the front door at an edge site (HYBRIDMESH_ROUTER_*)."""

from __future__ import annotations

import asyncio
import os
from functools import partial

from edge_node.config import EdgeSettings
from router_service.app import RouterNode, pairs_from_catalog
from router_service.config import RouterSettings
from services.environment import warn_unknown_variables
from services.logging import configure_logging
from services.server import serve_until_signalled
from services.telemetry import create_telemetry
from services.workers import WorkerPolicy, run_workers


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


def _serve_worker(settings: RouterSettings, index: int, port: int) -> None:
    asyncio.run(_serve(settings.for_worker(index, port)))


def _stop_timeout_s(settings: RouterSettings) -> float:
    # A worker's whole graceful stop, and a margin, before the parent kills it.
    return settings.shutdown_drain_delay_seconds + settings.shutdown_grace_seconds + 10.0


def main() -> None:
    settings = RouterSettings()
    configure_logging(settings.log_level)
    warn_unknown_variables(os.environ, settings.service_name)
    # Forks before any gRPC object exists (services/workers.py); one worker: no fork.
    code = run_workers(
        partial(_serve_worker, settings),
        workers=settings.workers,
        host=settings.host,
        port=settings.port,
        policy=WorkerPolicy(stop_timeout_s=_stop_timeout_s(settings)),
    )
    raise SystemExit(code)


if __name__ == "__main__":
    main()
