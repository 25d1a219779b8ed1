"""Run inside a smoke-test container (``podman exec -i <ctr> python - ARGS < this file``):
gRPC health of the given local ports, and with ``--infer`` one Infer through the router.
Prints one JSON object; exits 0 whatever it found (the caller judges)."""

import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def health(port: str) -> str:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.RpcError as error:
        return f"ERROR {error.code().name}"


def infer(port: str) -> dict[str, object]:
    import numpy as np

    from hybridmesh.common.v1 import routing_pb2
    from hybridmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
    from services.tensors import encode_tensor

    images = np.load("/app/models/golden/fashion-edge.npz")["images"][:4]
    request = router_service_pb2.InferRequest(
        model="fashion-mnist",
        inputs=[encode_tensor("image", images)],
        hints=routing_pb2.RoutingHints(preference=routing_pb2.ROUTE_PREFERENCE_EDGE_ONLY),
        top_k=1,
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = router_service_pb2_grpc.RouterServiceStub(channel).Infer(request, timeout=10)
    return {
        "served_by": sorted({routing_pb2.Tier.Name(p.served_by) for p in reply.predictions}),
        "classes": [p.classification.top_k[0].class_index for p in reply.predictions],
        "data_left_site": reply.decision.data_left_site,
    }


def main(args: list[str]) -> None:
    result: dict[str, object] = {}
    for arg in args:
        if arg.startswith("--infer="):
            try:
                result["infer"] = infer(arg.split("=", 1)[1])
            except Exception as error:  # reported, judged by the caller
                result["infer"] = {"error": f"{type(error).__name__}: {error}"[:500]}
        else:
            result[arg] = health(arg)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
