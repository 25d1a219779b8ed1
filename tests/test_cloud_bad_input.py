"""The cloud service answers bad input with the right status (a real Triton behind it):
unknown enum values, unknown anonymisers, bytes that do not parse, unknown methods and
long echoed names; none of it reaches Triton or costs more than a refusal."""

from __future__ import annotations

import grpc
import pytest

from hybridmesh.common.v1 import routing_pb2
from services.errors import ELLIPSIS, field_violations
from services.privacy import ANONYMISER_NAMES
from tests.helpers.cloud_service import AUTH, RunningCloud
from tests.helpers.requests import cloud_request

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

LONG = "m" * 10_000
SERVICE = "/hybridmesh.cloud.v1.CloudService"
RAW = (None, None)  # identity serializers: raw bytes in and out


async def _refused(cloud: RunningCloud, request: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cloud.stub.Infer(request, timeout=5, metadata=AUTH)  # type: ignore[arg-type]
    return refused.value


@pytest.mark.parametrize("value", [42, -1, 99])
async def test_unknown_enum_values_are_invalid_argument(cloud: RunningCloud, value: int) -> None:
    privacy = await _refused(cloud, cloud_request(privacy=value))
    assert privacy.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "privacy_class" in field_violations(privacy)

    datatype = cloud_request()
    datatype.inputs[0].datatype = value  # type: ignore[assignment]
    refused = await _refused(cloud, datatype)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[0].datatype" in field_violations(refused)


@pytest.mark.parametrize("privacy", [routing_pb2.PRIVACY_CLASS_INTERNAL, 0, 1])
async def test_an_anonymiser_the_edge_does_not_have_is_invalid_argument(
    cloud: RunningCloud, privacy: int
) -> None:
    refused = await _refused(cloud, cloud_request(privacy=privacy, anonymiser="trust-me"))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "anonymiser" in field_violations(refused)
    # A known one is still accepted.
    for name in sorted(ANONYMISER_NAMES):
        answer = await cloud.stub.Infer(
            cloud_request(privacy=privacy, anonymiser=name), timeout=5, metadata=AUTH
        )
        assert answer.classifications


async def test_bad_bytes_and_unknown_methods(cloud: RunningCloud) -> None:
    for method in ("Infer", "ListModels"):
        with pytest.raises(grpc.aio.AioRpcError) as garbage:
            await cloud.channel.unary_unary(f"{SERVICE}/{method}", *RAW)(
                b"\x0a\xff\xff\xff", timeout=5, metadata=AUTH
            )
        assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
    for path in (f"{SERVICE}/Nope", "/hybridmesh.registry.v1.RegistryService/Promote"):
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await cloud.channel.unary_unary(path, *RAW)(b"", timeout=5, metadata=AUTH)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED, path


async def test_long_names_are_cut_short_and_keep_their_status(cloud: RunningCloud) -> None:
    missing = await _refused(cloud, cloud_request(model=LONG))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    version = await _refused(cloud, cloud_request(version=LONG))
    assert version.code() == grpc.StatusCode.NOT_FOUND
    tensor = cloud_request()
    tensor.inputs[0].name = LONG
    unknown = await _refused(cloud, tensor)
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT
    anonymiser = await _refused(cloud, cloud_request(anonymiser=LONG))
    assert anonymiser.code() == grpc.StatusCode.INVALID_ARGUMENT
    for error in (missing, version, unknown, anonymiser):
        details = error.details() or ""
        assert LONG not in details and ELLIPSIS in details and len(details) < 500
    request_id = cloud_request()
    request_id.request_id = LONG
    bad_id = await _refused(cloud, request_id)
    assert bad_id.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in field_violations(bad_id)
    # The service is unharmed.
    assert (await cloud.stub.Infer(cloud_request(), timeout=5, metadata=AUTH)).classifications
