"""Thin gRPC adapter over EdgeInference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from edge_node.inference import EdgeInference
from hybridmesh.edge.v1 import edge_service_pb2, edge_service_pb2_grpc


class EdgeServicer(edge_service_pb2_grpc.EdgeServiceServicer):
    def __init__(self, inference: Callable[[], EdgeInference]) -> None:
        # A getter, because the models load after the server starts (health NOT_SERVING).
        self._inference = inference

    async def Infer(  # noqa: N802 (gRPC method name)
        self,
        request: edge_service_pb2.InferRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> edge_service_pb2.InferResponse:
        return await self._inference().infer(request)

    async def ListModels(  # noqa: N802 (gRPC method name)
        self,
        request: edge_service_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> edge_service_pb2.ListModelsResponse:
        return self._inference().list_models()
