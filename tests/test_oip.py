"""The Open Inference Protocol (KServe v2 gRPC) on the router, called by the real
``tritonclient.grpc.aio`` client against the real local mesh: metadata, easy and hard
images answered, hints as request parameters honoured (a SENSITIVE request never reaches
the cloud: the cloud's intake log and the router's audit log say so), the decision read
from the response parameters, bad input answered with the OIP field named."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from localmesh.launcher import LocalMesh, MeshOptions, MeshState
from router_service.audit import content_sha256
from services.tensors import encode_tensor
from tests.helpers.item_difficulty import easy_and_hard
from workload.fashion_mnist import load_split

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]
REPO = Path(__file__).resolve().parent.parent
IMAGES = load_split("test").images[:300]
EASY, HARD = easy_and_hard(IMAGES, 2)
PAIR = "fashion-mnist"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MeshState]:
    mesh = LocalMesh(
        MeshOptions(
            state_dir=tmp_path_factory.mktemp("oip-mesh"), repository_root=REPO, random_ports=True
        )
    )
    state = await mesh.up()
    yield state
    await mesh.down()


@pytest_asyncio.fixture(loop_scope="module")
async def client(running: MeshState) -> AsyncIterator[Any]:
    triton = triton_aio.InferenceServerClient(running.endpoints["router"])
    yield triton
    await triton.close()


def image_input(images: npt.NDArray[np.uint8]) -> InferInput:
    tensor = InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return tensor


def parameters_of(result: Any) -> dict[str, object]:
    reply = result.get_response()
    return {
        key: getattr(value, value.WhichOneof("parameter_choice"))
        for key, value in reply.parameters.items()
    }


def records(path: str) -> list[dict[str, Any]]:
    file = Path(path)
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []


async def test_server_and_model_metadata(client: Any) -> None:
    assert await client.is_server_live()
    assert await client.is_server_ready()
    server = await client.get_server_metadata()
    assert server.name == "hybridmesh-router" and server.version
    assert await client.is_model_ready(PAIR)
    metadata = await client.get_model_metadata(PAIR)
    assert metadata.platform == "hybridmesh-pair"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("image", "UINT8", [-1, 1, 28, 28])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("logits", "FP32", [-1, 10])
    ]
    with pytest.raises(InferenceServerException) as missing:
        await client.get_model_metadata("no-such-pair")
    assert missing.value.status() == "StatusCode.NOT_FOUND"
    assert "name" in missing.value.message() and PAIR in missing.value.message()


async def test_easy_stays_on_the_edge_and_hard_goes_to_the_cloud(client: Any) -> None:
    easy = await client.infer(
        PAIR,
        [image_input(IMAGES[EASY[0] : EASY[0] + 1])],
        parameters={"privacy_class": "PUBLIC"},
        client_timeout=10,
    )
    hard = await client.infer(
        PAIR,
        [image_input(IMAGES[HARD[0] : HARD[0] + 1])],
        parameters={"privacy_class": "PUBLIC"},
        client_timeout=10,
    )
    easy_decision, hard_decision = parameters_of(easy), parameters_of(hard)
    assert easy_decision["served_by"] == "EDGE", easy_decision
    assert easy_decision["reason"] == "EDGE_CONFIDENT"
    assert easy_decision["data_left_site"] is False
    assert hard_decision["served_by"] == "CLOUD", hard_decision
    assert hard_decision["reason"] == "ESCALATED_HARD_CASE"
    assert hard_decision["data_left_site"] is True
    assert hard_decision["cost_cloud_micros"] > 0  # type: ignore[operator]
    for decision in (easy_decision, hard_decision):
        assert float(decision["escalation_score"]) >= 0  # type: ignore[arg-type]
        assert 0 < float(decision["threshold"]) < 1  # type: ignore[arg-type]
        assert decision["policy_version"] and decision["edge_model_version"]
        assert len(str(decision["trace_id"])) == 32
        assert decision["degraded"] is False
        assert decision["queued_for_reconciliation"] is False
        assert int(decision["latency_us_total"]) > 0  # type: ignore[call-overload]
    assert hard_decision["cloud_model"] == "fashion-cloud" and hard_decision["cloud_model_version"]
    logits = hard.as_numpy("logits")
    assert logits.shape == (1, 10) and logits.dtype == np.float32
    assert easy.get_response().id  # the router's request id, echoed when the caller set one


async def test_sensitive_never_reaches_the_cloud(client: Any, running: MeshState) -> None:
    request_id = f"oip-sensitive-{uuid.uuid4().hex[:8]}"
    images = IMAGES[HARD[1] : HARD[1] + 1]
    result = await client.infer(
        PAIR,
        [image_input(images)],
        request_id=request_id,
        parameters={"privacy_class": "SENSITIVE"},
        client_timeout=10,
    )
    decision = parameters_of(result)
    assert result.get_response().id == request_id
    assert decision["served_by"] == "EDGE" and decision["reason"] == "PRIVACY_SENSITIVE"
    assert decision["data_left_site"] is False and decision["cost_cloud_micros"] == 0
    digest = content_sha256([encode_tensor("image", images)])
    intake = records(running.audit_logs["cloud_intake"])
    audit = records(running.audit_logs["router_audit"])
    assert intake and audit, "the hard PUBLIC image above left records: the logs are read"
    assert not [r for r in intake if r.get("request_id") == request_id]
    assert not [r for r in audit if r.get("request_id") == request_id]
    assert not [r for r in audit if r.get("content_sha256") == digest]


async def test_hints_travel_as_parameters(client: Any) -> None:
    image = [image_input(IMAGES[EASY[1] : EASY[1] + 1])]
    cloud = parameters_of(
        await client.infer(
            PAIR, image, parameters={"preference": "CLOUD_ONLY", "privacy_class": "PUBLIC"}
        )
    )
    assert cloud["served_by"] == "CLOUD" and cloud["reason"] == "PREFERENCE_CLOUD_ONLY"
    capped = parameters_of(
        await client.infer(
            PAIR,
            [image_input(IMAGES[HARD[0] : HARD[0] + 1])],
            parameters={"privacy_class": "PUBLIC", "max_cost_micros": 0},
        )
    )
    assert capped["served_by"] == "EDGE" and capped["reason"] == "COST_CEILING", capped
    edge_only = parameters_of(
        await client.infer(
            PAIR,
            [image_input(IMAGES[HARD[0] : HARD[0] + 1])],
            parameters={"preference": "EDGE_ONLY", "budget_ms": 2000},
        )
    )
    assert edge_only["served_by"] == "EDGE" and edge_only["reason"] == "PREFERENCE_EDGE_ONLY"


async def test_a_batch_split_and_classification_output(client: Any) -> None:
    batch = np.concatenate([IMAGES[EASY[0] : EASY[0] + 1], IMAGES[HARD[0] : HARD[0] + 1]])
    result = await client.infer(
        PAIR,
        [image_input(batch)],
        outputs=[InferRequestedOutput("logits", class_count=3)],
        parameters={"privacy_class": "PUBLIC"},
        client_timeout=10,
    )
    decision = parameters_of(result)
    assert decision["items_served_by"] == "EDGE,CLOUD", decision
    assert decision["served_by"] == "EDGE_AND_CLOUD"
    classes = result.as_numpy("logits")
    assert classes.shape == (2, 3)
    probability, index, label = classes[0][0].decode().split(":")
    assert 0 < float(probability) <= 1 and 0 <= int(index) < 10 and label


async def expect_invalid(
    client: Any, field: str, code: str = "INVALID_ARGUMENT", **kwargs: Any
) -> str:
    with pytest.raises(InferenceServerException) as error:
        await client.infer(PAIR, **kwargs, client_timeout=10)
    assert error.value.status() == f"StatusCode.{code}", error.value.message()
    message: str = error.value.message()
    assert message.startswith(f"{field}: "), message
    return message


async def test_bad_input_names_the_oip_field(client: Any) -> None:
    one = IMAGES[:1]
    message = await expect_invalid(
        client,
        'parameters["privacy_clas"]',
        inputs=[image_input(one)],
        parameters={"privacy_clas": "SENSITIVE"},
    )
    assert "did you mean 'privacy_class'" in message
    await expect_invalid(
        client,
        'parameters["privacy_class"]',
        inputs=[image_input(one)],
        parameters={"privacy_class": "SECRET"},
    )
    await expect_invalid(
        client,
        'parameters["preference"]',
        "FAILED_PRECONDITION",
        inputs=[image_input(one)],
        parameters={"privacy_class": "SENSITIVE", "preference": "CLOUD_ONLY"},
    )
    wrong_shape = InferInput("image", [1, 28, 28], "UINT8")
    wrong_shape.set_data_from_numpy(one.reshape(1, 28, 28))
    await expect_invalid(client, "inputs[0].shape", inputs=[wrong_shape])
    short = InferInput("image", [1, 1, 28, 28], "UINT8")
    short.set_data_from_numpy(one)
    short._raw_content = short._raw_content[:-1]
    await expect_invalid(client, "raw_input_contents[0]", inputs=[short])
    wrong_type = InferInput("image", [1, 1, 28, 28], "FP32")
    wrong_type.set_data_from_numpy(one.astype(np.float32))
    await expect_invalid(client, "inputs[0].datatype", inputs=[wrong_type])
    await expect_invalid(
        client, "outputs[0].name", inputs=[image_input(one)], outputs=[InferRequestedOutput("x")]
    )
    # The router's top-k limit, for a count that came as a classification parameter.
    await expect_invalid(
        client,
        'outputs[0].parameters["classification"]',
        inputs=[image_input(one)],
        outputs=[InferRequestedOutput("logits", class_count=50)],
    )
    await expect_invalid(
        client, 'parameters["top_k"]', inputs=[image_input(one)], parameters={"top_k": 2**32}
    )
    with pytest.raises(InferenceServerException) as unknown:
        await client.infer("no-such-pair", [image_input(one)], client_timeout=10)
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert unknown.value.message().startswith("model_name: ")
