"""Thin gRPC adapter over CloudInference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from cloud_inference.inference import CloudInference
from hybridmesh.cloud.v1 import cloud_service_pb2, cloud_service_pb2_grpc


class CloudServicer(cloud_service_pb2_grpc.CloudServiceServicer):
    def __init__(self, inference: Callable[[], CloudInference], ready: Callable[[], bool]) -> None:
        self._inference = inference
        self._ready = ready

    async def Infer(  # noqa: N802 (gRPC method name)
        self,
        request: cloud_service_pb2.InferRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> cloud_service_pb2.InferResponse:
        return await self._inference().infer(request, context.time_remaining())

    async def ListModels(  # noqa: N802 (gRPC method name)
        self,
        request: cloud_service_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> cloud_service_pb2.ListModelsResponse:
        return self._inference().list_models(self._ready())
