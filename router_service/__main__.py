"""python -m router_service: the front door at an edge site (HYBRIDMESH_ROUTER_*)."""

from __future__ import annotations

import asyncio
import os
from functools import partial

from edge_node.config import EdgeSettings
from router_service.app import RouterNode, pairs_from_catalog
from router_service.config import RouterSettings
from router_service.outbox import stranded
from services.config import settings_from_environment
from services.environment import warn_unknown_variables
from services.logging import configure_logging, get_logger
from services.server import serve_until_signalled
from services.telemetry import create_telemetry
from services.workers import WorkerPolicy, run_workers


async def _serve(settings: RouterSettings) -> None:
    telemetry = create_telemetry(
        settings.service_name, metrics_port=settings.metrics_port, metrics_host=settings.host
    )
    # A co-located edge reads its own HYBRIDMESH_EDGE_* settings.
    edge_settings = (
        settings_from_environment(EdgeSettings) if settings.edge_mode == "in-process" else None
    )
    node = RouterNode(
        settings, telemetry, pairs_from_catalog(settings.catalog), edge_settings=edge_settings
    )
    await serve_until_signalled(node, telemetry)


def _serve_worker(settings: RouterSettings, index: int, port: int) -> None:
    asyncio.run(_serve(settings.for_worker(index, port)))


def _stop_timeout_s(settings: RouterSettings) -> float:
    # A worker's whole graceful stop, and a margin, before the parent kills it.
    return settings.shutdown_drain_delay_seconds + settings.shutdown_grace_seconds + 10.0


def warn_stranded_outboxes(settings: RouterSettings) -> list[str]:
    """Log (and return) a warning per outbox file no worker will drain: its queued
    escalations would never reach the cloud (not moved automatically: say it, loudly)."""
    in_use = [
        settings.for_worker(index, settings.port).outbox_path for index in range(settings.workers)
    ]
    warnings = [
        f"{path} holds {depth} queued item(s) that no worker drains (written with a "
        f"different workers count; this router runs {settings.workers}): restart with that "
        "count to drain it"
        for path, depth in stranded(settings.outbox_path, in_use)
    ]
    for warning in warnings:
        get_logger("router_service").warning("stranded outbox", detail=warning)
    return warnings


def main() -> None:
    settings = settings_from_environment(RouterSettings)
    configure_logging(settings.log_level)
    warn_unknown_variables(os.environ, settings.service_name)
    warn_stranded_outboxes(settings)
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
