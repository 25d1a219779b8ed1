"""What the router needs from a tier, as interfaces.

``tiers.py`` implements them over gRPC (the edge node, the cloud service behind Envoy);
tests drive the router through the same clients against scripted servers. Keeping the
router's sequencing on these types is what lets it be tested without Triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from hybridmesh.common.v1 import model_pb2, routing_pb2, tensor_pb2
from router_service.breaker import CircuitBreaker
from router_service.latency import RollingLatency


@dataclass(frozen=True)
class TierAnswer:
    """A tier's answer: the model version that ran, its outputs ([n, ...] tensors, one row
    per item sent), top-k per item, and the call's wall time in seconds."""

    model: model_pb2.ModelRef
    outputs: Sequence[tensor_pb2.Tensor]
    classifications: Sequence[model_pb2.Classification]
    elapsed_s: float


class TierUnavailableError(Exception):
    """A tier could not answer. ``code`` is None when nothing was sent (breaker open, or
    the tier's health check reports it down); then no data left for that attempt."""

    def __init__(self, tier: str, code: grpc.StatusCode | None, detail: str) -> None:
        super().__init__(f"{tier}: {detail}")
        self.tier = tier
        self.code = code
        self.detail = detail

    @property
    def sent(self) -> bool:
        return self.code is not None


class TierHealth:
    """The tier's own grpc.health.v1 as last seen by the router's health watch.

    ``up`` is None until the first check: unknown is not down, so the tier is tried.
    """

    def __init__(self) -> None:
        self.up: bool | None = None

    @property
    def known_down(self) -> bool:
        return self.up is False


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
