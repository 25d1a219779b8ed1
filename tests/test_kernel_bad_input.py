"""services.interceptors on a real server on port 0: every RPC shape maps domain errors,
bytes that do not parse get INVALID_ARGUMENT, unknown methods UNIMPLEMENTED, and echoed
strings are cut short. The shapes service is generic (no proto has all four shapes)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hybridmesh.common.v1 import model_pb2
from hybridmesh.edge.v1 import edge_service_pb2
from services.config import ServiceSettings
from services.errors import (
    ELLIPSIS,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGE_CHARS,
    InvalidArgumentError,
    clip,
)
from services.request_ids import check_request_id, is_valid_request_id
from services.server import ServiceHost, ServiceRegistration

SHAPES = "hybridmesh.test.v1.ShapesService"
SHAPE_METHODS = ("UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream")
Request = edge_service_pb2.InferRequest
Response = edge_service_pb2.InferResponse
# A tag whose varint never ends: no message parses from these bytes.
TRUNCATED = b"\x0a\xff\xff\xff"
# Field 1 (string request_id) holding bytes that are not UTF-8: proto3 refuses them.
NOT_UTF8 = b"\x0a\x02\xff\xfe"
RAW = (None, None)  # identity request serializer and response deserializer: raw bytes


def _answer(request: Request) -> Response:
    name = request.model.name
    if name == "invalid":
        raise InvalidArgumentError("expected [n,1,28,28]", field="inputs[0].shape")
    if name == "bug":
        raise RuntimeError("secret internal detail")
    if name == "long":
        raise InvalidArgumentError(f"no model {'m' * 10_000!r}", field="model.name")
    if name.startswith("long-"):  # "long-é", "long-💥": many bytes per character
        raise InvalidArgumentError(f"no model {name[5:] * 10_000!r}", field="model.name")
    return Response(request_id=request.request_id)


async def _unary_unary(request: Request, context: Any) -> Response:
    return _answer(request)


async def _unary_stream(request: Request, context: Any) -> AsyncIterator[Response]:
    yield Response(request_id="first")
    yield _answer(request)


async def _stream_unary(requests: AsyncIterator[Request], context: Any) -> Response:
    ids = []
    async for request in requests:
        ids.append(_answer(request).request_id)
    return Response(request_id=",".join(ids))


async def _stream_stream(requests: AsyncIterator[Request], context: Any) -> AsyncIterator[Response]:
    async for request in requests:
        yield _answer(request)


def _shapes_handler() -> grpc.GenericRpcHandler[Any, Any]:
    codec: dict[str, Any] = {
        "request_deserializer": Request.FromString,
        "response_serializer": Response.SerializeToString,
    }
    return grpc.method_handlers_generic_handler(
        SHAPES,
        {
            "UnaryUnary": grpc.unary_unary_rpc_method_handler(_unary_unary, **codec),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(_unary_stream, **codec),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(_stream_unary, **codec),
            "StreamStream": grpc.stream_stream_rpc_method_handler(_stream_stream, **codec),
        },
    )


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    host = ServiceHost(
        ServiceSettings(service_name="kernel-test", port=0, shutdown_grace_seconds=0),
        [
            ServiceRegistration(
                SHAPES, lambda server: server.add_generic_rpc_handlers((_shapes_handler(),))
            )
        ],
    )
    await host.start()
    async with grpc.aio.insecure_channel(host.address) as channel:
        yield channel
    await host.stop(grace=0)


def _request(model: str, request_id: str = "r") -> bytes:
    message = Request(request_id=request_id, model=model_pb2.ModelRef(name=model))
    return message.SerializeToString()


async def _call(channel: grpc.aio.Channel, method: str, *payloads: bytes) -> list[bytes]:
    """Raw bytes in, raw bytes out (identity serializers), any shape."""
    path = f"/{SHAPES}/{method}"
    if method == "UnaryUnary":
        return [await channel.unary_unary(path, *RAW)(payloads[0], timeout=5)]
    if method == "StreamUnary":
        return [await channel.stream_unary(path, *RAW)(iter(payloads), timeout=5)]
    if method == "UnaryStream":
        call: Any = channel.unary_stream(path, *RAW)(payloads[0], timeout=5)
    else:
        call = channel.stream_stream(path, *RAW)(iter(payloads), timeout=5)
    return [reply async for reply in call]


async def _refused(
    channel: grpc.aio.Channel, method: str, *payloads: bytes
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _call(channel, method, *payloads)
    return refused.value


@pytest.mark.parametrize("method", SHAPE_METHODS)
async def test_every_shape_answers_and_maps_domain_errors(
    channel: grpc.aio.Channel, method: str
) -> None:
    replies = await _call(channel, method, _request("echo", "a"))
    assert Response.FromString(replies[-1]).request_id == "a"

    invalid = await _refused(channel, method, _request("invalid"))
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (invalid.details() or "").startswith("inputs[0].shape: ")

    bug = await _refused(channel, method, _request("bug"))
    assert bug.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (bug.details() or "")


@pytest.mark.parametrize("garbage", [TRUNCATED, NOT_UTF8], ids=["truncated", "not-utf8"])
@pytest.mark.parametrize("method", SHAPE_METHODS)
async def test_bytes_that_do_not_parse_are_invalid_argument_in_every_shape(
    channel: grpc.aio.Channel, method: str, garbage: bytes
) -> None:
    refused = await _refused(channel, method, garbage)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
    assert "do not parse" in (refused.details() or "")
    assert "class" not in (refused.details() or "")  # no exception type leaked
    if method.startswith("Stream"):
        # A good message first, the bad one second: refused at the bad one.
        late = await _refused(channel, method, _request("echo"), garbage)
        assert late.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The server is unharmed.
    assert await _call(channel, method, _request("echo"))


@pytest.mark.parametrize(
    "path",
    [f"/{SHAPES}/NoSuchMethod", "/hybridmesh.test.v1.NoSuchService/Infer", "/not-a-grpc-path"],
)
async def test_unknown_methods_are_unimplemented(channel: grpc.aio.Channel, path: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await channel.unary_unary(path, *RAW)(b"", timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Health (unary-stream handler written as a coroutine) still works after them.
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


@pytest.mark.parametrize("method", SHAPE_METHODS)
async def test_a_long_echo_is_cut_short_and_keeps_its_status(
    channel: grpc.aio.Channel, method: str
) -> None:
    refused = await _refused(channel, method, _request("long"))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.details() or ""
    assert len(details) <= len("model.name: ") + MAX_MESSAGE_CHARS + len(ELLIPSIS)
    assert details.endswith(ELLIPSIS)


@pytest.mark.parametrize("wide", ["é", "💥", "\u2fff"])
@pytest.mark.parametrize("method", SHAPE_METHODS)
async def test_a_long_echo_of_wide_characters_keeps_its_status(
    channel: grpc.aio.Channel, method: str, wide: str
) -> None:
    """Found by tests/test_fuzz.py: 1,024 characters of 2-4 UTF-8 bytes each passed the
    trailers' 8 KiB soft (or 16 KiB hard) limit: RESOURCE_EXHAUSTED "Stream removed"."""
    refused = await _refused(channel, method, _request(f"long-{wide}"))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
    details = refused.details() or ""
    assert len(details.encode()) <= len("model.name: ") + MAX_MESSAGE_BYTES + len(ELLIPSIS.encode())
    assert details.endswith(ELLIPSIS)


def test_clip_cuts_at_the_limit_with_an_ellipsis() -> None:
    assert clip("short") == "short"
    assert clip("x" * 128) == "x" * 128
    assert clip("x" * 10_000) == "x" * 128 + ELLIPSIS
    assert clip("abcdef", 3) == "abc" + ELLIPSIS


def _request_ids() -> Iterator[tuple[str, bool]]:
    yield "", True
    yield "req-1.a:b_C", True
    yield "x" * 128, True
    yield "x" * 129, False
    yield "trailing-newline\n", False
    yield "spaces are not allowed", False
    yield "ünïcode", False


@pytest.mark.parametrize(("request_id", "valid"), list(_request_ids()))
def test_the_one_request_id_rule(request_id: str, valid: bool) -> None:
    assert is_valid_request_id(request_id) is valid
    if valid:
        check_request_id(request_id)
    else:
        with pytest.raises(InvalidArgumentError) as refused:
            check_request_id(request_id)
        assert refused.value.field == "request_id"
