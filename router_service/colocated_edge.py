"""The edge tier in the router's own process (``edge_mode = "in-process"``).

At a co-located site the router runs the edge model itself, with the edge node's domain
code as a library: an ``EdgeNode`` (its verified model store, its over-the-air updater,
its admin service and health on its own port, its ``edge.infer`` span) started inside
the router process, called without a gRPC hop. The remote edge node stays for sites
where the model runs on another box; both implement ``tier_api.EdgeTierApi``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from edge_node.app import EdgeNode
from hybridmesh.common.v1 import tensor_pb2
from hybridmesh.edge.v1 import edge_service_pb2
from router_service.breaker import CircuitBreaker
from router_service.latency import RollingLatency
from router_service.tier_api import TierAnswer, TierHealth
from router_service.tiers import LocalCallError, edge_infer_request, guarded_call
from services.errors import ServiceError


class InProcessEdgeTier:
    """``EdgeTierApi`` over an ``EdgeNode`` in this process."""

    def __init__(self, node: EdgeNode, breaker: CircuitBreaker) -> None:
        self.node = node
        self.breaker = breaker
        self.latency = RollingLatency()
        self.health = TierHealth()

    async def infer(
        self,
        *,
        request_id: str,
        model: str,
        inputs: Sequence[tensor_pb2.Tensor],
        top_k: int,
        timeout_s: float,
        views: Sequence[str] = (),
    ) -> TierAnswer:
        request = edge_infer_request(request_id, model, inputs, top_k, views)

        async def send() -> edge_service_pb2.InferResponse:
            try:
                # asyncio.timeout, not wait_for: no extra task per call (Python 3.11).
                async with asyncio.timeout(timeout_s):
                    return await self.node.inference().infer(request)
            except TimeoutError:
                raise LocalCallError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "edge model did not answer in time"
                ) from None
            except ServiceError as error:
                raise LocalCallError(error.code, error.message) from error

        response, elapsed = await guarded_call("edge", self.breaker, send, timeout_s=timeout_s)
        self.latency.observe(elapsed)
        return TierAnswer(response.model, response.outputs, response.classifications, elapsed)
