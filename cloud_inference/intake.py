"""The cloud's own record of what arrived from edge sites: one JSON line per Infer call,
written before validation, so a request the cloud refuses (SENSITIVE data, say) is on
record too. Off unless a path is configured (it costs a write per request)."""

from __future__ import annotations

from typing import TextIO

from hybridmesh.cloud.v1 import cloud_service_pb2
from hybridmesh.common.v1 import routing_pb2
from services.logging import stream_logger
from services.validation import enum_name


class IntakeLog:
    def __init__(self, stream: TextIO) -> None:
        self._log = stream_logger(stream, "intake")

    def record(self, request: cloud_service_pb2.InferRequest) -> None:
        self._log.info(
            "infer received",
            request_id=request.request_id,
            privacy_class=enum_name(routing_pb2.PrivacyClass.DESCRIPTOR, request.privacy_class),
            anonymiser=request.anonymiser,
            reconciliation=request.reconciliation,
            model=request.model.name,
        )
