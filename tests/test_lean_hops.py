"""Lean hops (issue 21): the router's tier channels carry no deadline interceptor, so the
tiers check each call's deadline themselves; the server interceptors wrap a method's
handler once and reuse it. Real channels and handlers; no sockets served."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from hybridmesh.edge.v1 import edge_service_pb2_grpc
from router_service.breaker import CircuitBreaker
from router_service.tiers import EDGE_INFER, EdgeTier
from services.channels import ChannelFactory, MissingDeadlineError, require_timeout
from services.errors import InvalidArgumentError
from services.interceptors import ErrorMappingInterceptor
from services.rpc_metrics import RpcMetricsInterceptor
from services.telemetry import create_telemetry
from services.tensors import encode_tensor
from workload.fashion_mnist import load_split


@pytest.mark.parametrize("timeout_s", [None, 0.0, -1.0])
def test_a_call_without_a_deadline_is_refused_naming_the_method(timeout_s: float | None) -> None:
    with pytest.raises(MissingDeadlineError, match="EdgeService/Infer"):
        require_timeout(EDGE_INFER, timeout_s)
    assert require_timeout(EDGE_INFER, 0.25) == 0.25


async def test_the_edge_tier_refuses_a_call_without_a_deadline_before_sending() -> None:
    """The channel has no deadline interceptor (the router's tier channels); the tier
    refuses first (sent, the call would fail UNAVAILABLE: nothing listens there)."""
    channel = ChannelFactory(deadline_interceptor=False).create("127.0.0.1:9")
    breaker = CircuitBreaker("edge")
    tier = EdgeTier(edge_service_pb2_grpc.EdgeServiceStub(channel), breaker)
    try:
        with pytest.raises(MissingDeadlineError, match="EdgeService/Infer"):
            await tier.infer(
                request_id="r1",
                model="fashion-edge",
                inputs=[encode_tensor("image", load_split("test").images[:1])],
                top_k=1,
                timeout_s=0.0,
            )
    finally:
        await channel.close(None)


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def _raise_bad_input(request: Any, context: Any) -> Any:
    raise InvalidArgumentError("bad", field="inputs")


async def test_server_interceptors_wrap_each_methods_handler_once() -> None:
    handlers = {
        "/a.A/One": grpc.unary_unary_rpc_method_handler(_raise_bad_input),
        "/a.A/Two": grpc.unary_unary_rpc_method_handler(_raise_bad_input),
    }

    async def registered(details: Any) -> Any:
        return handlers.get(details.method)

    telemetry = create_telemetry("test", export_otlp=False)
    metrics = RpcMetricsInterceptor(telemetry.meter("test"))
    mapping = ErrorMappingInterceptor()

    async def chain(details: Any) -> Any:  # metrics outside the error mapping, as served
        async def inner(d: Any) -> Any:
            return await mapping.intercept_service(registered, d)

        return await metrics.intercept_service(inner, details)

    first = await chain(_Details("/a.A/One"))
    again = await chain(_Details("/a.A/One"))
    other = await chain(_Details("/a.A/Two"))
    assert first is again, "the same wrapped handler on every call of a method"
    assert other is not first and other.unary_unary is not first.unary_unary
    assert first is not handlers["/a.A/One"], "it is wrapped (errors mapped, timed)"
    assert await chain(_Details("/a.A/Missing")) is None  # grpc answers UNIMPLEMENTED
    # A method whose registered handler changes (a new registration) is wrapped anew.
    handlers["/a.A/One"] = grpc.unary_unary_rpc_method_handler(_raise_bad_input)
    assert await chain(_Details("/a.A/One")) is not first
    telemetry.shutdown()
