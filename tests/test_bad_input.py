"""Bad input gets the right status, as kinds, on real servers on loopback port 0: the edge
node, its admin service, the registry, the router's hint policy and the cloud ingress
Envoy (the real binary). The cloud service's cases need Triton: test_cloud_bad_input.

Kinds: unknown enum values, bytes that do not parse, unknown methods, long echoed
strings, out-of-range timestamps, and persisted state with a bad record.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hybridmesh.common.v1 import model_pb2, routing_pb2, tensor_pb2
from hybridmesh.edge.v1 import edge_admin_pb2, edge_admin_pb2_grpc, edge_service_pb2
from hybridmesh.registry.v1 import registry_service_pb2 as reg
from hybridmesh.registry.v1 import registry_service_pb2_grpc
from localmesh.certs import ensure_certificates
from localmesh.envoy import (
    EnvoyPorts,
    WanControl,
    envoy_command,
    envoy_config,
    write_config,
)
from localmesh.launcher import free_port
from registry.app import RegistryNode
from registry.config import RegistrySettings
from router_service.anonymisers import ANONYMISERS
from router_service.policy import RequestConstraints
from services.errors import ECHO_MAX_CHARS, ELLIPSIS, InvalidArgumentError, field_violations
from services.privacy import ANONYMISER_NAMES
from services.server import ServiceHost
from services.telemetry import create_telemetry
from services.validation import TIMESTAMP_MAX_SECONDS, TIMESTAMP_MIN_SECONDS
from tests.helpers.credentials import make_credentials, operator_or_reporting_site, token_channel
from tests.helpers.edge_node import RunningEdge
from tests.helpers.requests import edge_request
from tests.helpers.scripted_tiers import start_health_only_cloud
from tests.helpers.waiting import eventually

ONE = np.zeros((1, 1, 28, 28), dtype=np.uint8)
LONG = "m" * 10_000
RAW = (None, None)  # identity serializers: raw bytes in and out
GARBAGE = b"\x0a\xff\xff\xff"  # a length prefix that never ends
BAD_ENUMS = [42, -1, 99]


async def _raw_call(channel: grpc.aio.Channel, path: str, payload: bytes) -> grpc.StatusCode:
    try:
        await channel.unary_unary(path, *RAW)(payload, timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _status_of(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value


def _short(error: grpc.aio.AioRpcError) -> None:
    """The echoed caller string was cut short, in the message and in the details."""
    details = error.details() or ""
    assert LONG not in details and ELLIPSIS in details, details[:300]
    assert len(details) < 2 * ECHO_MAX_CHARS + 200
    for description in field_violations(error).values():
        assert LONG not in description


# -- edge node ---------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", BAD_ENUMS)
async def test_edge_unknown_datatype_is_invalid_argument(
    running_edge: RunningEdge, datatype: int
) -> None:
    request = edge_request(ONE)
    request.inputs[0].datatype = datatype  # type: ignore[assignment]
    refused = await _status_of(running_edge.stub.Infer(request, timeout=5))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[0].datatype" in field_violations(refused)


@pytest.mark.parametrize(
    "path",
    [
        "/hybridmesh.edge.v1.EdgeService/Infer",
        "/hybridmesh.edge.v1.EdgeService/ListModels",
        "/hybridmesh.edge.v1.EdgeAdminService/Rollback",
        "/hybridmesh.edge.v1.EdgeAdminService/GetUpdateStatus",
    ],
)
async def test_edge_bytes_that_do_not_parse_are_invalid_argument(
    running_edge: RunningEdge, path: str
) -> None:
    assert await _raw_call(running_edge.channel, path, GARBAGE) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "path",
    [
        "/hybridmesh.edge.v1.EdgeService/Nope",
        "/hybridmesh.edge.v1.EdgeAdminService/Promote",
        "/hybridmesh.registry.v1.RegistryService/Promote",
    ],
)
async def test_edge_unknown_methods_are_unimplemented(running_edge: RunningEdge, path: str) -> None:
    assert await _raw_call(running_edge.channel, path, b"") == grpc.StatusCode.UNIMPLEMENTED


async def test_edge_long_names_are_cut_short_and_keep_their_status(
    running_edge: RunningEdge,
) -> None:
    missing = await _status_of(running_edge.stub.Infer(edge_request(ONE, model=LONG), timeout=5))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    _short(missing)

    version = await _status_of(running_edge.stub.Infer(edge_request(ONE, version=LONG), timeout=5))
    assert version.code() == grpc.StatusCode.NOT_FOUND
    _short(version)

    tensor = edge_request(ONE)
    tensor.inputs[0].name = LONG
    unknown = await _status_of(running_edge.stub.Infer(tensor, timeout=5))
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT
    _short(unknown)

    request_id = edge_request(ONE)
    request_id.request_id = LONG
    bad_id = await _status_of(running_edge.stub.Infer(request_id, timeout=5))
    assert bad_id.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert LONG not in (bad_id.details() or "")

    admin = edge_admin_pb2_grpc.EdgeAdminServiceStub(running_edge.channel)
    rollback = await _status_of(
        admin.Rollback(edge_admin_pb2.RollbackRequest(model=LONG), timeout=5)
    )
    # No over-the-air updates on this node: refused before the name is looked at.
    assert rollback.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert LONG not in (rollback.details() or "")


async def test_edge_serves_after_the_bad_input(running_edge: RunningEdge) -> None:
    await _raw_call(running_edge.channel, "/hybridmesh.edge.v1.EdgeService/Infer", GARBAGE)
    await _raw_call(running_edge.channel, "/hybridmesh.edge.v1.EdgeService/Nope", b"")
    reply = await running_edge.stub.Infer(edge_request(ONE), timeout=5)
    assert reply.classifications


# -- router hints (pure policy) ----------------------------------------------------------


@pytest.mark.parametrize("value", BAD_ENUMS)
@pytest.mark.parametrize("field", ["privacy_class", "preference"])
def test_router_hints_with_unknown_enum_values_are_invalid_argument(field: str, value: int) -> None:
    hints = routing_pb2.RoutingHints(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError) as refused:
        RequestConstraints.from_hints(hints)
    assert refused.value.field == f"hints.{field}"


# -- registry ----------------------------------------------------------------------------


class RunningRegistry:
    def __init__(self, node: RegistryNode, channel: grpc.aio.Channel) -> None:
        self.node = node
        self.channel = channel
        self.stub = registry_service_pb2_grpc.RegistryServiceStub(channel)


async def _start_registry(root: Path) -> RunningRegistry:
    # The operator's token, and each reporting site's own (tests/helpers/credentials.py).
    credentials = make_credentials(root.parent / "credentials", ("s1", "edge-odd", "edge-ok"))
    node = RegistryNode(
        RegistrySettings(
            port=0, root=root, shutdown_grace_seconds=0, token_sha256=credentials.hashes()
        ),
        create_telemetry("registry-test", export_otlp=False),
    )
    await node.start()
    channel = token_channel(node.host.address, operator_or_reporting_site(credentials))
    return RunningRegistry(node, channel)


async def _stop_registry(running: RunningRegistry) -> None:
    await running.channel.close(None)
    await running.node.stop(0)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    running = await _start_registry(tmp_path / "registry")
    yield running
    await _stop_registry(running)


def _report(site: str, seconds: int, nanos: int = 0) -> reg.ReportSiteStatusRequest:
    return reg.ReportSiteStatusRequest(
        status=reg.SiteStatus(
            site=site,
            served=[
                reg.ServedVersion(
                    artifact=reg.ArtifactRef(
                        kind=reg.ARTIFACT_KIND_MODEL, name="fashion-edge", version=1
                    )
                )
            ],
            reported_at=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
        )
    )


@pytest.mark.parametrize(
    ("seconds", "nanos", "field"),
    [
        (TIMESTAMP_MAX_SECONDS + 1, 0, "status.reported_at.seconds"),  # year 10000
        (2**62, 0, "status.reported_at.seconds"),
        (TIMESTAMP_MIN_SECONDS - 1, 0, "status.reported_at.seconds"),
        (1_700_000_000, -1, "status.reported_at.nanos"),
        (1_700_000_000, 1_000_000_000, "status.reported_at.nanos"),
    ],
)
async def test_registry_out_of_range_report_times_are_invalid_argument(
    registry: RunningRegistry, seconds: int, nanos: int, field: str
) -> None:
    refused = await _status_of(registry.stub.ReportSiteStatus(_report("s1", seconds, nanos)))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(refused)
    assert not (await registry.stub.ListSites(reg.ListSitesRequest(), timeout=5)).sites


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(TIMESTAMP_MAX_SECONDS, 999_999_999), (TIMESTAMP_MIN_SECONDS, 0)],
    ids=["last-instant-of-9999", "first-instant-of-year-1"],
)
async def test_registry_report_just_inside_the_range_does_not_poison_the_listing(
    registry: RunningRegistry, seconds: int, nanos: int
) -> None:
    await registry.stub.ReportSiteStatus(_report("edge-odd", seconds, nanos), timeout=5)
    await registry.stub.ReportSiteStatus(_report("edge-ok", 1_700_000_000), timeout=5)
    listed = await registry.stub.ListSites(reg.ListSitesRequest(), timeout=5)
    by_site = {s.site: s.reported_at for s in listed.sites}
    assert by_site["edge-ok"].seconds == 1_700_000_000
    assert abs(by_site["edge-odd"].seconds - seconds) <= 1


@pytest.mark.parametrize("kind", BAD_ENUMS)
async def test_registry_unknown_artifact_kind_is_invalid_argument(
    registry: RunningRegistry, kind: int
) -> None:
    request = reg.GetManifestRequest(artifact=reg.ArtifactRef(kind=kind, name="x", version=1))  # type: ignore[arg-type]
    refused = await _status_of(registry.stub.GetManifest(request, timeout=5))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "artifact.kind" in field_violations(refused)


async def test_registry_bad_bytes_unknown_methods_and_long_names(registry: RunningRegistry) -> None:
    service = "/hybridmesh.registry.v1.RegistryService"
    for method in ("ReportSiteStatus", "Promote", "ListSites"):
        status = await _raw_call(registry.channel, f"{service}/{method}", GARBAGE)
        assert status == grpc.StatusCode.INVALID_ARGUMENT, method
    # FetchFile is server-streaming.
    try:
        async for _ in registry.channel.unary_stream(f"{service}/FetchFile", *RAW)(
            GARBAGE, timeout=5
        ):
            pass
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    else:
        pytest.fail("FetchFile accepted bytes that do not parse")
    assert await _raw_call(registry.channel, f"{service}/Delete", b"") == (
        grpc.StatusCode.UNIMPLEMENTED
    )
    long_name = reg.GetManifestRequest(
        artifact=reg.ArtifactRef(kind=reg.ARTIFACT_KIND_MODEL, name=LONG, version=1)
    )
    refused = await _status_of(registry.stub.GetManifest(long_name, timeout=5))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert LONG not in (refused.details() or "")
    fetch = reg.FetchFileRequest(
        artifact=reg.ArtifactRef(kind=reg.ARTIFACT_KIND_MODEL, name="nothing", version=1),
        path=LONG,
    )
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        async for _ in registry.stub.FetchFile(fetch, timeout=5):
            pass
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert LONG not in (missing.value.details() or "")


async def test_registry_skips_bad_persisted_records_and_lists_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    root.mkdir()
    good = {
        "site": "edge-good",
        "served": [{"kind": "model", "name": "fashion-edge", "version": 3, "refused_versions": []}],
        "reported_at": 1_700_000_000.5,
    }
    bad = [
        {**good, "site": "edge-far-future", "reported_at": 1e300},
        {**good, "site": "edge-not-a-time", "reported_at": "yesterday"},
        {**good, "site": "edge-bad-kind", "served": [{**good["served"][0], "kind": "x"}]},  # type: ignore[index]
        {**good, "site": "edge-bad-version", "served": [{**good["served"][0], "version": "3"}]},  # type: ignore[index]
        {"site": "edge-incomplete"},
        "not a record",
    ]
    (root / "sites.json").write_text(json.dumps([*bad, good]))
    # A damaged promotion history next to a sound one.
    for name, history in (("broken", "{not json"), ("sound", json.dumps({"promoted": []}))):
        (root / "model" / name).mkdir(parents=True)
        (root / "model" / name / "channel.json").write_text(history)
    running = await _start_registry(root)
    try:
        sites = (await running.stub.ListSites(reg.ListSitesRequest(), timeout=5)).sites
        assert [s.site for s in sites] == ["edge-good"]
        assert sites[0].served[0].artifact.version == 3
        artifacts = await running.stub.ListArtifacts(reg.ListArtifactsRequest(), timeout=5)
        assert [a.name for a in artifacts.artifacts] == ["sound"]
    finally:
        await _stop_registry(running)


# -- the cloud ingress Envoy ---------------------------------------------------------------


@pytest.fixture
async def envoy_ingress(tmp_path: Path) -> AsyncIterator[tuple[grpc.aio.Channel, Path]]:
    """The local mesh's cloud ingress (real envoy, mTLS) in front of a health-only cloud."""
    cloud: ServiceHost = await start_health_only_cloud()
    certificates = ensure_certificates(tmp_path / "certs")
    ports = EnvoyPorts(free_port(), free_port())
    access_log = tmp_path / "access.log"
    config = envoy_config(
        ports,
        cloud.port,
        certificates.directory,
        wan_delay_ms=0,
        otlp_grpc=None,
        access_log=access_log,
    )
    command = envoy_command(write_config(tmp_path / "envoy.json", config), tmp_path / "envoy.log")
    envoy = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        control = WanControl(ports.admin)

        async def envoy_ready() -> bool:
            assert envoy.returncode is None, "envoy exited; see envoy.log"
            return await asyncio.to_thread(control.ready)

        await eventually(envoy_ready, 10, "envoy not ready; see envoy.log")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=certificates.ca.read_bytes(),
            private_key=certificates.client_key.read_bytes(),
            certificate_chain=certificates.client_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{ports.ingress}", credentials) as channel:
            yield channel, access_log
    finally:
        envoy.terminate()
        await asyncio.wait_for(envoy.wait(), 10)
        await cloud.stop(grace=0)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def _access_lines(log: Path, count: int) -> list[dict[str, str]]:
    """The access log's lines once ``count`` are there (Envoy flushes it every second)."""

    async def written() -> bool:
        return len(await asyncio.to_thread(_lines, log)) >= count

    await eventually(written, 5, f"{log} has fewer than {count} lines")
    return [json.loads(line) for line in await asyncio.to_thread(_lines, log)]


async def test_envoy_routes_only_the_cloud_services_and_the_rest_is_unimplemented(
    envoy_ingress: tuple[grpc.aio.Channel, Path],
) -> None:
    channel, access_log = envoy_ingress
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    for path in (
        "/hybridmesh.registry.v1.RegistryService/Promote",
        "/hybridmesh.edge.v1.EdgeAdminService/Rollback",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/hybridmesh.cloud.v1.CloudServiceX/Infer",
        "/nothing",
    ):
        assert await _raw_call(channel, path, b"") == grpc.StatusCode.UNIMPLEMENTED, path
    # A routed service's unknown method reaches the cloud, which answers UNIMPLEMENTED too.
    routed = "/hybridmesh.cloud.v1.CloudService/Nope"
    assert await _raw_call(channel, routed, b"") == grpc.StatusCode.UNIMPLEMENTED
    # Envoy answered the unrouted paths itself ("NR": no route); they never reached the cloud.
    lines = await _access_lines(access_log, 7)
    flags = {line["path"]: line["response_flags"] for line in lines}
    assert flags["/hybridmesh.registry.v1.RegistryService/Promote"] == "NR"
    assert flags["/nothing"] == "NR"
    assert flags[routed] == "-"
    assert flags["/grpc.health.v1.Health/Check"] == "-"


def test_unknown_tensor_datatype_names_never_raise() -> None:
    from services.tensors import datatype_name

    assert datatype_name(tensor_pb2.DATA_TYPE_UINT8) == "UINT8"
    assert datatype_name(42) == "42"  # type: ignore[arg-type]
    assert model_pb2.ModelRef(name="x").name == "x"
    assert edge_service_pb2.InferRequest().top_k == 0


def test_the_cloud_knows_the_anonymisers_the_edge_has() -> None:
    assert set(ANONYMISERS) == ANONYMISER_NAMES
