"""Test servicers for the kernel tests: they exercise services/, not a product service.

The EdgeService contract is reused so the tests run over real generated stubs; what
the handlers do is chosen by ``model.name`` to drive one kernel behaviour each.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from hybridmesh.common.v1 import model_pb2
from hybridmesh.edge.v1 import edge_service_pb2, edge_service_pb2_grpc
from services.errors import InvalidArgumentError, ResourceExhaustedError
from services.logging import get_logger

_log = get_logger("tests.kernel")


class ScriptedEdgeServicer(edge_service_pb2_grpc.EdgeServiceServicer):
    """Answers Infer according to the requested model name.

    - "echo": returns the request id.
    - "slow": signals ``entered``, waits for ``release``, then answers.
    - "invalid": raises InvalidArgumentError on field "inputs[0].shape".
    - "overloaded": raises ResourceExhaustedError with a retry pushback.
    - "bug": raises a plain RuntimeError.
    - "forward": calls ``downstream`` (another EdgeService) and returns its answer.
    """

    def __init__(
        self, downstream: edge_service_pb2_grpc.EdgeServiceAsyncStub | None = None
    ) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0
        self._downstream = downstream

    async def Infer(  # noqa: N802 (gRPC method name)
        self,
        request: edge_service_pb2.InferRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> edge_service_pb2.InferResponse:
        self.calls += 1
        _log.info("handling infer", request_id=request.request_id, model=request.model.name)
        name = request.model.name
        if name == "slow":
            self.entered.set()
            await self.release.wait()
        elif name == "invalid":
            raise InvalidArgumentError("expected [n,1,28,28], got [1,28]", field="inputs[0].shape")
        elif name == "overloaded":
            raise ResourceExhaustedError("queue full", retry_after_ms=250)
        elif name == "bug":
            raise RuntimeError("secret internal detail")
        elif name == "forward":
            assert self._downstream is not None
            forwarded = edge_service_pb2.InferRequest(
                request_id=request.request_id, model=model_pb2.ModelRef(name="echo")
            )
            response: edge_service_pb2.InferResponse = await self._downstream.Infer(
                forwarded, timeout=5
            )
            return response
        return edge_service_pb2.InferResponse(
            request_id=request.request_id, model=model_pb2.ModelRef(name=name, version="1")
        )

    async def ListModels(  # noqa: N802 (gRPC method name)
        self,
        request: edge_service_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> edge_service_pb2.ListModelsResponse:
        return edge_service_pb2.ListModelsResponse()
