"""What the router needs from a tier, as interfaces.

``tiers.py`` implements them over gRPC (the edge node, the cloud service behind Envoy);
tests drive the router through the same clients against scripted servers. Keeping the
router's sequencing on these types is what lets it be tested without Triton.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from hybridmesh.common.v1 import model_pb2, routing_pb2, tensor_pb2
from router_service.breaker import CircuitBreaker
from router_service.latency import RollingLatency
from services.errors import RETRY_PUSHBACK_METADATA_KEY


@dataclass(frozen=True)
class TierAnswer:
    """A tier's answer: the model version that ran, its outputs ([n, ...] tensors, one row
    per item sent), top-k per item, and the call's wall time in seconds."""

    model: model_pb2.ModelRef
    outputs: Sequence[tensor_pb2.Tensor]
    classifications: Sequence[model_pb2.Classification]
    elapsed_s: float


# What gRPC says when a call failed before any connection carried it: the address did
# not resolve, the connection was refused, or the TLS handshake failed (grpcio 1.81's
# core messages; tests/test_router_unreachable_cloud.py pins them against real failures).
NEVER_CONNECTED_MARKERS = ("failed to connect to all addresses", "errors resolving ")


class Failure(enum.Enum):
    """How a tier attempt failed, as far as the data is concerned."""

    # The router refused the call itself (breaker open, tier known down): nothing sent.
    REFUSED = "refused"
    # It could not be sent: the peer was never reached (name, connection, TLS) or the
    # transfer could not be audited. Nothing left the site.
    NOT_SENT = "not-sent"
    # Sent, and the call failed or timed out.
    FAILED = "failed"


NotSent = Failure.NOT_SENT


class TierUnavailableError(Exception):
    """A tier could not answer. ``code`` is the gRPC status when a call was made (None
    when the router refused it itself); ``failure`` says whether any data left."""

    def __init__(
        self,
        tier: str,
        code: grpc.StatusCode | None,
        detail: str,
        *,
        failure: Failure | None = None,
        retry_pushback_s: float | None = None,
    ) -> None:
        super().__init__(f"{tier}: {detail}")
        self.tier = tier
        self.code = code
        self.detail = detail
        # The peer's gRFC A6 retry pushback (grpc-retry-pushback-ms), in seconds.
        self.retry_pushback_s = retry_pushback_s
        self.failure = failure or (Failure.REFUSED if code is None else Failure.FAILED)

    @property
    def sent(self) -> bool:
        return self.failure is Failure.FAILED

    @property
    def refused(self) -> bool:
        """The router refused the call itself (nothing was attempted)."""
        return self.failure is Failure.REFUSED


def retry_pushback_s(trailing_metadata: object) -> float | None:
    """The gRFC A6 pushback (``grpc-retry-pushback-ms``) in a call's trailing metadata,
    in seconds; None when absent or not a non-negative integer (A6: then do not wait)."""
    if not isinstance(trailing_metadata, Iterable):
        return None
    for key, value in trailing_metadata:
        if key == RETRY_PUSHBACK_METADATA_KEY:
            text = value.decode() if isinstance(value, bytes) else str(value)
            return int(text) / 1e3 if text.isdigit() else None
    return None


def never_connected(code: grpc.StatusCode, detail: str) -> bool:
    """True when a failed call never reached the peer, so none of its data left.

    Only gRPC's own message counts, which starts with the marker: a peer that was reached
    may quote an inner failure ("Triton unreachable: failed to connect to all addresses")
    and the data did reach it."""
    return code == grpc.StatusCode.UNAVAILABLE and detail.startswith(NEVER_CONNECTED_MARKERS)


class TierHealth:
    """The tier's own grpc.health.v1 as seen by the router's health watch.

    Unknown (no check yet) is not down. ``known_down`` after ``DOWN_AFTER`` failed
    checks in a row, so one slow check on a busy host does not take a tier out.
    """

    DOWN_AFTER = 2

    def __init__(self) -> None:
        self.up: bool | None = None
        self._consecutive_down = 0

    def observe(self, up: bool) -> bool:
        """Record one check; True when this check makes the tier known to be down."""
        was_down = self.known_down
        self.up = up
        self._consecutive_down = 0 if up else self._consecutive_down + 1
        return self.known_down and not was_down

    @property
    def known_down(self) -> bool:
        return self._consecutive_down >= self.DOWN_AFTER


class EdgeTierApi(Protocol):
    breaker: CircuitBreaker
    latency: RollingLatency
    health: TierHealth

    async def infer(
        self,
        *,
        request_id: str,
        model: str,
        inputs: Sequence[tensor_pb2.Tensor],
        top_k: int,
        timeout_s: float,
        views: Sequence[str] = (),
    ) -> TierAnswer: ...


class CloudTierApi(Protocol):
    breaker: CircuitBreaker
    latency: RollingLatency
    health: TierHealth

    async def infer(
        self,
        *,
        request_id: str,
        model: str,
        inputs: Sequence[tensor_pb2.Tensor],
        top_k: int,
        timeout_s: float,
        privacy_class: routing_pb2.PrivacyClass.ValueType,
        anonymiser: str,
        purpose: str = "escalation",
        reconciliation: bool = False,
        background: bool = False,
    ) -> TierAnswer: ...
