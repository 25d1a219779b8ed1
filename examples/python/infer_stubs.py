"""Call hybridmesh's router with the generated Python stubs (RouterService.Infer).

    .venv/bin/hybridmesh up --detach --random-ports
    .venv/bin/python examples/python/infer_stubs.py --index 0
    .venv/bin/python examples/python/infer_stubs.py 127.0.0.1:50051 --index 0 --privacy SENSITIVE

The router's address is the first argument, else the running local mesh's (``endpoints``
in ``$HYBRIDMESH_STATE_DIR/state.json``, default ``var/mesh``). The image is one of the
Fashion-MNIST test images (Debian's ``dataset-fashion-mnist``). Prints the answer and the
router's decision, one ``name value`` pair a line, enums by name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc

from hybridmesh.common.v1 import decision_pb2, routing_pb2, tensor_pb2
from hybridmesh.router.v1 import router_service_pb2 as router
from hybridmesh.router.v1 import router_service_pb2_grpc
from workload.fashion_mnist import load_split


def router_address(given: str | None) -> str:
    """``given``, else the router of the local mesh in ``$HYBRIDMESH_STATE_DIR``."""
    if given:
        return given
    state = Path(os.environ.get("HYBRIDMESH_STATE_DIR", "var/mesh")) / "state.json"
    if not state.is_file():
        sys.exit(f"no router address given and no mesh is up ({state} is missing)")
    address: str = json.loads(state.read_text())["endpoints"]["router"]
    return address


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("router", nargs="?", help="host:port (default: the local mesh's)")
    parser.add_argument("--index", type=int, default=0, help="Fashion-MNIST test image")
    parser.add_argument(
        "--privacy",
        choices=["PUBLIC", "INTERNAL", "SENSITIVE"],
        default="PUBLIC",
        help="the request's privacy class (SENSITIVE never leaves the site)",
    )
    args = parser.parse_args()
    image = load_split("test").images[args.index : args.index + 1]  # uint8 [1, 1, 28, 28]
    request = router.InferRequest(
        model="fashion-mnist",  # a model pair from models/catalog.toml
        inputs=[
            tensor_pb2.Tensor(
                name="image",
                datatype=tensor_pb2.DATA_TYPE_UINT8,  # 4x smaller than FP32
                shape=list(image.shape),
                raw_contents=image.tobytes(),
            )
        ],
        hints=routing_pb2.RoutingHints(
            privacy_class=routing_pb2.PrivacyClass.Value(f"PRIVACY_CLASS_{args.privacy}")
        ),
        top_k=3,
    )
    with grpc.insecure_channel(router_address(args.router)) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        reply = stub.Infer(request, timeout=5.0)  # always set a deadline
    best = reply.predictions[0].classification.top_k[0]
    decision = reply.decision
    print("label", f"{best.label} (class {best.class_index}, p={best.probability:.3f})")
    print("served_by", routing_pb2.Tier.Name(decision.served_by))
    print("reason", decision_pb2.DecisionReason.Name(decision.reason))
    print("escalation_score", f"{decision.escalation_score:.3f}")
    print("threshold", f"{decision.threshold:.3f}")
    for tier, model in (("edge_model", decision.edge_model), ("cloud_model", decision.cloud_model)):
        print(tier, f"{model.name} v{model.version}" if model.name else "- (did not run)")
    print("policy_version", decision.policy_version)
    print("degraded", decision.degraded)
    print("data_left_site", decision.data_left_site)
    print("cost_cloud_micros", decision.cost.cloud_micros)
    print("trace_id", decision.trace_id)


if __name__ == "__main__":
    main()
