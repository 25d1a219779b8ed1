"""Triton's own spans join the caller's trace: caller -> cloud_inference -> Triton, with
Triton exporting over OTLP/HTTP (JSON) to a real receiver this test starts.

Measured here (docs/cloud.md): this Triton build (2.51) joins the W3C traceparent of about
97 % of requests and starts a trace of its own for the rest, at random (the same header
that was missed once is joined when sent again) and whatever the trace flags. So each
path is exercised a few times and must join at least once, and no span may ever hang
under a wrong parent.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Span, format_span_id, format_trace_id

from cloud_inference.triton_client import TritonClient
from hybridmesh.cloud.v1 import cloud_service_pb2_grpc
from localmesh.triton import TritonServer
from services.telemetry import create_telemetry, inject_trace_headers
from tests.helpers.cloud_service import (
    AUTH,
    IMAGES,
    cloud_settings,
    start_cloud,
    write_cloud_repository,
)
from tests.helpers.otlp_receiver import OtlpHttpReceiver
from tests.helpers.requests import CLOUD_MODEL, cloud_request

pytestmark = pytest.mark.slow
ATTEMPTS = 3


def ids(span: Span | ReadableSpan) -> tuple[str, str]:
    context = span.get_span_context()
    assert context is not None
    return format_trace_id(context.trace_id), format_span_id(context.span_id)


async def test_tritons_spans_join_the_callers_trace(
    tmp_path: Path, otlp_http: OtlpHttpReceiver
) -> None:
    write_cloud_repository(tmp_path / "repository")
    caller = create_telemetry("caller", export_otlp=False)
    tracer = caller.tracer("test")
    via_service: list[Span] = []
    direct: list[tuple[Span, dict[str, str]]] = []
    async with TritonServer(
        tmp_path / "repository", tmp_path / "run", otlp_http_endpoint=otlp_http.url
    ) as triton:
        # Through the service: caller span -> gRPC client span -> cloud server span ->
        # cloud.triton_infer -> Triton's InferRequest -> model -> compute.
        running = await start_cloud(cloud_settings(triton.grpc_url))
        channel = grpc.aio.insecure_channel(
            running.node.host.address, interceptors=caller.client_interceptors()
        )
        stub = cloud_service_pb2_grpc.CloudServiceStub(channel)
        try:
            for _ in range(ATTEMPTS):
                with tracer.start_as_current_span("through-the-service") as span:
                    await stub.Infer(cloud_request(), timeout=5, metadata=AUTH)
                via_service.append(span)
        finally:
            await channel.close(None)
            await running.stop()
        triton_infer = {
            ids(s)[0]: ids(s)[1]
            for s in running.spans.get_finished_spans()
            if s.name == "cloud.triton_infer"
        }
        # tritonclient alone, with the header exactly as the Python SDK writes it.
        client = TritonClient(triton.grpc_url)
        try:
            for _ in range(ATTEMPTS):
                with tracer.start_as_current_span("direct") as span:
                    headers = inject_trace_headers()
                    await client.infer(
                        CLOUD_MODEL,
                        {"image": IMAGES[:1]},
                        {"image": "UINT8"},
                        request_id="t",
                        timeout_s=5,
                        headers=headers,
                    )
                direct.append((span, headers))
        finally:
            await client.close()
    # Triton flushes its exporter when it stops (the end of the block above).
    spans = otlp_http.spans()
    assert {s["service"] for s in spans} == {"triton"}
    requests = [s for s in spans if s["name"] == "InferRequest"]
    assert len(requests) == 2 * ATTEMPTS, "Triton traces every request (rate=1)"

    def joined(trace_id: str, parent_span_id: str) -> bool:
        request = next((s for s in requests if s["traceId"] == trace_id), None)
        if request is None:
            return False
        assert request.get("parentSpanId") == parent_span_id, "never under a wrong parent"
        names = {s["name"] for s in spans if s["traceId"] == trace_id}
        assert names >= {"InferRequest", CLOUD_MODEL, "compute"}
        return True

    service_joins = []
    for span in via_service:
        trace_id, _ = ids(span)
        assert trace_id in triton_infer, "the service's span is in the caller's trace"
        service_joins.append(joined(trace_id, triton_infer[trace_id]))
    assert any(service_joins), service_joins

    # The SDK's traceparent carries W3C level-2 flags ("03"); this Triton joins it too.
    assert all(headers["traceparent"].endswith("-03") for _, headers in direct)
    assert any(joined(*ids(span)) for span, _ in direct)
    # Every request Triton did not join is a root of its own, not someone else's child.
    known = {ids(span)[0] for span in via_service} | {ids(span)[0] for span, _ in direct}
    for request in requests:
        if request["traceId"] not in known:
            assert not request.get("parentSpanId")
