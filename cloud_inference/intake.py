"""The cloud's own record of what arrived from edge sites: one JSON line per Infer call,
written before validation, so a request the cloud refuses (SENSITIVE data, say) is on
record too. On its own sink (``services.records``), whatever the log level. Off unless a
path is configured (it costs a write per request); when on, a call that cannot be
recorded is refused with UNAVAILABLE."""

from __future__ import annotations

from hybridmesh.cloud.v1 import cloud_service_pb2
from hybridmesh.common.v1 import routing_pb2
from services.errors import clip
from services.records import RecordSink
from services.validation import enum_name

INTAKE_STREAM = "intake"


class IntakeLog:
    def __init__(self, sink: RecordSink) -> None:
        self._sink = sink

    def record(self, request: cloud_service_pb2.InferRequest) -> None:
        """Raises ``RecordWriteError`` (UNAVAILABLE) when the record cannot be written."""
        self._sink.write(
            "infer received",
            # Caller strings, not validated yet: cut short (a valid one is never cut).
            request_id=clip(request.request_id),
            privacy_class=enum_name(routing_pb2.PrivacyClass.DESCRIPTOR, request.privacy_class),
            anonymiser=clip(request.anonymiser),
            reconciliation=request.reconciliation,
            model=clip(request.model.name),
        )
