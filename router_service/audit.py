"""The audit trail of off-site transfers: one JSON line per request body that leaves the
site, on its own sink (``services.records``: a file on the site's volume, or stdout while
the service's own logs go to stderr), written whatever the log level and before the
bytes go out. A transfer that cannot be recorded does not happen."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from hybridmesh.common.v1 import routing_pb2, tensor_pb2
from router_service.tier_api import NotSent, TierUnavailableError
from services.errors import clip
from services.records import RecordSink, RecordWriteError

AUDIT_STREAM = "audit"


def content_sha256(tensors: Sequence[tensor_pb2.Tensor]) -> str:
    """Hash of exactly what is uploaded (after the anonymiser), so a transfer can be
    matched against what the cloud stored."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.SerializeToString(deterministic=True))
    return digest.hexdigest()


class TransferAudit:
    def __init__(self, sink: RecordSink, destination: str) -> None:
        self._sink = sink
        self._destination = destination

    def record(
        self,
        *,
        request_id: str,
        privacy_class: routing_pb2.PrivacyClass.ValueType,
        anonymiser: str,
        tensors: Sequence[tensor_pb2.Tensor],
        purpose: str,
        regions_blurred: int = 0,
    ) -> None:
        """Write the record; if it cannot be written (already logged and counted by the
        sink), the cloud attempt fails before sending (``TierUnavailableError`` with no
        code: nothing left the site), so the router answers from the edge or queues."""
        try:
            self._sink.write(
                "off-site transfer",
                request_id=request_id,
                privacy_class=routing_pb2.PrivacyClass.Name(privacy_class),
                anonymiser=anonymiser,
                regions_blurred=regions_blurred,
                content_sha256=content_sha256(tensors),
                destination=self._destination,
                purpose=purpose,
                items=int(tensors[0].shape[0]) if tensors and tensors[0].shape else 0,
            )
        except RecordWriteError as error:
            raise TierUnavailableError(
                "cloud", None, f"not audited, so not sent: {error.message}", failure=NotSent
            ) from error

    def record_not_sent(self, *, request_id: str, reason: str) -> None:
        """The transfer audited for ``request_id`` never left: the cloud could not be
        reached at all (name, connection or TLS failure), so no byte was sent."""
        self._sink.write(
            "off-site transfer not sent",
            request_id=request_id,
            destination=self._destination,
            reason=clip(reason),
        )
