"""A small OTLP trace receiver: gRPC TraceService (what our services and Envoy send) and
OTLP/HTTP JSON on /v1/traces (what Triton sends). The demo uses it to print one
request's trace; tests use it to prove one trace per request. Jaeger does the same job
in a deployment; nothing here is needed there.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(any_value: Any) -> Any:
    for kind in ("string_value", "bool_value", "int_value", "double_value"):
        if any_value.HasField(kind):
            return getattr(any_value, kind)
    return None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: list[ReceivedSpan]) -> None:
        self._sink = sink

    async def Export(  # noqa: N802 (gRPC method name)
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self._sink.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            service=service,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


def _json_id(raw: str) -> str:
    """OTLP/JSON ids are hex (spec) but some exporters send base64; accept both."""
    if not raw:
        return ""
    try:
        int(raw, 16)
        return raw.lower()
    except ValueError:
        return base64.b64decode(raw).hex()


def spans_from_json(payload: dict[str, Any]) -> list[ReceivedSpan]:
    found = []
    for resource_spans in payload.get("resourceSpans", []):
        attributes = resource_spans.get("resource", {}).get("attributes", [])
        service = next(
            (a["value"].get("stringValue", "") for a in attributes if a["key"] == "service.name"),
            "",
        )
        for scope in resource_spans.get("scopeSpans", []):
            for span in scope.get("spans", []):
                found.append(
                    ReceivedSpan(
                        trace_id=_json_id(span.get("traceId", "")),
                        span_id=_json_id(span.get("spanId", "")),
                        parent_span_id=_json_id(span.get("parentSpanId", "")),
                        name=span.get("name", ""),
                        service=service,
                        start_ns=int(span.get("startTimeUnixNano", 0)),
                        end_ns=int(span.get("endTimeUnixNano", 0)),
                    )
                )
    return found


class OtlpReceiver:
    """Start with ``await receiver.start()``; spans accumulate in ``receiver.spans``."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self.spans), self._server
        )
        self._runner: web.AppRunner | None = None
        self.grpc_port = 0
        self.http_port = 0

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_traces_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1/traces"

    async def start(self) -> None:
        self.grpc_port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

        async def collect(request: web.Request) -> web.Response:
            if request.content_type == "application/json":
                self.spans.extend(spans_from_json(json.loads(await request.read())))
            return web.json_response({})

        app = web.Application()
        app.router.add_post("/v1/traces", collect)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.http_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        await self._server.stop(0)
        if self._runner is not None:
            await self._runner.cleanup()

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.trace_id == trace_id]


def trace_tree(spans: list[ReceivedSpan]) -> str:
    """The spans of one trace as an indented tree, children in start order."""
    by_parent: dict[str, list[ReceivedSpan]] = {}
    ids = {span.span_id for span in spans}
    for span in spans:
        parent = span.parent_span_id if span.parent_span_id in ids else ""
        by_parent.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for span in sorted(by_parent.get(parent, []), key=lambda s: s.start_ns):
            lines.append(f"{'  ' * depth}{span.service}: {span.name} ({span.duration_ms:.2f} ms)")
            walk(span.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)
