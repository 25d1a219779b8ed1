"""edge_node against the committed fashion-edge model: real onnxruntime, real gRPC."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_node.app import EdgeNode
from hybridmesh.common.v1 import tensor_pb2
from hybridmesh.edge.v1 import edge_service_pb2
from services.errors import field_violations
from services.telemetry import create_telemetry
from services.tensors import encode_tensor
from tests.helpers.edge_node import RunningEdge, edge_settings
from tests.helpers.paths import EDGE_MODEL, STORE
from tests.helpers.requests import edge_request
from workload.fashion_mnist import LABELS, load_split
from workload.model_store import latest_versions


def _reference_logits(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    version_dir = next(d for d in latest_versions(STORE) if d.parent.name == EDGE_MODEL)
    session = ort.InferenceSession(str(version_dir / "model.onnx"))
    (logits,) = session.run(["logits"], {"image": images})
    return np.asarray(logits)


async def test_known_test_images_get_the_models_answer(running_edge: RunningEdge) -> None:
    test = load_split("test")
    images = test.images[:64]
    reply = await running_edge.stub.Infer(edge_request(images), timeout=10)
    logits = np.frombuffer(reply.outputs[0].raw_contents, dtype="<f4").reshape(64, 10)
    np.testing.assert_allclose(logits, _reference_logits(images), atol=1e-5)
    top1 = np.array([c.top_k[0].class_index for c in reply.classifications])
    assert np.array_equal(top1, logits.argmax(axis=1))
    assert (top1 == test.labels[:64]).mean() >= 0.8  # a real model, not noise
    first = reply.classifications[0].top_k
    assert len(first) == 3 and first[0].label == LABELS[first[0].class_index]
    assert first[0].probability >= first[1].probability >= first[2].probability
    assert reply.model.name == EDGE_MODEL and reply.model.version == "1"
    assert reply.compute_time.ToNanoseconds() > 0


async def test_list_models_describes_the_served_model(running_edge: RunningEdge) -> None:
    reply = await running_edge.stub.ListModels(edge_service_pb2.ListModelsRequest(), timeout=5)
    (info,) = reply.models
    assert info.model.name == EDGE_MODEL and info.ready
    assert len(info.sha256) == 64 and list(info.labels) == list(LABELS)
    assert info.inputs[0].datatype == tensor_pb2.DATA_TYPE_UINT8
    assert list(info.inputs[0].shape) == [-1, 1, 28, 28]


def _bad(
    request: edge_service_pb2.InferRequest, **changes: object
) -> edge_service_pb2.InferRequest:
    copy = edge_service_pb2.InferRequest()
    copy.CopyFrom(request)
    for path, value in changes.items():
        target: object = copy
        *parents, leaf = path.split("__")
        for parent in parents:
            target = getattr(target, parent) if not parent.isdigit() else target[int(parent)]  # type: ignore[index]
        if isinstance(value, list):
            del getattr(target, leaf)[:]
            getattr(target, leaf).extend(value)
        else:
            setattr(target, leaf, value)
    return copy


ONE = np.zeros((1, 1, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize(
    ("changes", "code", "field"),
    [
        ({"model__name": "nope"}, grpc.StatusCode.NOT_FOUND, "model.name"),
        ({"model__name": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model.name"),
        ({"model__version": "99"}, grpc.StatusCode.NOT_FOUND, "model.version"),
        (
            {"inputs__0__datatype": tensor_pb2.DATA_TYPE_FP32},
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs[0].datatype",
        ),
        ({"inputs__0__shape": [1, 28, 28]}, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape"),
        ({"inputs__0__shape": [1, 1, 28, 27]}, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape"),
        ({"inputs__0__shape": [0, 1, 28, 28]}, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape"),
        (
            {"inputs__0__shape": [2**62, 1, 28, 28]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs[0].shape",
        ),
        (
            {"inputs__0__raw_contents": b"\x00" * 783},
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs[0].raw_contents",
        ),
        ({"inputs__0__name": "pixels"}, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].name"),
        ({"inputs": []}, grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
        ({"top_k": 11}, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        ({"request_id": "no spaces allowed"}, grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    ],
)
async def test_every_malformed_request_names_its_field(
    running_edge: RunningEdge, changes: dict[str, object], code: grpc.StatusCode, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running_edge.stub.Infer(_bad(edge_request(ONE), **changes), timeout=5)
    assert refused.value.code() == code
    assert field in field_violations(refused.value), refused.value.details()
    # The service is unharmed.
    assert (await running_edge.stub.Infer(edge_request(ONE), timeout=5)).classifications


async def test_batch_and_payload_limits(running_edge: RunningEdge) -> None:
    too_many = np.zeros((65, 1, 28, 28), dtype=np.uint8)
    with pytest.raises(grpc.aio.AioRpcError) as batch:
        await running_edge.stub.Infer(edge_request(too_many), timeout=5)
    assert batch.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch size 65" in (batch.value.details() or "")

    duplicate = edge_request(ONE)
    duplicate.inputs.append(encode_tensor("image", ONE))
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await running_edge.stub.Infer(duplicate, timeout=5)
    assert field_violations(twice.value) == {"inputs[1].name": "input 'image' given twice"}


async def test_payload_over_the_service_limit_is_invalid_argument() -> None:
    node = EdgeNode(edge_settings(max_payload_bytes=1000), create_telemetry("t", export_otlp=False))
    await node.start()
    try:
        async with grpc.aio.insecure_channel(node.host.address) as channel:
            from hybridmesh.edge.v1 import edge_service_pb2_grpc

            stub = edge_service_pb2_grpc.EdgeServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Infer(edge_request(np.zeros((2, 1, 28, 28), np.uint8)), timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "inputs" in field_violations(refused.value)
    finally:
        await node.stop(0)


async def test_health_is_serving_once_models_are_loaded(running_edge: RunningEdge) -> None:
    health = health_pb2_grpc.HealthStub(running_edge.channel)
    for service in ("", "hybridmesh.edge.v1.EdgeService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_tampered_model_is_refused_and_health_says_not_serving(tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(STORE / EDGE_MODEL, store / EDGE_MODEL)
    model_file = store / EDGE_MODEL / "1" / "model.onnx"
    content = bytearray(model_file.read_bytes())
    content[-1] ^= 0xFF
    model_file.write_bytes(bytes(content))
    node = EdgeNode(edge_settings(model_store=store), create_telemetry("t", export_otlp=False))
    await node.start()
    try:
        assert not node.ready
        async with grpc.aio.insecure_channel(node.host.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            from hybridmesh.edge.v1 import edge_service_pb2_grpc

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await edge_service_pb2_grpc.EdgeServiceStub(channel).Infer(
                    edge_request(ONE), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "sha256" in (refused.value.details() or "")
    finally:
        await node.stop(0)


async def test_concurrent_requests_all_answered_correctly(running_edge: RunningEdge) -> None:
    test = load_split("test")
    expected = _reference_logits(test.images[:96]).argmax(axis=1)
    replies = await asyncio.gather(
        *(
            running_edge.stub.Infer(edge_request(test.images[i : i + 1]), timeout=20)
            for i in range(96)
        )
    )
    got = [reply.classifications[0].top_k[0].class_index for reply in replies]
    assert got == expected.tolist()


async def test_each_request_has_a_domain_span_with_model_and_version(
    running_edge: RunningEdge,
) -> None:
    await running_edge.stub.Infer(edge_request(ONE), timeout=5)
    spans = [s for s in running_edge.spans.get_finished_spans() if s.name == "edge.infer"]
    assert len(spans) == 1
    attributes = dict(spans[0].attributes or {})
    assert attributes["hybridmesh.model.name"] == EDGE_MODEL
    assert attributes["hybridmesh.model.version"] == "1"
    assert attributes["hybridmesh.batch_size"] == 1
    server = [s for s in running_edge.spans.get_finished_spans() if s.name.endswith("/Infer")]
    assert spans[0].parent is not None and spans[0].parent.span_id == server[0].context.span_id


async def test_worker_thread_path_gives_the_same_answers() -> None:
    """inline_compute_max_us=0 sends every run through asyncio.to_thread."""
    node = EdgeNode(
        edge_settings(inline_compute_max_us=0.0), create_telemetry("t", export_otlp=False)
    )
    await node.start()
    try:
        test = load_split("test")
        async with grpc.aio.insecure_channel(node.host.address) as channel:
            from hybridmesh.edge.v1 import edge_service_pb2_grpc

            stub = edge_service_pb2_grpc.EdgeServiceStub(channel)
            replies = await asyncio.gather(
                *(stub.Infer(edge_request(test.images[i : i + 1]), timeout=20) for i in range(32))
            )
        expected = _reference_logits(test.images[:32]).argmax(axis=1).tolist()
        assert [r.classifications[0].top_k[0].class_index for r in replies] == expected
    finally:
        await node.stop(0)
