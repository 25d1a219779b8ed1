"""Thin gRPC adapter: the operator's EdgeAdminService over the edge updater."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import grpc

from edge_node.local_models import LocalModels
from edge_node.updater import EdgeUpdater, UpdateReport
from hybridmesh.edge.v1 import edge_admin_pb2 as pb
from hybridmesh.edge.v1 import edge_admin_pb2_grpc
from services.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
    clip,
)
from workload.model_store import ModelStoreError, versions

RECENT_EVENTS = 50

Context = grpc.aio.ServicerContext[Any, Any]


class UpdateEvents:
    """The most recent update events, kept for GetUpdateStatus."""

    def __init__(self) -> None:
        self.recent: deque[pb.UpdateEvent] = deque(maxlen=RECENT_EVENTS)

    def record(self, report: UpdateReport) -> pb.UpdateEvent:
        event = to_event(report)
        self.recent.append(event)
        return event


def to_event(report: UpdateReport) -> pb.UpdateEvent:
    event = pb.UpdateEvent(
        model=report.model,
        version=report.version,
        outcome=report.outcome,
        reason=report.reason,
        previous_version=report.previous_version,
        timings_ms={step: seconds * 1e3 for step, seconds in report.timings_s.items()},
    )
    event.at.GetCurrentTime()
    return event


class EdgeAdminServicer(edge_admin_pb2_grpc.EdgeAdminServiceServicer):
    def __init__(
        self,
        site: str,
        updater: Callable[[], EdgeUpdater | None],
        models: Callable[[], LocalModels | None],
        events: UpdateEvents,
    ) -> None:
        self._site = site
        self._updater = updater
        self._models = models
        self._events = events

    def _ready(self) -> tuple[EdgeUpdater, LocalModels]:
        updater, models = self._updater(), self._models()
        if models is None:
            raise UnavailableError("models are still loading")
        if updater is None:
            raise FailedPreconditionError("over-the-air updates are not configured here")
        return updater, models

    async def GetUpdateStatus(  # noqa: N802 (gRPC method name)
        self, request: pb.GetUpdateStatusRequest, context: Context
    ) -> pb.GetUpdateStatusResponse:
        updater, models = self._ready()
        return pb.GetUpdateStatusResponse(
            site=self._site,
            models=[
                pb.ModelUpdateStatus(
                    model=model.name,
                    serving_version=model.version,
                    installed_versions=versions(updater.store / model.name),
                    refused_versions=updater.refused.of(model.name),
                )
                for model in models.all()
            ],
            recent_events=list(self._events.recent),
        )

    async def CheckForUpdates(  # noqa: N802 (gRPC method name)
        self, request: pb.CheckForUpdatesRequest, context: Context
    ) -> pb.CheckForUpdatesResponse:
        updater, _ = self._ready()
        reports = await updater.poll_once()
        return pb.CheckForUpdatesResponse(events=[to_event(r) for r in reports])

    async def Rollback(  # noqa: N802 (gRPC method name)
        self, request: pb.RollbackRequest, context: Context
    ) -> pb.RollbackResponse:
        updater, models = self._ready()
        if request.model not in {m.name for m in models.all()}:
            raise InvalidArgumentError(f"{clip(request.model)!r} is not served here", field="model")
        try:
            report = await updater.rollback(request.model)
        except ModelStoreError as error:
            raise FailedPreconditionError(str(error), field="model") from None
        return pb.RollbackResponse(event=to_event(report))
