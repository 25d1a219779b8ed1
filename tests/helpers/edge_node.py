"""The real edge node on the committed model, in process on port 0 (``running_edge``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from edge_node.app import EdgeNode
from edge_node.config import EdgeSettings
from hybridmesh.edge.v1 import edge_service_pb2_grpc
from services.access_rules import OPERATOR_ID
from services.auth import token_sha256
from services.telemetry import create_telemetry
from tests.helpers.credentials import TEST_OPERATOR_TOKEN, token_channel
from tests.helpers.paths import EDGE_MODEL, STORE


def edge_settings(**overrides: object) -> EdgeSettings:
    values: dict[str, object] = {
        "port": 0,
        "model_store": STORE,
        "served_models": (EDGE_MODEL,),
        "shutdown_grace_seconds": 0.0,
        # The operator may call EdgeAdminService (the fixture's channel presents it).
        "admin_token_sha256": {OPERATOR_ID: token_sha256(TEST_OPERATOR_TOKEN)},
    }
    values.update(overrides)
    return EdgeSettings.model_validate(values)


class RunningEdge:
    def __init__(self, node: EdgeNode, channel: grpc.aio.Channel, spans: InMemorySpanExporter):
        self.node = node
        self.channel = channel
        self.stub = edge_service_pb2_grpc.EdgeServiceStub(channel)
        self.spans = spans


@pytest.fixture
async def running_edge() -> AsyncIterator[RunningEdge]:
    spans = InMemorySpanExporter()
    telemetry = create_telemetry(
        "edge-test", span_processors=[SimpleSpanProcessor(spans)], export_otlp=False
    )
    node = EdgeNode(edge_settings(), telemetry)
    await node.start()
    channel = token_channel(node.host.address, TEST_OPERATOR_TOKEN)
    yield RunningEdge(node, channel, spans)
    await channel.close(None)
    await node.stop(0)
