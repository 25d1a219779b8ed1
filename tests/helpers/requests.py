"""Request builders for the router, the edge node and the cloud service."""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt

from hybridmesh.cloud.v1 import cloud_service_pb2
from hybridmesh.common.v1 import model_pb2, routing_pb2
from hybridmesh.edge.v1 import edge_service_pb2
from hybridmesh.router.v1 import router_service_pb2
from services.tensors import encode_tensor
from tests.helpers.paths import EDGE_MODEL
from workload.fashion_mnist import load_split

CLOUD_MODEL = "fashion-cloud"


def router_request(
    image: npt.NDArray[np.uint8],
    privacy: int = routing_pb2.PRIVACY_CLASS_PUBLIC,
    preference: int = routing_pb2.ROUTE_PREFERENCE_AUTO,
) -> router_service_pb2.InferRequest:
    """A Fashion-MNIST request to the router (top 3)."""
    return router_service_pb2.InferRequest(
        model="fashion-mnist",
        inputs=[encode_tensor("image", image)],
        hints=routing_pb2.RoutingHints(privacy_class=privacy, preference=preference),  # type: ignore[arg-type]
        top_k=3,
    )


def edge_request(
    images: npt.NDArray[np.uint8], *, model: str = EDGE_MODEL, top_k: int = 3, version: str = ""
) -> edge_service_pb2.InferRequest:
    return edge_service_pb2.InferRequest(
        request_id="test-1",
        model=model_pb2.ModelRef(name=model, version=version),
        inputs=[encode_tensor("image", images)],
        top_k=top_k,
    )


@functools.cache
def _first_test_image() -> npt.NDArray[np.uint8]:
    return load_split("test").images[:1]


def cloud_request(
    images: npt.NDArray[np.uint8] | None = None,
    model: str = CLOUD_MODEL,
    *,
    version: str = "",
    privacy: int = routing_pb2.PRIVACY_CLASS_PUBLIC,
    anonymiser: str = "",
    top_k: int = 3,
) -> cloud_service_pb2.InferRequest:
    """A request to the cloud service (by default: the first test image)."""
    return cloud_service_pb2.InferRequest(
        request_id="c-1",
        model=model_pb2.ModelRef(name=model, version=version),
        inputs=[encode_tensor("image", _first_test_image() if images is None else images)],
        top_k=top_k,
        privacy_class=privacy,  # type: ignore[arg-type]
        anonymiser=anonymiser,
    )
