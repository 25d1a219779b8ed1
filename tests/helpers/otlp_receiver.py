"""A real OTLP/HTTP trace receiver (POST /v1/traces), as Triton exports to it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest_asyncio
from aiohttp import web


@dataclass
class OtlpHttpReceiver:
    url: str = ""
    payloads: list[dict[str, Any]] = field(default_factory=list)

    def spans(self) -> list[dict[str, Any]]:
        """Every received span (OTLP JSON), with its resource's service.name added."""
        found = []
        for payload in self.payloads:
            for resource_spans in payload.get("resourceSpans", []):
                attributes = resource_spans.get("resource", {}).get("attributes", [])
                service = next(
                    (
                        a["value"].get("stringValue")
                        for a in attributes
                        if a["key"] == "service.name"
                    ),
                    "",
                )
                for scope in resource_spans.get("scopeSpans", []):
                    for span in scope.get("spans", []):
                        found.append({**span, "service": service})
        return found


@pytest_asyncio.fixture
async def otlp_http() -> AsyncIterator[OtlpHttpReceiver]:
    receiver = OtlpHttpReceiver()

    async def collect(request: web.Request) -> web.Response:
        body = await request.read()
        if request.content_type == "application/json":
            receiver.payloads.append(json.loads(body))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    receiver.url = f"127.0.0.1:{port}/v1/traces"
    yield receiver
    await runner.cleanup()
