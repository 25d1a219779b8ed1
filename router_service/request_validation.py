"""What the router accepts: a model pair from the catalog, its input contract, hints.

Pure; raises ``ServiceError``s naming the field (INVALID_ARGUMENT / NOT_FOUND /
FAILED_PRECONDITION), mapped to gRPC statuses by the kernel's interceptor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from hybridmesh.router.v1 import router_service_pb2
from router_service.policy import RequestConstraints
from services.errors import InvalidArgumentError, NotFoundError, clip
from services.request_ids import check_request_id
from services.tensors import DataTypeValue, decode_tensor


@dataclass(frozen=True)
class PairSpec:
    """A model pair as the router needs it: names, input contract, labels."""

    name: str
    edge_model: str
    cloud_model: str
    input_name: str
    input_datatype: DataTypeValue
    input_shape: tuple[int, ...]
    # True when the models output probabilities rather than logits.
    outputs_probabilities: bool = False
    # What runs on INTERNAL data before it leaves the site.
    anonymiser: str = "strip-attributes"


def validate_request(
    request: router_service_pb2.InferRequest,
    pairs: Mapping[str, PairSpec],
    *,
    max_top_k: int,
    max_batch_size: int,
) -> tuple[PairSpec, npt.NDArray[np.generic], RequestConstraints]:
    """The request's pair, its input as an [n, ...] array of the pair's dtype, and its
    constraints (hints with UNSPECIFIED resolved)."""
    check_request_id(request.request_id)
    if not request.model:
        raise InvalidArgumentError("required: a model pair name", field="model")
    pair = pairs.get(request.model)
    if pair is None:
        raise NotFoundError(
            f"no model pair {clip(request.model)!r}; known: {sorted(pairs)}", field="model"
        )
    if request.top_k > max_top_k:
        raise InvalidArgumentError(
            f"{request.top_k} exceeds the limit of {max_top_k}", field="top_k"
        )
    if len(request.inputs) != 1:
        raise InvalidArgumentError(
            f"expected exactly one input tensor {pair.input_name!r}, got {len(request.inputs)}",
            field="inputs",
        )
    if request.inputs[0].name != pair.input_name:
        raise InvalidArgumentError(
            f"expected input {pair.input_name!r}, got {clip(request.inputs[0].name)!r}",
            field="inputs[0].name",
        )
    inputs = decode_tensor(
        request.inputs[0],
        "inputs[0]",
        expected_datatype=pair.input_datatype,
        expected_shape=pair.input_shape,
        max_batch_size=max_batch_size,
    )
    return pair, inputs, RequestConstraints.from_hints(request.hints)
