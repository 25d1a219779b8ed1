"""Open Inference Protocol (KServe v2 gRPC) <-> the router's contract: conversions only.

Pure, like kserve's ``infer_type.py``: a ``ModelInferRequest`` becomes a router
``InferRequest`` (tensors, routing hints from the request ``parameters``), a router
``InferResponse`` becomes a ``ModelInferResponse`` (output tensors, the decision as
response ``parameters``). What the request means is decided by ``Router.infer`` and
nowhere else; this module only translates and names OIP fields in its errors.

The messages are tritonclient's generated ``inference`` package (Triton's published
``grpc_service.proto``): a second generated copy of the same proto package would
register duplicate symbols in protobuf's default pool in any process that also imports
tritonclient (the cloud service does). tritonclient ships no type information, so the
OIP messages are ``Any`` to mypy here.
"""

from __future__ import annotations

import difflib
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
from tritonclient.grpc import service_pb2 as oip

from hybridmesh.common.v1 import decision_pb2, routing_pb2, tensor_pb2
from hybridmesh.router.v1 import router_service_pb2
from services.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ServiceError,
    clip,
)
from services.tensors import DATATYPE_BY_KSERVE_NAME, DATATYPE_TO_NUMPY, KSERVE_NAMES

# tritonclient's generated messages carry no types (see the module docstring).
OipMessage: TypeAlias = Any

OIP_SERVICE_NAME = "inference.GRPCInferenceService"
PLATFORM = "hybridmesh-pair"  # ModelMetadata.platform: an edge/cloud pair behind a router

# Request parameters: the routing hints (routing.proto RoutingHints) and top_k.
PRIVACY_CLASS = "privacy_class"  # string: PUBLIC | INTERNAL | SENSITIVE
PREFERENCE = "preference"  # string: AUTO | EDGE_ONLY | CLOUD_ONLY
MAX_COST_MICROS = "max_cost_micros"  # int64: the most this request may cost
MAX_ERROR_PROBABILITY = "max_error_probability"  # double in [0, 1]: the quality target
BUDGET_MS = "budget_ms"  # int64: the routing budget when the call has no deadline
TOP_K = "top_k"  # int64: classes per item in the router's answer
# InferRequest.top_k is a uint32: a larger count could not even be built into the request.
MAX_TOP_K = 2**32 - 1
ATTRIBUTE_PREFIX = "attribute."  # string: attribute.<key> -> InferRequest.attributes[key]
REQUEST_PARAMETERS = (
    PRIVACY_CLASS,
    PREFERENCE,
    MAX_COST_MICROS,
    MAX_ERROR_PROBABILITY,
    BUDGET_MS,
    TOP_K,
)
# Triton's own request parameters: "priority" is accepted and ignored (one queue);
# the others are refused with what to use instead.
IGNORED_PARAMETERS = frozenset({"priority"})
REFUSED_PARAMETERS = {
    "timeout": "set a gRPC deadline (tritonclient: client_timeout) or budget_ms",
    "sequence_id": "model pairs are stateless; sequences are not supported",
    "sequence_start": "model pairs are stateless; sequences are not supported",
    "sequence_end": "model pairs are stateless; sequences are not supported",
}

# Response parameters: the decision (decision.proto Decision).
SERVED_BY = "served_by"  # EDGE | CLOUD | EDGE_AND_CLOUD
REASON = "reason"  # DecisionReason without its prefix, e.g. ESCALATED_HARD_CASE
EXPLANATION = "explanation"
ESCALATION_SCORE = "escalation_score"
THRESHOLD = "threshold"
POLICY_VERSION = "policy_version"
EDGE_MODEL = "edge_model"
EDGE_MODEL_VERSION = "edge_model_version"
CLOUD_MODEL = "cloud_model"
CLOUD_MODEL_VERSION = "cloud_model_version"
DEGRADED = "degraded"
DATA_LEFT_SITE = "data_left_site"
QUEUED_FOR_RECONCILIATION = "queued_for_reconciliation"
COST_CURRENCY = "cost_currency"
COST_EDGE_MICROS = "cost_edge_micros"
COST_CLOUD_MICROS = "cost_cloud_micros"
COST_ALL_CLOUD_MICROS = "cost_all_cloud_micros"
TRACE_ID = "trace_id"
ITEMS_SERVED_BY = "items_served_by"  # one tier per batch item, comma-separated
LATENCY_PREFIX = "latency_us_"  # latency_us_total, _policy, _edge, _classifier, _cloud

# Triton's classification extension: a requested output with this parameter is answered
# with a BYTES tensor of "probability:index:label" strings, top-k per item.
CLASSIFICATION = "classification"

_PRIVACY = {
    "PUBLIC": routing_pb2.PRIVACY_CLASS_PUBLIC,
    "INTERNAL": routing_pb2.PRIVACY_CLASS_INTERNAL,
    "SENSITIVE": routing_pb2.PRIVACY_CLASS_SENSITIVE,
}
_PREFERENCE = {
    "AUTO": routing_pb2.ROUTE_PREFERENCE_AUTO,
    "EDGE_ONLY": routing_pb2.ROUTE_PREFERENCE_EDGE_ONLY,
    "CLOUD_ONLY": routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY,
}
# The typed contents field each datatype travels in (FP16 only as raw bytes).
_CONTENTS_FIELD = {
    tensor_pb2.DATA_TYPE_BOOL: "bool_contents",
    tensor_pb2.DATA_TYPE_UINT8: "uint_contents",
    tensor_pb2.DATA_TYPE_INT8: "int_contents",
    tensor_pb2.DATA_TYPE_INT16: "int_contents",
    tensor_pb2.DATA_TYPE_INT32: "int_contents",
    tensor_pb2.DATA_TYPE_INT64: "int64_contents",
    tensor_pb2.DATA_TYPE_FP32: "fp32_contents",
    tensor_pb2.DATA_TYPE_FP64: "fp64_contents",
}


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str  # KServe v2 name
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True)
class PairMetadata:
    """What ModelMetadata says about a catalog pair: its shared input and output."""

    name: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True)
class ConvertedRequest:
    """A router request and what the OIP answer needs besides the router's response."""

    request: router_service_pb2.InferRequest
    raw_inputs: bool  # the tensors came as raw_input_contents (errors name those)
    outputs: tuple[str, ...]  # requested outputs in order; empty: every output
    classification: Mapping[str, int]  # output name -> top-k as classification strings
    # Where the request's top_k came from: the top_k parameter or an output's
    # classification count (the larger), so the router's limit error names it.
    top_k_field: str = 'parameters["top_k"]'


def parameter_field(name: str) -> str:
    return f'parameters["{clip(name)}"]'


def model_metadata(pair: PairMetadata) -> OipMessage:
    def tensors(specs: Sequence[TensorMetadata]) -> list[OipMessage]:
        return [
            oip.ModelMetadataResponse.TensorMetadata(
                name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
            )
            for spec in specs
        ]

    return oip.ModelMetadataResponse(
        name=pair.name,
        versions=[],
        platform=PLATFORM,
        inputs=tensors(pair.inputs),
        outputs=tensors(pair.outputs),
    )


def check_model(
    name: str, version: str, pairs: Mapping[str, PairMetadata], *, prefix: str
) -> PairMetadata:
    """The pair ``name`` names; ``prefix`` is how the request spells the fields
    (``model_`` in ModelInfer, nothing in ModelReady and ModelMetadata)."""
    if not name:
        raise InvalidArgumentError("required: a model pair name", field=f"{prefix}name")
    pair = pairs.get(name)
    if pair is None:
        raise NotFoundError(
            f"no model pair {clip(name)!r}; known: {sorted(pairs)}", field=f"{prefix}name"
        )
    if version:
        # A pair is served by two versioned models; which answered is in every response.
        raise NotFoundError(
            f"version {clip(version)!r}: a model pair has no versions of its own (leave it "
            "empty; the edge and cloud model versions come back in the response parameters)",
            field=f"{prefix}version",
        )
    return pair


def to_router_request(request: OipMessage, pairs: Mapping[str, PairMetadata]) -> ConvertedRequest:
    """The router request for ``request``; INVALID_ARGUMENT / NOT_FOUND name OIP fields."""
    pair = check_model(request.model_name, request.model_version, pairs, prefix="model_")
    hints, top_k, attributes = _hints(request.parameters)
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgumentError(
            f"{len(raw)} raw contents for {len(request.inputs)} inputs: give one per input, "
            "or use every input's contents instead",
            field="raw_input_contents",
        )
    tensors = [
        _input_tensor(tensor, raw[index] if raw else None, f"inputs[{index}]")
        for index, tensor in enumerate(request.inputs)
    ]
    known_outputs = {spec.name for spec in pair.outputs}
    outputs: list[str] = []
    classification: dict[str, int] = {}
    top_k_field = parameter_field(TOP_K)
    for index, wanted in enumerate(request.outputs):
        where = f"outputs[{index}]"
        if wanted.name not in known_outputs:
            raise InvalidArgumentError(
                f"unknown output {clip(wanted.name)!r}; {pair.name} has {sorted(known_outputs)}",
                field=f"{where}.name",
            )
        if wanted.name in outputs:
            raise InvalidArgumentError(
                f"output {clip(wanted.name)!r} asked twice", field=f"{where}.name"
            )
        outputs.append(wanted.name)
        for key, value in wanted.parameters.items():
            if key != CLASSIFICATION:
                raise InvalidArgumentError(
                    f"unknown output parameter; known: [{CLASSIFICATION!r}]",
                    field=f"{where}.{parameter_field(key)}",
                )
            count_field = f"{where}.{parameter_field(key)}"
            count = _integer(value, count_field, minimum=1, maximum=MAX_TOP_K)
            classification[wanted.name] = count
            if count > top_k:
                top_k, top_k_field = count, count_field
    return ConvertedRequest(
        router_service_pb2.InferRequest(
            request_id=request.id,
            model=pair.name,
            inputs=tensors,
            hints=hints,
            top_k=top_k,
            attributes=attributes,
        ),
        raw_inputs=bool(raw),
        outputs=tuple(outputs),
        classification=classification,
        top_k_field=top_k_field,
    )


def _hints(
    parameters: Mapping[str, OipMessage],
) -> tuple[routing_pb2.RoutingHints, int, dict[str, str]]:
    hints = routing_pb2.RoutingHints()
    top_k = 0
    attributes: dict[str, str] = {}
    for key, value in parameters.items():
        field = parameter_field(key)
        if key == PRIVACY_CLASS:
            hints.privacy_class = _choice(value, _PRIVACY, "PRIVACY_CLASS_", field)
        elif key == PREFERENCE:
            hints.preference = _choice(value, _PREFERENCE, "ROUTE_PREFERENCE_", field)
        elif key == MAX_COST_MICROS:
            hints.max_cost_micros = _integer(value, field, minimum=0)
        elif key == MAX_ERROR_PROBABILITY:
            probability = _number(value, field)
            if not 0.0 <= probability <= 1.0:
                raise InvalidArgumentError(f"{probability:g} is outside [0, 1]", field=field)
            hints.max_error_probability = probability
        elif key == BUDGET_MS:
            milliseconds = _integer(value, field, minimum=1, maximum=3_600_000)
            hints.budget.FromMilliseconds(milliseconds)
        elif key == TOP_K:
            top_k = _integer(value, field, minimum=1, maximum=MAX_TOP_K)
        elif key.startswith(ATTRIBUTE_PREFIX) and len(key) > len(ATTRIBUTE_PREFIX):
            attributes[key[len(ATTRIBUTE_PREFIX) :]] = _string(value, field)
        elif key in IGNORED_PARAMETERS:
            continue
        elif key in REFUSED_PARAMETERS:
            raise InvalidArgumentError(f"not supported: {REFUSED_PARAMETERS[key]}", field=field)
        else:
            raise InvalidArgumentError(_unknown_parameter(key), field=field)
    return hints, top_k, attributes


def _unknown_parameter(key: str) -> str:
    known = [*REQUEST_PARAMETERS, *IGNORED_PARAMETERS]
    nearest = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {nearest[0]!r}? " if nearest else ""
    return f"unknown parameter; {hint}known: {known} and {ATTRIBUTE_PREFIX}<key>"


def _kind(value: OipMessage) -> str | None:
    kind: str | None = value.WhichOneof("parameter_choice")
    return kind


def _string(value: OipMessage, field: str) -> str:
    if _kind(value) != "string_param":
        raise InvalidArgumentError(f"expected a string_param, got {_kind(value)}", field=field)
    text: str = value.string_param
    return text


def _choice(value: OipMessage, choices: Mapping[str, int], prefix: str, field: str) -> Any:
    text = _string(value, field).strip().upper()
    text = text.removeprefix(prefix)
    if text not in choices:
        raise InvalidArgumentError(
            f"unknown value {clip(_string(value, field))!r}; expected one of {sorted(choices)}",
            field=field,
        )
    return choices[text]


def _integer(value: OipMessage, field: str, *, minimum: int, maximum: int = 2**63 - 1) -> int:
    kind = _kind(value)
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgumentError(f"expected an int64_param, got {kind}", field=field)
    number = int(getattr(value, kind))
    if not minimum <= number <= maximum:
        raise InvalidArgumentError(f"{number} is outside {minimum}..{maximum}", field=field)
    return number


def _number(value: OipMessage, field: str) -> float:
    kind = _kind(value)
    if kind not in ("double_param", "int64_param", "uint64_param"):
        raise InvalidArgumentError(f"expected a double_param, got {kind}", field=field)
    number = float(getattr(value, kind))
    if not math.isfinite(number):
        raise InvalidArgumentError(f"{number} is not a finite number", field=field)
    return number


def _input_tensor(tensor: OipMessage, raw: bytes | None, where: str) -> tensor_pb2.Tensor:
    datatype = DATATYPE_BY_KSERVE_NAME.get(tensor.datatype)
    if datatype is None:
        raise InvalidArgumentError(
            f"unknown datatype {clip(tensor.datatype)!r}; known: {sorted(DATATYPE_BY_KSERVE_NAME)}",
            field=f"{where}.datatype",
        )
    if tensor.parameters:
        key = next(iter(tensor.parameters))
        raise InvalidArgumentError(
            "no input parameters are supported", field=f"{where}.{parameter_field(key)}"
        )
    has_contents = tensor.HasField("contents") and tensor.contents.ByteSize() > 0
    if raw is not None:
        if has_contents:
            raise InvalidArgumentError(
                "contents given beside raw_input_contents: use one or the other",
                field=f"{where}.contents",
            )
        contents = raw
    else:
        contents = _typed_contents(tensor, datatype, where)
    return tensor_pb2.Tensor(
        name=tensor.name, datatype=datatype, shape=list(tensor.shape), raw_contents=contents
    )


def _typed_contents(
    tensor: OipMessage, datatype: tensor_pb2.DataType.ValueType, where: str
) -> bytes:
    field_name = _CONTENTS_FIELD.get(datatype)
    if field_name is None:
        raise InvalidArgumentError(
            f"{KSERVE_NAMES[datatype]} travels only as raw_input_contents",
            field=f"{where}.contents",
        )
    field = f"{where}.contents.{field_name}"
    values = list(getattr(tensor.contents, field_name))
    dtype = DATATYPE_TO_NUMPY[datatype]
    if dtype.kind in "iu" and values:
        limits = np.iinfo(dtype.str)
        low, high = min(values), max(values)
        if low < limits.min or high > limits.max:
            raise InvalidArgumentError(
                f"values must fit {KSERVE_NAMES[datatype]} ({limits.min}..{limits.max}), "
                f"got {low}..{high}",
                field=field,
            )
    shape = list(tensor.shape)
    if shape and all(dim > 0 for dim in shape) and math.prod(shape) != len(values):
        raise InvalidArgumentError(
            f"expected {math.prod(shape)} values for shape {shape}, got {len(values)}", field=field
        )
    return np.asarray(values, dtype=dtype).tobytes()


# Router field -> OIP field, for errors Router.infer raises about a converted request.
_HINT_FIELDS = {
    "hints.privacy_class": PRIVACY_CLASS,
    "hints.preference": PREFERENCE,
    "hints.max_cost_micros": MAX_COST_MICROS,
    "hints.max_error_probability": MAX_ERROR_PROBABILITY,
    "hints.budget": BUDGET_MS,
    "top_k": TOP_K,
}
_RAW_FIELD = re.compile(r"^inputs\[(\d+)\]\.raw_contents$")


def oip_field(field: str, *, raw_inputs: bool, top_k_field: str | None = None) -> str:
    """How an OIP caller spells the router request's ``field``; ``top_k_field``: where
    the request's top_k came from (default the top_k parameter)."""
    if field == "top_k" and top_k_field is not None:
        return top_k_field
    if field in _HINT_FIELDS:
        return parameter_field(_HINT_FIELDS[field])
    if field == "model":
        return "model_name"
    if field == "request_id":
        return "id"
    match = _RAW_FIELD.match(field)
    if match:
        index = match.group(1)
        return f"raw_input_contents[{index}]" if raw_inputs else f"inputs[{index}].contents"
    return field


def renamed(
    error: ServiceError, *, raw_inputs: bool, top_k_field: str | None = None
) -> ServiceError:
    """``error`` with its field spelt as the OIP request spells it (same status)."""
    if error.field is None or not isinstance(
        error, InvalidArgumentError | NotFoundError | FailedPreconditionError
    ):
        return error
    field = oip_field(error.field, raw_inputs=raw_inputs, top_k_field=top_k_field)
    return error if field == error.field else type(error)(error.reason, field=field)


def to_model_infer_response(
    response: router_service_pb2.InferResponse, converted: ConvertedRequest
) -> OipMessage:
    """The OIP answer: the router's output tensors (as raw_output_contents, or
    classification strings where asked) and its decision as response parameters."""
    decision = response.decision
    by_name = {tensor.name: tensor for tensor in response.outputs}
    names = converted.outputs or tuple(by_name)
    reply = oip.ModelInferResponse(
        model_name=converted.request.model, model_version="", id=response.request_id
    )
    for name in names:
        tensor = by_name[name]
        count = converted.classification.get(name)
        if count is None:
            reply.outputs.append(
                oip.ModelInferResponse.InferOutputTensor(
                    name=name, datatype=KSERVE_NAMES[tensor.datatype], shape=list(tensor.shape)
                )
            )
            reply.raw_output_contents.append(tensor.raw_contents)
        else:
            rows = [
                [
                    f"{score.probability:.6f}:{score.class_index}:{score.label}".encode()
                    for score in prediction.classification.top_k[:count]
                ]
                for prediction in response.predictions
            ]
            width = min((len(row) for row in rows), default=0)
            reply.outputs.append(
                oip.ModelInferResponse.InferOutputTensor(
                    name=name, datatype="BYTES", shape=[len(rows), width]
                )
            )
            reply.raw_output_contents.append(
                b"".join(_bytes_element(item) for row in rows for item in row[:width])
            )
    for key, value in decision_parameters(decision, response.predictions).items():
        parameter = reply.parameters[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.string_param = value
    return reply


def _bytes_element(item: bytes) -> bytes:
    # Triton's BYTES layout: each element a 4-byte little-endian length, then its bytes.
    return struct.pack("<I", len(item)) + item


def decision_parameters(
    decision: decision_pb2.Decision, predictions: Sequence[router_service_pb2.Prediction]
) -> dict[str, str | int | float | bool]:
    """The decision as response parameters (names above)."""
    values: dict[str, str | int | float | bool] = {
        SERVED_BY: _tier(decision.served_by),
        REASON: decision_pb2.DecisionReason.Name(decision.reason).removeprefix("DECISION_REASON_"),
        EXPLANATION: decision.explanation,
        ESCALATION_SCORE: float(decision.escalation_score),
        THRESHOLD: float(decision.threshold),
        POLICY_VERSION: decision.policy_version,
        EDGE_MODEL: decision.edge_model.name,
        EDGE_MODEL_VERSION: decision.edge_model.version,
        CLOUD_MODEL: decision.cloud_model.name,
        CLOUD_MODEL_VERSION: decision.cloud_model.version,
        DEGRADED: decision.degraded,
        DATA_LEFT_SITE: decision.data_left_site,
        QUEUED_FOR_RECONCILIATION: decision.queued_for_reconciliation,
        COST_CURRENCY: decision.cost.currency_code,
        COST_EDGE_MICROS: int(decision.cost.edge_micros),
        COST_CLOUD_MICROS: int(decision.cost.cloud_micros),
        COST_ALL_CLOUD_MICROS: int(decision.cost.all_cloud_micros),
        TRACE_ID: decision.trace_id,
        ITEMS_SERVED_BY: ",".join(_tier(p.served_by) for p in predictions),
    }
    timings = decision.timings
    for stage in ("total", "policy", "edge", "classifier", "cloud"):
        if timings.HasField(stage):
            values[LATENCY_PREFIX + stage] = getattr(timings, stage).ToMicroseconds()
    return values


def _tier(tier: routing_pb2.Tier.ValueType) -> str:
    return routing_pb2.Tier.Name(tier).removeprefix("TIER_")
