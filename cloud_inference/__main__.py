"""python -m cloud_inference: serve CloudService in front of Triton (HYBRIDMESH_CLOUD_*)."""

from __future__ import annotations

import asyncio
import os
from functools import partial

from cloud_inference.app import CloudNode
from cloud_inference.config import CloudSettings
from services.config import settings_from_environment
from services.environment import warn_unknown_variables
from services.logging import configure_logging
from services.server import serve_until_signalled
from services.telemetry import create_telemetry
from services.workers import WorkerPolicy, run_workers, worker_settings
from workload.triton_repository import cloud_models


async def _serve(settings: CloudSettings) -> None:
    telemetry = create_telemetry(
        settings.service_name, metrics_port=settings.metrics_port, metrics_host=settings.host
    )
    await serve_until_signalled(
        CloudNode(settings, telemetry, cloud_models(settings.catalog)), telemetry
    )


def _serve_worker(settings: CloudSettings, index: int, port: int) -> None:
    asyncio.run(_serve(worker_settings(settings, index, port)))


def _stop_timeout_s(settings: CloudSettings) -> float:
    # A worker's whole graceful stop, and a margin, before the parent kills it.
    return settings.shutdown_drain_delay_seconds + settings.shutdown_grace_seconds + 10.0


def main() -> None:
    settings = settings_from_environment(CloudSettings)
    configure_logging(settings.log_level)
    warn_unknown_variables(os.environ, settings.service_name)
    # Forks before any gRPC object exists (services/workers.py); one worker: no fork.
    # Workers share nothing: each has its own admission slots to Triton (max_in_flight
    # is per worker) and its own answer cache.
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
