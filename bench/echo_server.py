"""The baseline: a bare grpc.aio EdgeService whose Infer echoes its inputs back.

Same contract, same payload, no kernel, no model: what gRPC in Python costs by itself.
``python -m bench.echo_server --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc

from hybridmesh.edge.v1 import edge_service_pb2, edge_service_pb2_grpc


class EchoServicer(edge_service_pb2_grpc.EdgeServiceServicer):
    async def Infer(  # noqa: N802 (gRPC method name)
        self, request: edge_service_pb2.InferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> edge_service_pb2.InferResponse:
        return edge_service_pb2.InferResponse(
            request_id=request.request_id, model=request.model, outputs=request.inputs
        )

    async def ListModels(  # noqa: N802 (gRPC method name)
        self,
        request: edge_service_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> edge_service_pb2.ListModelsResponse:
        return edge_service_pb2.ListModelsResponse()


async def serve(port: int) -> None:
    server = grpc.aio.server()
    edge_service_pb2_grpc.add_EdgeServiceServicer_to_server(EchoServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
