"""Calls to the edge node and the cloud service, each behind its own circuit breaker.

The router is the one retry layer in the mesh: these clients never retry by
themselves; the router decides whether the other tier answers instead.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from hybridmesh.cloud.v1 import cloud_service_pb2, cloud_service_pb2_grpc
from hybridmesh.common.v1 import model_pb2, routing_pb2, tensor_pb2
from hybridmesh.edge.v1 import edge_service_pb2, edge_service_pb2_grpc
from router_service.anonymisers import Anonymised, anonymiser, strip_attributes
from router_service.audit import TransferAudit
from router_service.breaker import CallOutcome, CircuitBreaker, outcome_of
from router_service.latency import RollingLatency
from router_service.tier_api import (
    Failure,
    TierAnswer,
    TierHealth,
    TierUnavailableError,
    never_connected,
    retry_pushback_s,
)
from services.channels import require_timeout
from services.errors import FailedPreconditionError

ResponseT = TypeVar("ResponseT")
# The methods the tiers call, as require_timeout names them.
EDGE_INFER = "/hybridmesh.edge.v1.EdgeService/Infer"
CLOUD_INFER = "/hybridmesh.cloud.v1.CloudService/Infer"


class LocalCallError(Exception):
    """A failed call to a tier in this process, shaped like ``grpc.aio.AioRpcError``
    (``code()``, ``details()``) so the breaker and the router treat both alike."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


async def guarded_call(
    tier: str,
    breaker: CircuitBreaker,
    send: Callable[[], Awaitable[ResponseT]],
    *,
    background: bool = False,
    timeout_s: float | None = None,
) -> tuple[ResponseT, float]:
    """One call through the tier's breaker; every permitted call is recorded exactly once,
    with its permit. ``background`` work (outbox replays) is refused while half-open."""
    permit = breaker.try_acquire(background=background)
    if permit is None:
        raise TierUnavailableError(
            tier, None, f"{tier} circuit breaker is {breaker.state.value.replace('_', '-')}"
        )
    started = time.perf_counter()
    try:
        response = await send()
    except (grpc.aio.AioRpcError, LocalCallError) as error:
        outcome = outcome_of(error.code())
        if (
            error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            and timeout_s is not None
            and timeout_s < breaker.config.slow_call_s
        ):
            # The caller's short deadline, not the tier: a call given less than the
            # tier's own SLO to answer says nothing about its health.
            outcome = CallOutcome.IGNORED
        breaker.record(permit, outcome, time.perf_counter() - started)
        detail = error.details() or ""
        failure = Failure.NOT_SENT if never_connected(error.code(), detail) else Failure.FAILED
        pushback = (
            retry_pushback_s(error.trailing_metadata())
            if isinstance(error, grpc.aio.AioRpcError)
            else None
        )
        raise TierUnavailableError(
            tier, error.code(), detail, failure=failure, retry_pushback_s=pushback
        ) from error
    except BaseException:
        # Our caller gave up (hedge lost, client went away), or the call failed before
        # it was sent (e.g. the audit record could not be written): says nothing about
        # the tier, and the permit (a half-open probe slot) goes back.
        breaker.record(permit, CallOutcome.IGNORED)
        raise
    elapsed = time.perf_counter() - started
    breaker.record(permit, CallOutcome.SUCCESS, elapsed)
    return response, elapsed


def edge_infer_request(
    request_id: str,
    model: str,
    inputs: Sequence[tensor_pb2.Tensor],
    top_k: int,
    views: Sequence[str],
) -> edge_service_pb2.InferRequest:
    """The edge node's request, whichever edge tier (remote or in-process) sends it."""
    return edge_service_pb2.InferRequest(
        request_id=request_id,
        model=model_pb2.ModelRef(name=model),
        inputs=inputs,
        top_k=top_k,
        views=list(views),
    )


class EdgeTier:
    def __init__(
        self, stub: edge_service_pb2_grpc.EdgeServiceAsyncStub, breaker: CircuitBreaker
    ) -> None:
        self._stub = stub
        self.breaker = breaker
        self.latency = RollingLatency()
        self.health = TierHealth()

    async def infer(
        self,
        *,
        request_id: str,
        model: str,
        inputs: Sequence[tensor_pb2.Tensor],
        top_k: int,
        timeout_s: float,
        views: Sequence[str] = (),
    ) -> TierAnswer:
        request = edge_infer_request(request_id, model, inputs, top_k, views)
        timeout_s = require_timeout(EDGE_INFER, timeout_s)
        response, elapsed = await guarded_call(
            "edge",
            self.breaker,
            lambda: self._stub.Infer(request, timeout=timeout_s),
            timeout_s=timeout_s,
        )
        self.latency.observe(elapsed)
        return TierAnswer(response.model, response.outputs, response.classifications, elapsed)


class CloudTier:
    """The only way data leaves the site: SENSITIVE data is refused here whatever the
    caller (escalation, hedge, fallback, outbox, retry), INTERNAL data is anonymised
    here, and every transfer is audited here before it is sent."""

    def __init__(
        self,
        stub: cloud_service_pb2_grpc.CloudServiceAsyncStub,
        breaker: CircuitBreaker,
        site_token: str,
        audit: TransferAudit,
    ) -> None:
        self._stub = stub
        self.breaker = breaker
        self.latency = RollingLatency()
        self.health = TierHealth()
        self._audit = audit
        self._metadata = (("authorization", f"Bearer {site_token}"),) if site_token else ()

    async def infer(
        self,
        *,
        request_id: str,
        model: str,
        inputs: Sequence[tensor_pb2.Tensor],
        top_k: int,
        timeout_s: float,
        privacy_class: routing_pb2.PrivacyClass.ValueType,
        anonymiser: str,
        purpose: str = "escalation",
        reconciliation: bool = False,
        background: bool = False,
    ) -> TierAnswer:
        if privacy_class == routing_pb2.PRIVACY_CLASS_SENSITIVE:
            # A bug upstream, never a fallback: the request fails rather than leaks.
            raise FailedPreconditionError(
                "SENSITIVE data never leaves the site", field="hints.privacy_class"
            )
        if privacy_class != routing_pb2.PRIVACY_CLASS_PUBLIC and not anonymiser:
            raise FailedPreconditionError(
                "INTERNAL data leaves the site only through its model's anonymiser",
                field="hints.privacy_class",
            )
        anonymised = [await _anonymise(anonymiser, tensor) for tensor in inputs]
        request = cloud_service_pb2.InferRequest(
            request_id=request_id,
            model=model_pb2.ModelRef(name=model),
            inputs=[a.tensor for a in anonymised],
            top_k=top_k,
            privacy_class=privacy_class,
            anonymiser=anonymiser,
            reconciliation=reconciliation,
        )
        # Visible to every hop (Envoy's access log), not only inside the body.
        metadata = (
            *self._metadata,
            ("x-hybridmesh-request-id", request_id),
            ("x-hybridmesh-privacy-class", routing_pb2.PrivacyClass.Name(privacy_class)),
        )

        deadline_s = require_timeout(CLOUD_INFER, timeout_s)
        audit = functools.partial(
            self._audit.record,
            request_id=request_id,
            privacy_class=privacy_class,
            anonymiser=anonymiser,
            tensors=request.inputs,
            purpose=purpose,
            regions_blurred=sum(a.regions_blurred for a in anonymised),
        )

        async def audited_in_thread() -> cloud_service_pb2.InferResponse:
            # A replay's audit record (an fsync) is written off the event loop, so a
            # drain does not stall live requests behind its disk writes; it is still
            # written before the bytes go out.
            await asyncio.to_thread(audit)
            return await self._stub.Infer(request, timeout=deadline_s, metadata=metadata)

        def send() -> Awaitable[cloud_service_pb2.InferResponse]:
            # Audited once the breaker let the call through, before the bytes go out.
            if background:
                return audited_in_thread()
            audit()
            return self._stub.Infer(request, timeout=deadline_s, metadata=metadata)

        try:
            response, elapsed = await guarded_call(
                "cloud", self.breaker, send, background=background, timeout_s=timeout_s
            )
        except TierUnavailableError as error:
            if error.failure is Failure.NOT_SENT and error.code is not None:
                # Audited as an attempt above; the connection never carried it.
                self._audit.record_not_sent(request_id=request_id, reason=error.detail)
            raise
        self.latency.observe(elapsed)
        return TierAnswer(response.model, response.outputs, response.classifications, elapsed)


async def _anonymise(name: str, tensor: tensor_pb2.Tensor) -> Anonymised:
    if not name:
        return Anonymised(tensor)  # PUBLIC: leaves as is
    transform = anonymiser(name)
    if transform is strip_attributes:
        return transform(tensor)
    # Image work takes milliseconds: off the event loop (contextvars follow).
    return await asyncio.to_thread(transform, tensor)
