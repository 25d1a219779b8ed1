"""Shared helpers for tests that run the real edge node on the committed model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from edge_node.app import EdgeNode
from edge_node.config import EdgeSettings
from hybridmesh.common.v1 import model_pb2
from hybridmesh.edge.v1 import edge_service_pb2, edge_service_pb2_grpc
from services.access_rules import OPERATOR_ID
from services.auth import token_sha256
from services.telemetry import create_telemetry
from services.tensors import encode_tensor
from tests.control_plane import TEST_OPERATOR_TOKEN, token_channel

REPO = Path(__file__).resolve().parent.parent
STORE = REPO / "models" / "store"
EDGE_MODEL = "fashion-edge"


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


def image_request(
    images: npt.NDArray[np.uint8], *, model: str = EDGE_MODEL, top_k: int = 3, version: str = ""
) -> edge_service_pb2.InferRequest:
    return edge_service_pb2.InferRequest(
        request_id="test-1",
        model=model_pb2.ModelRef(name=model, version=version),
        inputs=[encode_tensor("image", images)],
        top_k=top_k,
    )


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
