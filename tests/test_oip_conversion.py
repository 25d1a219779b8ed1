"""The Open Inference Protocol conversions, without a socket: parameters -> hints,
typed contents -> raw bytes, router fields -> OIP fields, the decision -> parameters."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as oip

from hybridmesh.common.v1 import decision_pb2, model_pb2, routing_pb2, tensor_pb2
from hybridmesh.router.v1 import router_service_pb2
from router_service.oip_conversion import (
    PairMetadata,
    TensorMetadata,
    decision_parameters,
    oip_field,
    renamed,
    to_model_infer_response,
    to_router_request,
)
from services.errors import InvalidArgumentError, ServiceError

PAIRS = {
    "pair": PairMetadata(
        "pair",
        (TensorMetadata("image", "UINT8", (-1, 2)),),
        (TensorMetadata("logits", "FP32", (-1, 3)),),
    )
}


def request(**parameters: object) -> oip.ModelInferRequest:
    message = oip.ModelInferRequest(model_name="pair", id="r1")
    tensor = message.inputs.add(name="image", datatype="UINT8", shape=[1, 2])
    tensor.contents.uint_contents.extend([7, 255])
    for key, value in parameters.items():
        if isinstance(value, str):
            message.parameters[key].string_param = value
        elif isinstance(value, bool):
            message.parameters[key].bool_param = value
        elif isinstance(value, int):
            message.parameters[key].int64_param = value
        elif isinstance(value, float):
            message.parameters[key].double_param = value
    return message


def field_of(message: oip.ModelInferRequest) -> str:
    with pytest.raises(ServiceError) as error:
        to_router_request(message, PAIRS)
    assert error.value.field is not None
    return error.value.field


def test_parameters_become_hints_and_typed_contents_raw_bytes() -> None:
    converted = to_router_request(
        request(
            privacy_class="sensitive",
            preference="ROUTE_PREFERENCE_EDGE_ONLY",
            max_cost_micros=5,
            max_error_probability=0.05,
            budget_ms=250,
            top_k=2,
            priority=3,
            **{"attribute.camera": "door"},
        ),
        PAIRS,
    )
    routed = converted.request
    assert routed.model == "pair" and routed.request_id == "r1" and routed.top_k == 2
    assert routed.hints.privacy_class == routing_pb2.PRIVACY_CLASS_SENSITIVE
    assert routed.hints.preference == routing_pb2.ROUTE_PREFERENCE_EDGE_ONLY
    assert routed.hints.max_cost_micros == 5
    assert routed.hints.max_error_probability == pytest.approx(0.05)
    assert routed.hints.budget.ToMilliseconds() == 250
    assert dict(routed.attributes) == {"camera": "door"}
    assert routed.inputs[0].raw_contents == bytes([7, 255])
    assert routed.inputs[0].datatype == tensor_pb2.DATA_TYPE_UINT8
    assert not converted.raw_inputs


def test_bad_parameters_and_contents_name_the_oip_field() -> None:
    assert field_of(request(privacy="PUBLIC")) == 'parameters["privacy"]'
    assert field_of(request(timeout=5)) == 'parameters["timeout"]'
    assert field_of(request(top_k="3")) == 'parameters["top_k"]'
    assert field_of(request(max_error_probability=1.5)) == 'parameters["max_error_probability"]'
    too_big = request()
    too_big.inputs[0].contents.uint_contents[1] = 256
    assert field_of(too_big) == "inputs[0].contents.uint_contents"
    short = request()
    del short.inputs[0].contents.uint_contents[1]
    assert field_of(short) == "inputs[0].contents.uint_contents"
    mixed = request()
    mixed.raw_input_contents.append(b"\x00\x00")
    assert field_of(mixed) == "inputs[0].contents"
    versioned = request()
    versioned.model_version = "3"
    assert field_of(versioned) == "model_version"


def test_router_fields_are_renamed_for_oip_callers() -> None:
    assert oip_field("hints.privacy_class", raw_inputs=True) == 'parameters["privacy_class"]'
    assert oip_field("inputs[0].raw_contents", raw_inputs=True) == "raw_input_contents[0]"
    assert oip_field("inputs[0].raw_contents", raw_inputs=False) == "inputs[0].contents"
    assert oip_field("inputs[0].shape", raw_inputs=True) == "inputs[0].shape"
    error = renamed(InvalidArgumentError("bad", field="request_id"), raw_inputs=True)
    assert isinstance(error, InvalidArgumentError) and error.message == "id: bad"


def test_the_decision_comes_back_as_parameters() -> None:
    decision = decision_pb2.Decision(
        served_by=routing_pb2.TIER_CLOUD,
        reason=decision_pb2.DECISION_REASON_ESCALATED_HARD_CASE,
        escalation_score=0.75,
        threshold=0.5,
        policy_version="2",
        edge_model=model_pb2.ModelRef(name="e", version="1"),
        cloud_model=model_pb2.ModelRef(name="c", version="4"),
        data_left_site=True,
        cost=decision_pb2.Cost(currency_code="USD", edge_micros=1, cloud_micros=100),
        trace_id="ab" * 16,
    )
    decision.timings.total.FromMicroseconds(1500)
    predictions = [router_service_pb2.Prediction(served_by=routing_pb2.TIER_CLOUD)]
    values = decision_parameters(decision, predictions)
    assert values["served_by"] == "CLOUD" and values["reason"] == "ESCALATED_HARD_CASE"
    assert values["cloud_model_version"] == "4" and values["cost_cloud_micros"] == 100
    assert values["data_left_site"] is True and values["latency_us_total"] == 1500
    assert values["items_served_by"] == "CLOUD"
    logits = np.arange(3, dtype=np.float32).reshape(1, 3)
    response = router_service_pb2.InferResponse(
        request_id="r1",
        outputs=[
            tensor_pb2.Tensor(
                name="logits",
                datatype=tensor_pb2.DATA_TYPE_FP32,
                shape=[1, 3],
                raw_contents=logits.tobytes(),
            )
        ],
        predictions=predictions,
        decision=decision,
    )
    reply = to_model_infer_response(response, to_router_request(request(), PAIRS))
    assert reply.id == "r1" and reply.model_name == "pair"
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [
        ("logits", "FP32", [1, 3])
    ]
    assert reply.raw_output_contents[0] == logits.tobytes()
    assert reply.parameters["threshold"].double_param == 0.5
    assert reply.parameters["degraded"].bool_param is False


def test_a_top_k_beyond_uint32_is_invalid_argument_naming_its_field() -> None:
    """InferRequest.top_k is a uint32: 2**32 was a ValueError building the request
    (INTERNAL to the caller), from the parameter and from a classification count."""
    assert field_of(request(top_k=2**32)) == 'parameters["top_k"]'
    asked = request()
    asked.outputs.add(name="logits").parameters["classification"].int64_param = 2**40
    assert field_of(asked) == 'outputs[0].parameters["classification"]'


def test_the_routers_top_k_limit_names_where_the_count_came_from() -> None:
    asked = request(top_k=2)
    asked.outputs.add(name="logits").parameters["classification"].int64_param = 50
    converted = to_router_request(asked, PAIRS)
    assert converted.request.top_k == 50
    error = renamed(
        InvalidArgumentError("50 exceeds the limit of 10", field="top_k"),
        raw_inputs=False,
        top_k_field=converted.top_k_field,
    )
    assert error.message.startswith('outputs[0].parameters["classification"]: '), error.message
    plain = to_router_request(request(top_k=50), PAIRS)
    assert plain.top_k_field == 'parameters["top_k"]'
