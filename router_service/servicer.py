"""Thin gRPC adapter over Router."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from hybridmesh.common.v1 import routing_pb2
from hybridmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
from router_service.reconciler import Reconciler
from router_service.routing import Router
from services.admission import Admission
from services.errors import NotFoundError, clip


class RouterServicer(router_service_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: Router, reconciler: Reconciler, admission: Admission) -> None:
        self._router = router
        self._reconciler = reconciler
        # Overload is shed, not queued: a request whose deadline the queue would eat is
        # refused at once with retry pushback (gRFC A6).
        self._admission = admission

    async def Infer(  # noqa: N802 (gRPC method name)
        self,
        request: router_service_pb2.InferRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> router_service_pb2.InferResponse:
        remaining = context.time_remaining()
        async with self._admission.slot(remaining, shed_when_late=True):
            return await self._router.infer(request, context.time_remaining())

    async def InferStream(  # noqa: N802 (gRPC method name)
        self,
        request: router_service_pb2.InferStreamRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[router_service_pb2.InferStreamResponse]:
        """The edge answer first (when an escalation follows), then the final answer.

        The routing runs in its own task so its span is entered and left in one
        context (a span held current across a ``yield`` cannot be detached when the
        stream is cancelled); leaving the stream cancels the task and every call in it.
        """
        async with self._admission.slot(context.time_remaining(), shed_when_late=True):
            async for message in self._stream(request, context):
                yield message

    async def _stream(
        self,
        request: router_service_pb2.InferStreamRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[router_service_pb2.InferStreamResponse]:
        answers: asyncio.Queue[router_service_pb2.InferResponse] = asyncio.Queue()
        routing = asyncio.create_task(
            self._router.infer(
                request.request, context.time_remaining(), on_edge_answer=answers.put_nowait
            )
        )
        next_answer: asyncio.Future[router_service_pb2.InferResponse] | None = None
        try:
            previous: list[int] = []
            sequence = 0
            while True:
                next_answer = asyncio.ensure_future(answers.get())
                await asyncio.wait({next_answer, routing}, return_when=asyncio.FIRST_COMPLETED)
                if next_answer.done():
                    response, final = next_answer.result(), False
                else:
                    next_answer.cancel()
                    response, final = await routing, True
                top1 = [p.classification.top_k[0].class_index for p in response.predictions]
                # A later answer replaces the earlier one only if the cloud answered;
                # after a cloud failure the last message repeats the edge answer, degraded.
                supersedes = sequence > 0 and response.decision.served_by != routing_pb2.TIER_EDGE
                yield router_service_pb2.InferStreamResponse(
                    response=response,
                    sequence=sequence,
                    supersedes_previous=supersedes,
                    final=final,
                    agrees_with_previous=supersedes and top1 == previous,
                )
                if final:
                    return
                previous = top1
                sequence += 1
        finally:
            if next_answer is not None:
                next_answer.cancel()  # the caller left while it waited: not left pending
            if not routing.done():  # the caller left: cancel every call in flight
                routing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await routing
            elif not routing.cancelled():
                # It failed as the caller left (a deadline of a millisecond): nobody to
                # tell, but retrieved, not "never retrieved" in the log.
                routing.exception()

    async def WatchCorrections(  # noqa: N802 (gRPC method name)
        self,
        request: router_service_pb2.WatchCorrectionsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[router_service_pb2.WatchCorrectionsResponse]:
        if request.model and request.model not in self._router.pair_names:
            raise NotFoundError(
                f"no model pair {clip(request.model)!r}; known: {self._router.pair_names}",
                field="model",
            )
        recorded = (
            await asyncio.to_thread(self._reconciler.outbox.reconciled, corrections_only=True)
            if request.include_recorded
            else []
        )
        async for correction in self._reconciler.feed.watch(request.model, recorded):
            yield router_service_pb2.WatchCorrectionsResponse(correction=correction)
