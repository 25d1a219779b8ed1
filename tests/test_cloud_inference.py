"""cloud_inference in front of the real tritonserver: answers, validation, auth, overload,
deadlines, Triton's own refusals, the domain span, and where labels come from."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_inference.triton_client import TritonClient
from hybridmesh.cloud.v1 import cloud_service_pb2
from hybridmesh.common.v1 import model_pb2, routing_pb2, tensor_pb2
from localmesh.triton import TritonServer
from services.errors import (
    RETRY_PUSHBACK_METADATA_KEY,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    field_violations,
)
from tests.helpers.cloud_service import (
    AUTH,
    IMAGES,
    SHORT_QUEUE_MODEL,
    SLOW_MODEL,
    SLOW_SECONDS,
    TOKEN,
    RunningCloud,
    cloud_settings,
    start_cloud,
    toy_executions,
    triton_requests,
)
from tests.helpers.paths import STORE
from tests.helpers.requests import CLOUD_MODEL, cloud_request
from tests.helpers.waiting import eventually
from workload.fashion_mnist import LABELS
from workload.model_store import load_verified

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


def tensor(
    name: str = "image",
    datatype: int = tensor_pb2.DATA_TYPE_UINT8,
    shape: tuple[int, ...] = (1, 1, 28, 28),
    size: int | None = None,
) -> tensor_pb2.Tensor:
    count = int(np.prod(shape)) if size is None else size
    return tensor_pb2.Tensor(
        name=name,
        datatype=datatype,  # type: ignore[arg-type]
        shape=shape,
        raw_contents=bytes(count),
    )


def with_inputs(*inputs: tensor_pb2.Tensor, **fields: Any) -> cloud_service_pb2.InferRequest:
    request = cloud_request()
    del request.inputs[:]
    request.inputs.extend(inputs)
    for name, value in fields.items():
        if name == "model":
            request.model.CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


async def test_known_images_get_the_cloud_models_logits(cloud: RunningCloud) -> None:
    images = IMAGES[:16]
    reply = await cloud.stub.Infer(cloud_request(images), timeout=10, metadata=AUTH)
    logits = np.frombuffer(reply.outputs[0].raw_contents, dtype="<f4").reshape(16, 10)
    session = ort.InferenceSession(str(STORE / CLOUD_MODEL / "1" / "model.onnx"))
    (expected,) = session.run(["logits"], {"image": images})
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert reply.outputs[0].name == "logits" and list(reply.outputs[0].shape) == [16, 10]
    assert reply.model.name == CLOUD_MODEL and reply.model.version == "1"
    assert reply.request_id == "c-1" and reply.compute_time.ToNanoseconds() > 0
    assert len(reply.classifications) == 16
    for row, classification in zip(expected, reply.classifications, strict=True):
        top = classification.top_k
        assert [c.class_index for c in top] == list(np.argsort(-row, kind="stable")[:3])
        assert [c.label for c in top] == [LABELS[c.class_index] for c in top]
        assert top[0].probability >= top[1].probability >= top[2].probability


async def test_list_models_describes_what_triton_serves(cloud: RunningCloud) -> None:
    reply = await cloud.stub.ListModels(
        cloud_service_pb2.ListModelsRequest(), timeout=5, metadata=AUTH
    )
    models = {info.model.name: info for info in reply.models}
    info = models[CLOUD_MODEL]
    assert info.model.version == "1" and info.ready and info.max_batch_size == 64
    assert [(t.name, t.datatype, list(t.shape)) for t in info.inputs] == [
        ("image", tensor_pb2.DATA_TYPE_UINT8, [-1, 1, 28, 28])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in info.outputs] == [
        ("logits", tensor_pb2.DATA_TYPE_FP32, [-1, 10])
    ]
    assert list(info.labels) == list(LABELS)
    assert info.sha256 == load_verified(STORE / CLOUD_MODEL / "1").model_sha256
    # A model Triton serves that the store does not know: no labels, no hash, still listed.
    assert models[SLOW_MODEL].labels == [] and models[SLOW_MODEL].sha256 == ""


async def test_a_requested_version_is_the_one_that_answers(cloud: RunningCloud) -> None:
    reply = await cloud.stub.Infer(cloud_request(version="1"), timeout=5, metadata=AUTH)
    assert reply.model.version == "1"


async def test_unauthenticated_callers_are_refused(cloud: RunningCloud) -> None:
    refused_metadata: list[tuple[tuple[str, str], ...]] = [
        (),
        (("authorization", "Bearer wrong"),),
        (("authorization", TOKEN),),
        (("authorization", f"Basic {TOKEN}"),),
        (("authorization", "Bearer "),),
    ]
    for metadata in refused_metadata:
        with pytest.raises(grpc.aio.AioRpcError) as infer:
            await cloud.stub.Infer(cloud_request(), timeout=5, metadata=metadata)
        assert infer.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        with pytest.raises(grpc.aio.AioRpcError) as listing:
            await cloud.stub.ListModels(
                cloud_service_pb2.ListModelsRequest(), timeout=5, metadata=metadata
            )
        assert listing.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
    # The scheme is case-insensitive (RFC 6750); health stays open for probes.
    lower = (("authorization", f"bearer {TOKEN}"),)
    assert (await cloud.stub.Infer(cloud_request(), timeout=5, metadata=lower)).outputs
    health = health_pb2_grpc.HealthStub(cloud.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


BAD_REQUESTS = {
    "unknown model": (
        cloud_request(model="nope"),
        grpc.StatusCode.NOT_FOUND,
        "model.name",
    ),
    "no model": (cloud_request(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model.name"),
    "unknown version": (
        cloud_request(version="7"),
        grpc.StatusCode.NOT_FOUND,
        "model.version",
    ),
    "sensitive": (
        cloud_request(privacy=routing_pb2.PRIVACY_CLASS_SENSITIVE),
        grpc.StatusCode.FAILED_PRECONDITION,
        "privacy_class",
    ),
    "sensitive, even anonymised": (
        cloud_request(privacy=routing_pb2.PRIVACY_CLASS_SENSITIVE, anonymiser="blur"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "privacy_class",
    ),
    "internal, not anonymised": (
        cloud_request(privacy=routing_pb2.PRIVACY_CLASS_INTERNAL),
        grpc.StatusCode.FAILED_PRECONDITION,
        "anonymiser",
    ),
    "unspecified privacy, not anonymised": (
        cloud_request(privacy=routing_pb2.PRIVACY_CLASS_UNSPECIFIED),
        grpc.StatusCode.FAILED_PRECONDITION,
        "anonymiser",
    ),
    "fp32 image": (
        cloud_request(np.zeros((1, 1, 28, 28), np.float32)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].datatype",
    ),
    "rank 3": (
        cloud_request(np.zeros((1, 28, 28), np.uint8)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].shape",
    ),
    "27 columns": (
        cloud_request(np.zeros((1, 1, 28, 27), np.uint8)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].shape",
    ),
    "batch over the limit": (
        cloud_request(np.zeros((65, 1, 28, 28), np.uint8)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].shape",
    ),
    "bytes short of the shape": (
        with_inputs(tensor(size=783)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].raw_contents",
    ),
    "unknown input": (
        with_inputs(tensor(name="pixels")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].name",
    ),
    "repeated input": (
        with_inputs(tensor(), tensor()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[1].name",
    ),
    "no input": (with_inputs(), grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
    "payload over the limit": (
        with_inputs(tensor(size=4 * 1024 * 1024 + 1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs",
    ),
    "top_k over the limit": (
        with_inputs(tensor(), top_k=11),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_k",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
async def test_bad_requests_name_their_field_and_never_reach_triton(
    cloud: RunningCloud, cloud_triton: TritonServer, case: str
) -> None:
    bad, code, field = BAD_REQUESTS[case]
    before = await triton_requests(cloud_triton, CLOUD_MODEL)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cloud.stub.Infer(bad, timeout=5, metadata=AUTH)
    assert refused.value.code() == code
    assert field in field_violations(refused.value)
    assert (refused.value.details() or "").startswith(f"{field}: ")
    assert await triton_requests(cloud_triton, CLOUD_MODEL) == before


@pytest.mark.parametrize("privacy", [routing_pb2.PRIVACY_CLASS_INTERNAL, 0])
async def test_internal_data_is_accepted_once_anonymised(cloud: RunningCloud, privacy: int) -> None:
    reply = await cloud.stub.Infer(
        cloud_request(privacy=privacy, anonymiser="strip-attributes"), timeout=5, metadata=AUTH
    )
    assert reply.classifications


async def test_tritons_own_refusals_are_mapped(cloud_triton: TritonServer) -> None:
    client = TritonClient(cloud_triton.grpc_url)

    async def call(model: str, image: np.ndarray, datatype: str, version: str = "") -> None:  # type: ignore[type-arg]
        await client.infer(
            model,
            {"image": image},
            {"image": datatype},
            version=version,
            request_id="x",
            timeout_s=5,
            headers={},
        )

    try:
        with pytest.raises(NotFoundError) as unknown:
            await call("nope", IMAGES[:1], "UINT8")
        assert unknown.value.field == "model.name"
        with pytest.raises(NotFoundError) as version:
            await call(CLOUD_MODEL, IMAGES[:1], "UINT8", version="7")
        assert version.value.field == "model.version"
        with pytest.raises(InvalidArgumentError, match="FP32") as datatype:
            await call(CLOUD_MODEL, np.zeros((1, 1, 28, 28), np.float32), "FP32")
        assert datatype.value.field == "inputs"
        with pytest.raises(InvalidArgumentError, match="shape"):
            await call(CLOUD_MODEL, np.zeros((1, 1, 28, 27), np.uint8), "UINT8")
    finally:
        await client.close()


def pushback(error: grpc.aio.AioRpcError) -> str | None:
    metadata: Any = error.trailing_metadata() or ()
    return next((str(v) for k, v in metadata if k == RETRY_PUSHBACK_METADATA_KEY), None)


async def test_our_overload_is_resource_exhausted_with_pushback(
    cloud_triton: TritonServer,
) -> None:
    running = await start_cloud(
        cloud_settings(
            cloud_triton.grpc_url, max_in_flight=1, max_queued_requests=1, retry_after_ms=30
        )
    )
    try:
        calls = [
            running.stub.Infer(cloud_request(model=SLOW_MODEL), timeout=10, metadata=AUTH)
            for _ in range(5)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await running.stop()
    answered = [r for r in results if isinstance(r, cloud_service_pb2.InferResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(answered) == 2, "one in flight and one waiting get through"
    assert len(refused) == 3
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert pushback(error) == "30"


async def test_tritons_full_queue_is_resource_exhausted_with_pushback(
    cloud: RunningCloud,
) -> None:
    calls = [
        cloud.stub.Infer(cloud_request(model=SHORT_QUEUE_MODEL), timeout=10, metadata=AUTH)
        for _ in range(5)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert any(isinstance(r, cloud_service_pb2.InferResponse) for r in results)
    assert refused, "Triton queues one request and refuses the rest"
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Exceeds maximum queue size" in (error.details() or "")
        assert pushback(error) == "50"


async def test_a_short_deadline_gives_deadline_exceeded_promptly(cloud: RunningCloud) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await cloud.stub.Infer(cloud_request(model=SLOW_MODEL), timeout=0.2, metadata=AUTH)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < SLOW_SECONDS


async def test_the_remaining_deadline_bounds_the_call_to_triton(cloud: RunningCloud) -> None:
    """Without the gRPC client's own deadline in the way: the domain gives up on Triton
    when the caller's remaining time is spent, and does not call it with none left."""
    inference = cloud.node.inference()
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="Triton did not answer in time"):
        await inference.infer(cloud_request(model=SLOW_MODEL), time_remaining_s=0.2)
    assert 0.15 < time.monotonic() - started < SLOW_SECONDS
    with pytest.raises(DeadlineExceededError, match="no time left"):
        await inference.infer(cloud_request(), time_remaining_s=0.0)


async def test_waiting_for_a_slot_is_bounded_by_the_deadline(cloud_triton: TritonServer) -> None:
    running = await start_cloud(cloud_settings(cloud_triton.grpc_url, max_in_flight=1))
    try:
        inference = running.node.inference()
        executions = toy_executions(cloud_triton.model_repository, SLOW_MODEL)
        busy = asyncio.ensure_future(inference.infer(cloud_request(model=SLOW_MODEL), 5.0))
        # It holds the only slot while Triton executes it.
        await eventually(
            lambda: toy_executions(cloud_triton.model_repository, SLOW_MODEL) > executions
        )
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError, match="waiting for a free slot"):
            await inference.infer(cloud_request(), time_remaining_s=0.2)
        assert time.monotonic() - started < SLOW_SECONDS
        assert (await busy).model.name == SLOW_MODEL
    finally:
        await running.stop()


async def test_the_domain_span_names_model_version_batch_and_triton_latency(
    cloud: RunningCloud,
) -> None:
    cloud.spans.clear()
    await cloud.stub.Infer(cloud_request(IMAGES[:4]), timeout=5, metadata=AUTH)
    spans = cloud.spans.get_finished_spans()
    (span,) = [s for s in spans if s.name == "cloud.triton_infer"]
    attributes = dict(span.attributes or {})
    assert attributes["hybridmesh.model.name"] == CLOUD_MODEL
    assert attributes["hybridmesh.model.version"] == "1"
    assert attributes["hybridmesh.batch_size"] == 4
    assert attributes["hybridmesh.request_id"] == "c-1"
    assert 0 < float(attributes["hybridmesh.triton.latency_ms"]) < 5_000  # type: ignore[arg-type]
    # A child of the gRPC server span, so it sits in the caller's trace.
    (server,) = [s for s in spans if s.name.endswith("CloudService/Infer")]
    assert span.parent is not None and span.parent.span_id == server.context.span_id


async def test_labels_can_come_from_the_triton_repository(cloud_triton: TritonServer) -> None:
    running = await start_cloud(
        cloud_settings(
            cloud_triton.grpc_url,
            labels_source="triton_repository",
            triton_repository=cloud_triton.model_repository,
            model_store="/nonexistent",
        )
    )
    try:
        reply = await running.stub.Infer(cloud_request(top_k=10), timeout=5, metadata=AUTH)
        top = reply.classifications[0].top_k
        assert sorted(c.label for c in top) == sorted(LABELS)
        listing = await running.stub.ListModels(
            cloud_service_pb2.ListModelsRequest(), timeout=5, metadata=AUTH
        )
        (info,) = [
            m
            for m in listing.models
            if m.model == model_pb2.ModelRef(name=CLOUD_MODEL, version="1")
        ]
        assert list(info.labels) == list(LABELS) and info.sha256 == ""
    finally:
        await running.stop()


async def test_a_cancelled_caller_does_not_cancel_the_triton_call(
    cloud_triton: TritonServer,
) -> None:
    """Triton r24.10's gRPC frontend can segfault when a cancel races its response
    (triton-inference-server/server#7368; the fuzz test once crashed it): the client
    lets the call finish instead of cancelling it, and drops the answer."""
    client = TritonClient(cloud_triton.grpc_url)
    before = await triton_requests(cloud_triton, CLOUD_MODEL)
    try:
        call = asyncio.ensure_future(
            client.infer(
                CLOUD_MODEL,
                {"image": IMAGES[:64]},
                {"image": "UINT8"},
                request_id="cancelled",
                timeout_s=5,
                headers={},
            )
        )
        await asyncio.sleep(0)  # sent, not answered
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert client.abandoned_calls == 1, "the Triton call runs on"
        await eventually(lambda: client.abandoned_calls == 0, 10, "the abandoned call ends")
        # Triton answered it as a success: nothing was cancelled on the wire.
        assert await triton_requests(cloud_triton, CLOUD_MODEL) == before + 1
    finally:
        await client.close()
