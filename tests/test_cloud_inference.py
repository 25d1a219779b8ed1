"""cloud_inference in front of the real tritonserver: answers, errors, auth, overload,
deadlines, Triton dying, and Triton's own spans joining the caller's trace."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from cloud_inference.app import CloudNode
from cloud_inference.auth import token_sha256
from cloud_inference.config import CloudSettings
from cloud_inference.triton_client import TritonClient
from cloud_inference.triton_launcher import TritonServer
from hybridmesh.cloud.v1 import cloud_service_pb2, cloud_service_pb2_grpc
from hybridmesh.common.v1 import model_pb2, routing_pb2
from services.errors import (
    RETRY_PUSHBACK_METADATA_KEY,
    InvalidArgumentError,
    NotFoundError,
    field_violations,
)
from services.telemetry import create_telemetry, inject_trace_headers
from services.tensors import encode_tensor
from tests.otlp_http_receiver import OtlpHttpReceiver, otlp_http
from tests.triton_fixtures import STORE, TRITON_MODELS, triton
from workload.fashion_mnist import LABELS, load_split
from workload.triton_repository import write_repository

__all__ = ["otlp_http", "triton"]
MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
TOKEN = "site-a-secret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
IMAGES = load_split("test").images


@dataclass
class RunningCloud:
    node: CloudNode
    channel: grpc.aio.Channel
    stub: cloud_service_pb2_grpc.CloudServiceAsyncStub


def cloud_settings(triton_url: str, **overrides: object) -> CloudSettings:
    values: dict[str, object] = {
        "port": 0,
        "triton_url": triton_url,
        "model_store": STORE,
        "site_token_sha256": {"site-a": token_sha256(TOKEN)},
        "health_poll_s": 0.1,
        "shutdown_grace_seconds": 0.0,
    }
    values.update(overrides)
    return CloudSettings.model_validate(values)


async def start_cloud(settings: CloudSettings) -> RunningCloud:
    node = CloudNode(settings, create_telemetry("cloud-test", export_otlp=False), TRITON_MODELS)
    await node.start()
    await node.wait_ready()
    channel = grpc.aio.insecure_channel(node.host.address)
    return RunningCloud(node, channel, cloud_service_pb2_grpc.CloudServiceStub(channel))


@pytest_asyncio.fixture(loop_scope="module")
async def cloud(triton: TritonServer) -> AsyncIterator[RunningCloud]:
    running = await start_cloud(cloud_settings(triton.grpc_url))
    yield running
    await running.channel.close(None)
    await running.node.stop(0)


def request(
    images: np.ndarray = IMAGES[:1],  # type: ignore[type-arg]
    model: str = "fashion-cloud",
    privacy: int = routing_pb2.PRIVACY_CLASS_PUBLIC,
    anonymiser: str = "",
) -> cloud_service_pb2.InferRequest:
    return cloud_service_pb2.InferRequest(
        request_id="c-1",
        model=model_pb2.ModelRef(name=model),
        inputs=[encode_tensor("image", images)],
        top_k=3,
        privacy_class=privacy,  # type: ignore[arg-type]
        anonymiser=anonymiser,
    )


@MODULE_LOOP
async def test_known_images_get_the_cloud_models_logits(cloud: RunningCloud) -> None:
    images = IMAGES[:16]
    reply = await cloud.stub.Infer(request(images), timeout=10, metadata=AUTH)
    logits = np.frombuffer(reply.outputs[0].raw_contents, dtype="<f4").reshape(16, 10)
    session = ort.InferenceSession(str(STORE / "fashion-cloud" / "1" / "model.onnx"))
    (expected,) = session.run(["logits"], {"image": images})
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert reply.model.name == "fashion-cloud" and reply.model.version == "1"
    top = reply.classifications[0].top_k[0]
    assert top.class_index == int(expected[0].argmax()) and top.label == LABELS[top.class_index]


@MODULE_LOOP
async def test_unauthenticated_callers_are_refused(cloud: RunningCloud) -> None:
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await cloud.stub.Infer(request(), timeout=5, metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Health stays open for probes.
    health = health_pb2_grpc.HealthStub(cloud.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@MODULE_LOOP
@pytest.mark.parametrize(
    ("bad", "code", "field"),
    [
        (request(model="nope"), grpc.StatusCode.NOT_FOUND, "model.name"),
        (
            request(privacy=routing_pb2.PRIVACY_CLASS_SENSITIVE),
            grpc.StatusCode.FAILED_PRECONDITION,
            "privacy_class",
        ),
        (
            request(privacy=routing_pb2.PRIVACY_CLASS_INTERNAL),
            grpc.StatusCode.FAILED_PRECONDITION,
            "anonymiser",
        ),
        (
            request(np.zeros((1, 1, 28, 28), np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs[0].datatype",
        ),
        (
            request(np.zeros((1, 28, 28), np.uint8)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs[0].shape",
        ),
        (
            request(np.zeros((65, 1, 28, 28), np.uint8)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs[0].shape",
        ),
    ],
)
async def test_bad_requests_name_their_field(
    cloud: RunningCloud, bad: cloud_service_pb2.InferRequest, code: grpc.StatusCode, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cloud.stub.Infer(bad, timeout=5, metadata=AUTH)
    assert refused.value.code() == code
    assert field in field_violations(refused.value)


@MODULE_LOOP
async def test_internal_data_is_accepted_once_anonymised(cloud: RunningCloud) -> None:
    reply = await cloud.stub.Infer(
        request(privacy=routing_pb2.PRIVACY_CLASS_INTERNAL, anonymiser="strip-attributes"),
        timeout=5,
        metadata=AUTH,
    )
    assert reply.classifications


@MODULE_LOOP
async def test_tritons_own_refusals_are_mapped(triton: TritonServer) -> None:
    client = TritonClient(triton.grpc_url)
    try:
        with pytest.raises(NotFoundError):
            await client.infer(
                "nope",
                {"image": IMAGES[:1]},
                {"image": "UINT8"},
                request_id="x",
                timeout_s=5,
                headers={},
            )
        wrong = np.zeros((1, 1, 28, 28), np.float32)
        with pytest.raises(InvalidArgumentError, match="FP32"):
            await client.infer(
                "fashion-cloud",
                {"image": wrong},
                {"image": "FP32"},
                request_id="x",
                timeout_s=5,
                headers={},
            )
    finally:
        await client.close()


@MODULE_LOOP
async def test_a_short_deadline_is_honoured(cloud: RunningCloud) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await cloud.stub.Infer(request(IMAGES[:64]), timeout=0.002, metadata=AUTH)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.0


@MODULE_LOOP
async def test_overload_is_resource_exhausted_with_pushback(triton: TritonServer) -> None:
    running = await start_cloud(
        cloud_settings(triton.grpc_url, max_in_flight=1, max_queued_requests=0)
    )
    try:
        calls = [
            running.stub.Infer(request(IMAGES[:64]), timeout=10, metadata=AUTH) for _ in range(12)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await running.channel.close(None)
        await running.node.stop(0)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    answered = [r for r in results if isinstance(r, cloud_service_pb2.InferResponse)]
    assert answered, "the first request gets through"
    assert refused and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    trailers: list[Any] = [tuple(item) for item in list(refused[0].trailing_metadata() or ())]  # type: ignore[arg-type]
    assert (RETRY_PUSHBACK_METADATA_KEY, "20") in trailers


async def test_triton_killed_in_flight_gives_unavailable_within_the_deadline(
    tmp_path: Path,
) -> None:
    write_repository(STORE, tmp_path / "repository", "local", TRITON_MODELS)
    async with TritonServer(tmp_path / "repository", tmp_path / "run") as doomed:
        running = await start_cloud(cloud_settings(doomed.grpc_url))
        try:
            in_flight = [
                asyncio.ensure_future(
                    running.stub.Infer(request(IMAGES[:64]), timeout=3, metadata=AUTH)
                )
                for _ in range(8)
            ]
            await asyncio.sleep(0.01)
            started = time.monotonic()
            doomed.kill()
            results = await asyncio.gather(*in_flight, return_exceptions=True)
            assert time.monotonic() - started < 3.5, "no call may outlive its deadline"
            codes = {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)}
            assert codes <= {grpc.StatusCode.UNAVAILABLE}
            # After the kill, every new call is UNAVAILABLE, and health says so.
            with pytest.raises(grpc.aio.AioRpcError) as after:
                await running.stub.Infer(request(), timeout=3, metadata=AUTH)
            assert after.value.code() == grpc.StatusCode.UNAVAILABLE
            health = health_pb2_grpc.HealthStub(running.channel)
            for _ in range(50):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.1)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            await running.channel.close(None)
            await running.node.stop(0)


async def test_tritons_spans_join_the_callers_trace(
    tmp_path: Path, otlp_http: OtlpHttpReceiver
) -> None:
    write_repository(STORE, tmp_path / "repository", "local", ["fashion-cloud"])
    tracer = TracerProvider().get_tracer("test")
    async with TritonServer(
        tmp_path / "repository", tmp_path / "run", otlp_http_endpoint=otlp_http.url
    ) as traced:
        client = TritonClient(traced.grpc_url)
        try:
            with tracer.start_as_current_span("caller") as caller:
                await client.infer(
                    "fashion-cloud",
                    {"image": IMAGES[:1]},
                    {"image": "UINT8"},
                    request_id="t",
                    timeout_s=5,
                    headers=inject_trace_headers(level1_flags=True),
                )
        finally:
            await client.close()
    trace_id = format(caller.get_span_context().trace_id, "032x")
    spans = otlp_http.spans()
    assert spans, "Triton exported nothing"
    request_span = next(s for s in spans if s["name"] == "InferRequest")
    assert request_span["traceId"] == trace_id
    assert request_span["parentSpanId"] == format(caller.get_span_context().span_id, "016x")
    assert {s["name"] for s in spans} >= {"InferRequest", "compute"}
    assert {s["service"] for s in spans} == {"triton"}
