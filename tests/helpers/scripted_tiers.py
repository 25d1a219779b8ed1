"""Scripted edge and cloud tiers: real gRPC servers on loopback port 0 that answer,
fail, or hang exactly as a test says, so every routing and fault path of a real router
(``RouterNode``, its channels, breakers and health watch) is tested deterministically,
without Triton and without sleeps as synchronisation.

A test queues one ``Step`` per expected call (``answer``, ``fail``, ``hang``); with the
queue empty a tier answers by its default step. Every call is recorded (``calls``) with
its request, and ``hung``/``cancelled`` let a test wait on the moment a call hangs or is
cancelled by the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest_asyncio

from hybridmesh.cloud.v1 import cloud_service_pb2, cloud_service_pb2_grpc
from hybridmesh.common.v1 import model_pb2, routing_pb2, tensor_pb2
from hybridmesh.edge.v1 import edge_service_pb2, edge_service_pb2_grpc
from hybridmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
from router_service.app import RouterNode, pairs_from_catalog
from services.classification import softmax, top_k
from services.config import ServiceSettings
from services.server import ServiceHost, ServiceRegistration
from services.telemetry import create_telemetry
from services.tensors import encode_tensor
from services.views import view_output_name
from tests.helpers.router_node import router_settings
from tests.helpers.waiting import eventually

EDGE_SERVICE = "hybridmesh.edge.v1.EdgeService"
CLOUD_SERVICE = "hybridmesh.cloud.v1.CloudService"
CLASSES = 10
# A confident edge answer (p(top1) ~ 1) and a hard one (uniform): the committed router
# policy keeps the first on the edge and escalates the second.
CONFIDENT = 0
HARD = 1
LABELS = [f"class-{index}" for index in range(CLASSES)]


def logits_for(kinds: list[int], label: int = 3) -> npt.NDArray[np.float32]:
    """[n, 10] logits: CONFIDENT rows put all mass on ``label``, HARD rows are nearly flat
    (``label`` still first, by a hair)."""
    rows = np.zeros((len(kinds), CLASSES), dtype=np.float32)
    for row, kind in zip(rows, kinds, strict=True):
        row[label] = 30.0 if kind == CONFIDENT else 0.2
    return rows


@dataclass(frozen=True)
class Step:
    """What a tier does with one call."""

    kind: str  # "answer" | "fail" | "hang"
    code: grpc.StatusCode = grpc.StatusCode.OK
    detail: str = ""
    # Answer after this many seconds (a slow but alive tier); 0: at once.
    delay_s: float = 0.0


def answer(delay_s: float = 0.0) -> Step:
    return Step("answer", delay_s=delay_s)


def fail(code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, detail: str = "scripted") -> Step:
    return Step("fail", code, detail)


def hang() -> Step:
    """Never answer: the call ends only when its caller cancels it or its deadline passes."""
    return Step("hang")


@dataclass
class Call:
    request_id: str
    items: int
    metadata: dict[str, str]
    # An outbox replay (answered by the default step, never from the script).
    reconciliation: bool = False
    outcome: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ScriptedTier:
    """The shared engine of both scripted servicers."""

    def __init__(self, name: str, model: str, default: Step) -> None:
        self.name = name
        self.model = model
        self.default = default
        self.steps: deque[Step] = deque()
        self.calls: list[Call] = []
        self.call_started = asyncio.Event()
        # The class each item gets from this tier (the cloud "corrects" the edge).
        self.label = 3
        # Per item of the next edge answers: CONFIDENT or HARD (default CONFIDENT).
        self.kinds: list[int] | None = None

    def script(self, *steps: Step) -> None:
        self.steps.extend(steps)

    async def run(
        self,
        request_id: str,
        inputs: tensor_pb2.Tensor,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        reconciliation: bool = False,
    ) -> tuple[tensor_pb2.Tensor, list[model_pb2.Classification]]:
        metadata = {key: str(value) for key, value in (context.invocation_metadata() or ())}
        call = Call(request_id, int(inputs.shape[0]), metadata, reconciliation)
        self.calls.append(call)
        if reconciliation:
            step = answer()  # replays run in the background: never take a test's step
        else:
            self.call_started.set()
            step = self.steps.popleft() if self.steps else self.default
        try:
            if step.kind == "hang":
                await asyncio.Event().wait()
            if step.delay_s:
                await asyncio.sleep(step.delay_s)
        except asyncio.CancelledError:
            call.outcome.set_result("cancelled")
            raise
        if step.kind == "fail":
            call.outcome.set_result(step.code.name)
            await context.abort(step.code, step.detail)
        call.outcome.set_result("answered")
        kinds = self.kinds or [CONFIDENT] * call.items
        logits = logits_for(kinds[: call.items], self.label)
        return encode_tensor("logits", logits), top_k(softmax(logits), LABELS, 1)


class ScriptedEdge(edge_service_pb2_grpc.EdgeServiceServicer):
    def __init__(self) -> None:
        self.tier = ScriptedTier("edge", "fashion-edge", answer())

    async def ListModels(  # noqa: N802 (gRPC method name)
        self,
        request: edge_service_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> edge_service_pb2.ListModelsResponse:
        return edge_service_pb2.ListModelsResponse()

    async def Infer(  # noqa: N802 (gRPC method name)
        self,
        request: edge_service_pb2.InferRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> edge_service_pb2.InferResponse:
        output, classes = await self.tier.run(request.request_id, request.inputs[0], context)
        # Each requested test-time view gets the scripted answer too (the mirrored item is
        # the same kind of item), under the name the edge node gives it.
        views = [tensor_pb2.Tensor() for _ in request.views]
        for view, name in zip(views, request.views, strict=True):
            view.CopyFrom(output)
            view.name = view_output_name(output.name, name)
        return edge_service_pb2.InferResponse(
            request_id=request.request_id,
            model=model_pb2.ModelRef(name=self.tier.model, version="scripted-1"),
            outputs=[output, *views],
            classifications=classes,
        )


class ScriptedCloud(cloud_service_pb2_grpc.CloudServiceServicer):
    def __init__(self) -> None:
        self.tier = ScriptedTier("cloud", "fashion-cloud", answer())
        self.tier.label = 7

    async def ListModels(  # noqa: N802 (gRPC method name)
        self,
        request: cloud_service_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> cloud_service_pb2.ListModelsResponse:
        return cloud_service_pb2.ListModelsResponse()

    async def Infer(  # noqa: N802 (gRPC method name)
        self,
        request: cloud_service_pb2.InferRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> cloud_service_pb2.InferResponse:
        output, classes = await self.tier.run(
            request.request_id, request.inputs[0], context, reconciliation=request.reconciliation
        )
        return cloud_service_pb2.InferResponse(
            request_id=request.request_id,
            model=model_pb2.ModelRef(name=self.tier.model, version="scripted-1"),
            outputs=[output],
            classifications=classes,
        )


@dataclass
class ScriptedServer:
    host: ServiceHost
    tier: ScriptedTier
    service_name: str

    @property
    def address(self) -> str:
        return self.host.address

    async def set_serving(self, serving: bool) -> None:
        await self.host.set_serving(self.service_name, serving)


@contextlib.asynccontextmanager
async def scripted_tiers() -> AsyncIterator[tuple[ScriptedServer, ScriptedServer]]:
    """A scripted edge node and a scripted cloud service, each a real gRPC server."""
    edge, cloud = ScriptedEdge(), ScriptedCloud()
    hosts = [
        ServiceHost(
            ServiceSettings(port=0, shutdown_grace_seconds=0),
            [ServiceRegistration(name, add)],
        )
        for name, add in (
            (
                EDGE_SERVICE,
                lambda s: edge_service_pb2_grpc.add_EdgeServiceServicer_to_server(edge, s),
            ),
            (
                CLOUD_SERVICE,
                lambda s: cloud_service_pb2_grpc.add_CloudServiceServicer_to_server(cloud, s),
            ),
        )
    ]
    for host in hosts:
        await host.start()
    try:
        yield (
            ScriptedServer(hosts[0], edge.tier, EDGE_SERVICE),
            ScriptedServer(hosts[1], cloud.tier, CLOUD_SERVICE),
        )
    finally:
        for host in hosts:
            await host.stop(0)


@dataclass
class ScriptedMesh:
    edge: ScriptedServer
    cloud: ScriptedServer
    router: RouterNode
    stub: router_service_pb2_grpc.RouterServiceAsyncStub
    audit_log: Path

    def audited(self, request_id: str) -> list[dict[str, object]]:
        lines = self.audit_log.read_text().splitlines() if self.audit_log.exists() else []
        records = [json.loads(line) for line in lines if line.strip()]
        return [r for r in records if r.get("request_id") == request_id]


@contextlib.asynccontextmanager
async def scripted_mesh(
    tmp_path: Path, *, wait_for: tuple[str, ...] = ("edge", "cloud"), **router_overrides: object
) -> AsyncIterator[ScriptedMesh]:
    """A real router (``RouterNode``) in front of a scripted edge and cloud; returns once
    its health watch has seen the tiers in ``wait_for`` up."""
    async with scripted_tiers() as (edge, cloud):
        settings = router_settings(
            edge.address,
            cloud.address,
            audit_log_path=tmp_path / "audit.jsonl",
            outbox_path=tmp_path / "outbox.sqlite",
            **router_overrides,
        )
        router = RouterNode(
            settings,
            create_telemetry("router", export_otlp=False),
            pairs_from_catalog(settings.catalog),
        )
        await router.start()
        await eventually(lambda: all(router.tier_up[tier] for tier in wait_for))
        async with grpc.aio.insecure_channel(router.host.address) as channel:
            yield ScriptedMesh(
                edge,
                cloud,
                router,
                router_service_pb2_grpc.RouterServiceStub(channel),
                tmp_path / "audit.jsonl",
            )
        await router.stop(0)


@pytest_asyncio.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[ScriptedMesh]:
    async with scripted_mesh(tmp_path) as mesh:
        yield mesh


def request(
    kinds: list[int],
    mesh: ScriptedMesh,
    *,
    request_id: str,
    privacy: int = routing_pb2.PRIVACY_CLASS_PUBLIC,
    preference: int = routing_pb2.ROUTE_PREFERENCE_AUTO,
    pair: str = "fashion-mnist",
) -> router_service_pb2.InferRequest:
    """A batch for ``pair`` whose edge answers are ``kinds`` (CONFIDENT / HARD per item)."""
    mesh.edge.tier.kinds = kinds
    images = np.zeros((len(kinds), 1, 28, 28), dtype=np.uint8)
    return router_service_pb2.InferRequest(
        request_id=request_id,
        model=pair,
        inputs=[encode_tensor("image", images)],
        hints=routing_pb2.RoutingHints(privacy_class=privacy, preference=preference),  # type: ignore[arg-type]
    )


async def start_health_only_cloud() -> ServiceHost:
    """A real gRPC server that serves only grpc.health.v1 under the cloud service's name:
    for tests of the router's health watch, where no request reaches the cloud."""
    cloud = ServiceHost(
        ServiceSettings(port=0, shutdown_grace_seconds=0),
        [ServiceRegistration(CLOUD_SERVICE, lambda server: None)],
    )
    await cloud.start()
    return cloud
