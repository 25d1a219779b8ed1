"""Call hybridmesh's router with ``tritonclient.grpc``: the Open Inference Protocol
(KServe v2, ``inference.GRPCInferenceService``) on the router's port, no hybridmesh stubs.

    .venv/bin/hybridmesh up --detach --random-ports
    .venv/bin/python examples/python/infer_oip.py --index 0
    .venv/bin/python examples/python/infer_oip.py 127.0.0.1:50051 --index 0 --privacy SENSITIVE

The router's address is the first argument, else the running local mesh's (``endpoints``
in ``$HYBRIDMESH_STATE_DIR/state.json``, default ``var/mesh``). Routing hints go in the
request's ``parameters``; the router's decision comes back in the response's. Prints the
answer and every decision parameter, one ``name value`` pair a line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import tritonclient.grpc as triton

from workload.fashion_mnist import LABELS, load_split


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
    client = triton.InferenceServerClient(router_address(args.router))
    tensor = triton.InferInput("image", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    result = client.infer(
        "fashion-mnist",  # a model pair from models/catalog.toml
        [tensor],
        parameters={"privacy_class": args.privacy},
        client_timeout=5.0,  # always set a deadline (seconds)
    )
    logits = result.as_numpy("logits")[0]
    print("label", f"{LABELS[int(logits.argmax())]} (class {int(logits.argmax())})")
    for name, value in sorted(result.get_response().parameters.items()):
        print(name, getattr(value, value.WhichOneof("parameter_choice")))
    client.close()


if __name__ == "__main__":
    main()
