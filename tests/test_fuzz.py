"""Fuzz every RPC of the real local mesh (issue 16): router (its own RPCs and the Open
Inference Protocol ones beside them), edge node, edge admin, cloud service direct and
through Envoy (mTLS), registry, all as real processes at the CLI's default log level.

A seeded generator (``HYBRIDMESH_FUZZ_SEED``; ``HYBRIDMESH_FUZZ_CASES`` per RPC) sends
valid messages, mutated ones (odd enum values, long and odd strings, extreme and
negative integers, NaN/Inf floats, extreme durations and timestamps, many repeated
elements), hostile tensors (NaN/Inf payloads, huge, negative and overflowing shapes,
unknown datatypes, short contents), random bytes and corrupted encodings as the body,
unknown methods, 0-1 ms deadlines and cancels mid-call and mid-stream.

Every answer must be a status a caller can act on: never UNKNOWN or INTERNAL, no
exception type or traceback in the message, never later than the deadline + 1 s; an
unknown method is UNIMPLEMENTED (or refused for want of credentials). Afterwards no
process has died, every part is SERVING and the router still classifies a known
Fashion-MNIST image right, on the edge and in the cloud. UNAUTHENTICATED and
PERMISSION_DENIED are acceptable everywhere (the control plane may gain authentication).
``pytest -s`` prints the count per RPC and status.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from google.protobuf import descriptor, message, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as oip_pb2

from hybridmesh.cloud.v1 import cloud_service_pb2
from hybridmesh.common.v1 import model_pb2, routing_pb2, tensor_pb2
from hybridmesh.edge.v1 import edge_admin_pb2, edge_service_pb2
from hybridmesh.registry.v1 import registry_service_pb2 as registry_pb2
from hybridmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
from localmesh.launcher import SITE_TOKEN, LocalMesh, MeshOptions, MeshState, grpc_serving
from router_service.oip_conversion import (
    ATTRIBUTE_PREFIX,
    IGNORED_PARAMETERS,
    OIP_SERVICE_NAME,
    REFUSED_PARAMETERS,
    REQUEST_PARAMETERS,
)
from services.channels import mtls_credentials
from services.errors import ECHO_MAX_CHARS
from services.tensors import encode_tensor
from tests.helpers.item_difficulty import easy_and_hard
from workload.fashion_mnist import load_split

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parent.parent
SEED = int(os.environ.get("HYBRIDMESH_FUZZ_SEED", "1616"))
CASES_PER_RPC = int(os.environ.get("HYBRIDMESH_FUZZ_CASES", "500"))
CONCURRENCY = 8
SLACK_S = 1.0  # an answer may come at most this long after the deadline
CLI_LOG_LEVEL = "warning"  # what `hybridmesh up` runs the services at (localmesh/cli.py)
FORBIDDEN = {"UNKNOWN", "INTERNAL"}
SHORT = {
    "DEADLINE_EXCEEDED": "DEADLINE",
    "FAILED_PRECONDITION": "FAILED_PRECOND",
    "INVALID_ARGUMENT": "INVALID_ARG",
    "PERMISSION_DENIED": "PERM_DENIED",
    "RESOURCE_EXHAUSTED": "RES_EXHAUSTED",
    "UNAUTHENTICATED": "UNAUTHN",
}
# Leaked internals: an exception's type or a traceback in a status message.
LEAKS = ("<class '", "Traceback", 'File "')
# A caller's long string is echoed cut to ECHO_MAX_CHARS (services/errors.py clip).
ECHOES = tuple(c * (ECHO_MAX_CHARS + 1) for c in ("x", "é", "y"))
# In a service's own log after the fuzz: none of these. (OpenTelemetry's "Failed to
# detach context" traceback for a cancelled server stream is upstream noise,
# opentelemetry-python-contrib#2357 / grpc/grpc#42295: counted, not failed.)
LOG_PROBLEMS = ('"level": "error"', '"level": "critical"', "Task was destroyed", "never retrieved")
OTEL_DETACH = "Failed to detach context"

SERVICE_LOGS = ("router", "edge", "cloud", "registry")
SPLIT = load_split("test")
IMAGES = SPLIT.images[:300]
EASY, _ = easy_and_hard(IMAGES, 4)

TENSOR = tensor_pb2.Tensor.DESCRIPTOR.full_name
Factory = Callable[[random.Random], message.Message]


# -- the RPCs and their valid messages ---------------------------------------------------


def image_tensor(rng: random.Random, batch: int = 1) -> tensor_pb2.Tensor:
    start = rng.randrange(len(IMAGES) - batch)
    return encode_tensor("image", IMAGES[start : start + batch])


def request_id(rng: random.Random) -> str:
    return f"fuzz-{rng.getrandbits(48):012x}"


def router_infer(rng: random.Random) -> router_service_pb2.InferRequest:
    return router_service_pb2.InferRequest(
        request_id=request_id(rng),
        model="fashion-mnist",
        inputs=[image_tensor(rng, rng.choice((1, 1, 2, 4)))],
        hints=routing_pb2.RoutingHints(
            privacy_class=rng.choice(list(routing_pb2.PrivacyClass.values())),
            preference=rng.choice(list(routing_pb2.RoutePreference.values())),
        ),
        top_k=rng.choice((0, 1, 3, 10)),
        attributes={"camera": "fuzz"},
    )


def artifact(rng: random.Random) -> registry_pb2.ArtifactRef:
    return rng.choice(
        (
            registry_pb2.ArtifactRef(
                kind=registry_pb2.ARTIFACT_KIND_MODEL, name="fashion-edge", version=1
            ),
            registry_pb2.ArtifactRef(
                kind=registry_pb2.ARTIFACT_KIND_ROUTER_POLICY, name="fashion-mnist", version=1
            ),
        )
    )


def cloud_infer(rng: random.Random) -> cloud_service_pb2.InferRequest:
    return cloud_service_pb2.InferRequest(
        request_id=request_id(rng),
        model=model_pb2.ModelRef(name="fashion-cloud"),
        inputs=[image_tensor(rng)],
        top_k=3,
        privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC,
    )


def site_status(rng: random.Random) -> registry_pb2.ReportSiteStatusRequest:
    reported = timestamp_pb2.Timestamp()
    reported.GetCurrentTime()
    return registry_pb2.ReportSiteStatusRequest(
        status=registry_pb2.SiteStatus(
            site=f"fuzz-site-{rng.randrange(4)}",
            served=[registry_pb2.ServedVersion(artifact=artifact(rng))],
            reported_at=reported,
        )
    )


# The Open Inference Protocol request parameters the router knows (and a free one).
OIP_PARAMETERS = (
    *REQUEST_PARAMETERS,
    *IGNORED_PARAMETERS,
    *REFUSED_PARAMETERS,
    f"{ATTRIBUTE_PREFIX}camera",
)


def oip_parameter(rng: random.Random, name: str) -> oip_pb2.InferParameter:
    """A well-formed value for the router's parameter ``name``."""
    if name == "privacy_class":
        return oip_pb2.InferParameter(string_param=rng.choice(("PUBLIC", "INTERNAL", "SENSITIVE")))
    if name == "preference":
        return oip_pb2.InferParameter(string_param=rng.choice(("AUTO", "EDGE_ONLY", "CLOUD_ONLY")))
    if name == "max_error_probability":
        return oip_pb2.InferParameter(double_param=rng.random())
    if name in ("top_k", "budget_ms", "max_cost_micros", "priority"):
        return oip_pb2.InferParameter(int64_param=rng.choice((1, 3, 500, 100_000)))
    return oip_pb2.InferParameter(string_param="fuzz")


def model_infer(rng: random.Random) -> oip_pb2.ModelInferRequest:
    """tritonclient's ModelInfer: raw or typed contents, some of the routing parameters."""
    batch = rng.choice((1, 1, 2, 4))
    start = rng.randrange(len(IMAGES) - batch)
    images = np.asarray(IMAGES[start : start + batch])
    tensor = oip_pb2.ModelInferRequest.InferInputTensor(
        name="image", datatype="UINT8", shape=list(images.shape)
    )
    request = oip_pb2.ModelInferRequest(
        model_name="fashion-mnist", id=request_id(rng), inputs=[tensor]
    )
    if rng.random() < 0.7:
        request.raw_input_contents.append(images.tobytes())
    else:
        request.inputs[0].contents.uint_contents.extend(int(v) for v in images.ravel())
    for name in rng.sample(REQUEST_PARAMETERS, rng.randrange(len(REQUEST_PARAMETERS))):
        request.parameters[name].CopyFrom(oip_parameter(rng, name))
    if rng.random() < 0.3:
        request.outputs.add(name=rng.choice(("logits", "probabilities", "classification")))
    return request


@dataclass(frozen=True)
class Rpc:
    channel: str  # "router", "edge", "cloud", "cloud@envoy", "registry"
    service: str
    method: str
    streaming: bool
    valid: Factory

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    @property
    def label(self) -> str:
        return f"{self.channel} {self.service.rsplit('.', 1)[-1]}.{self.method}"


ROUTER = "hybridmesh.router.v1.RouterService"
OIP = OIP_SERVICE_NAME
EDGE = "hybridmesh.edge.v1.EdgeService"
EDGE_ADMIN = "hybridmesh.edge.v1.EdgeAdminService"
CLOUD = "hybridmesh.cloud.v1.CloudService"
REGISTRY = "hybridmesh.registry.v1.RegistryService"

RPCS = [
    Rpc("router", ROUTER, "Infer", False, router_infer),
    Rpc(
        "router",
        ROUTER,
        "InferStream",
        True,
        lambda rng: router_service_pb2.InferStreamRequest(request=router_infer(rng)),
    ),
    Rpc(
        "router",
        ROUTER,
        "WatchCorrections",
        True,
        lambda rng: router_service_pb2.WatchCorrectionsRequest(
            model="fashion-mnist", include_recorded=True
        ),
    ),
    Rpc("router", OIP, "ServerLive", False, lambda rng: oip_pb2.ServerLiveRequest()),
    Rpc("router", OIP, "ServerReady", False, lambda rng: oip_pb2.ServerReadyRequest()),
    Rpc("router", OIP, "ServerMetadata", False, lambda rng: oip_pb2.ServerMetadataRequest()),
    Rpc(
        "router",
        OIP,
        "ModelReady",
        False,
        lambda rng: oip_pb2.ModelReadyRequest(name="fashion-mnist", version=rng.choice(("", "1"))),
    ),
    Rpc(
        "router",
        OIP,
        "ModelMetadata",
        False,
        lambda rng: oip_pb2.ModelMetadataRequest(name="fashion-mnist"),
    ),
    Rpc("router", OIP, "ModelInfer", False, model_infer),
    Rpc(
        "edge",
        EDGE,
        "Infer",
        False,
        lambda rng: edge_service_pb2.InferRequest(
            request_id=request_id(rng),
            model=model_pb2.ModelRef(name="fashion-edge"),
            inputs=[image_tensor(rng)],
            top_k=3,
        ),
    ),
    Rpc("edge", EDGE, "ListModels", False, lambda rng: edge_service_pb2.ListModelsRequest()),
    Rpc(
        "edge",
        EDGE_ADMIN,
        "GetUpdateStatus",
        False,
        lambda rng: edge_admin_pb2.GetUpdateStatusRequest(),
    ),
    Rpc(
        "edge",
        EDGE_ADMIN,
        "CheckForUpdates",
        False,
        lambda rng: edge_admin_pb2.CheckForUpdatesRequest(),
    ),
    Rpc(
        "edge",
        EDGE_ADMIN,
        "Rollback",
        False,
        lambda rng: edge_admin_pb2.RollbackRequest(model="fashion-edge"),
    ),
    *(
        rpc
        for channel in ("cloud", "cloud@envoy")
        for rpc in (
            Rpc(channel, CLOUD, "Infer", False, cloud_infer),
            Rpc(
                channel,
                CLOUD,
                "ListModels",
                False,
                lambda rng: cloud_service_pb2.ListModelsRequest(),
            ),
        )
    ),
    Rpc(
        "registry",
        REGISTRY,
        "ListArtifacts",
        False,
        lambda rng: registry_pb2.ListArtifactsRequest(),
    ),
    Rpc(
        "registry",
        REGISTRY,
        "GetManifest",
        False,
        lambda rng: registry_pb2.GetManifestRequest(artifact=artifact(rng)),
    ),
    Rpc(
        "registry",
        REGISTRY,
        "FetchFile",
        True,
        lambda rng: registry_pb2.FetchFileRequest(
            artifact=registry_pb2.ArtifactRef(
                kind=registry_pb2.ARTIFACT_KIND_MODEL, name="fashion-edge", version=1
            ),
            path=rng.choice(("model.onnx", "manifest.json", "MODEL_CARD.md")),
            offset=rng.choice((0, 0, 100)),
            chunk_bytes=rng.choice((0, 4096, 65536)),
        ),
    ),
    Rpc(
        "registry",
        REGISTRY,
        "Promote",
        False,
        lambda rng: registry_pb2.PromoteRequest(artifact=artifact(rng)),
    ),
    Rpc(
        "registry",
        REGISTRY,
        "Rollback",
        False,
        lambda rng: registry_pb2.RollbackRequest(artifact=artifact(rng)),
    ),
    Rpc("registry", REGISTRY, "ReportSiteStatus", False, site_status),
    Rpc("registry", REGISTRY, "ListSites", False, lambda rng: registry_pb2.ListSitesRequest()),
]
SERVICES = {(rpc.channel, rpc.service) for rpc in RPCS}


# -- mutations ------------------------------------------------------------------------------

CPP = descriptor.FieldDescriptor
EXTREME_INTS = {
    CPP.CPPTYPE_INT32: (0, -1, 1, 42, -(2**31), 2**31 - 1),
    CPP.CPPTYPE_INT64: (0, -1, 1, 2**40, -(2**63), 2**63 - 1),
    CPP.CPPTYPE_UINT32: (0, 1, 2**31, 2**32 - 1),
    CPP.CPPTYPE_UINT64: (0, 1, 2**63, 2**64 - 1),
}
ODD_FLOATS = (math.nan, math.inf, -math.inf, -0.0, -1.0, 3.0e38, 1e-45)
ODD_ENUMS = (-1, 42, 99, 2**31 - 1, -(2**31))


def odd_string(rng: random.Random) -> str:
    return rng.choice(
        (
            "",
            " ",
            "x" * 10_000,
            "é" * 3_000,
            "../../../etc/passwd",
            "fashion-mnist\n",
            "\x00\x01\x7f",
            "💥" * 100,
            "%s%n{}",
            "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 300))),
        )
    )


def odd_scalar(field: descriptor.FieldDescriptor, rng: random.Random) -> object:
    kind = field.cpp_type
    if kind in EXTREME_INTS:
        return rng.choice(EXTREME_INTS[kind])
    if kind in (CPP.CPPTYPE_FLOAT, CPP.CPPTYPE_DOUBLE):
        return rng.choice(ODD_FLOATS)
    if kind == CPP.CPPTYPE_BOOL:
        return rng.random() < 0.5
    if kind == CPP.CPPTYPE_ENUM:
        assert field.enum_type is not None
        return rng.choice((*ODD_ENUMS, *(v.number for v in field.enum_type.values)))
    if kind == CPP.CPPTYPE_STRING and field.type == CPP.TYPE_BYTES:
        return rng.randbytes(rng.choice((0, 1, 100, 10_000)))
    return odd_string(rng)


def hostile_tensor(rng: random.Random) -> tensor_pb2.Tensor:
    """NaN/Inf payloads, huge/negative/overflowing shapes, unknown datatypes, bad sizes."""
    image = np.asarray(IMAGES[:1])
    floats = np.full((1, 1, 28, 28), rng.choice((math.nan, math.inf, -math.inf)))
    choice = rng.randrange(12)
    tensor = encode_tensor("image", image)
    if choice == 0:
        tensor = encode_tensor("image", floats.astype(np.float32))
    elif choice == 1:
        tensor = encode_tensor("image", floats.astype(np.float64))
    elif choice == 2:
        tensor.shape[:] = [2**40, 1, 28, 28]
    elif choice == 3:
        tensor.shape[:] = [-1, 1, 28, 28]
    elif choice == 4:
        tensor.shape[:] = [0, 1, 28, 28]
        tensor.raw_contents = b""
    elif choice == 5:
        tensor.shape[:] = [2**62, 2**62, 1, 1]  # the product overflows int64
    elif choice == 6:
        tensor.shape[:] = [1] * 64
    elif choice == 7:
        tensor.datatype = rng.choice(ODD_ENUMS)  # type: ignore[assignment]
    elif choice == 8:
        tensor.raw_contents = tensor.raw_contents[:-1]
    elif choice == 9:
        tensor.shape[:] = []
    elif choice == 10:
        tensor.name = odd_string(rng)
    else:
        tensor.shape[:] = [1, 28, 28]
    return tensor


def tensor_lists(msg: message.Message) -> list[object]:
    """Every repeated Tensor field in ``msg`` and the sub-messages it has set."""
    found: list[object] = []
    for field in msg.DESCRIPTOR.fields:
        if field.message_type is None:
            continue
        if field.is_repeated:
            if field.message_type.full_name == TENSOR:
                found.append(getattr(msg, field.name))
        elif msg.HasField(field.name):
            found.extend(tensor_lists(getattr(msg, field.name)))
    return found


def mutate(msg: message.Message, rng: random.Random, depth: int = 0) -> None:
    """One random change somewhere in ``msg``."""
    fields = msg.DESCRIPTOR.fields
    if not fields:
        return
    field = rng.choice(fields)
    name = field.name
    value = getattr(msg, name)
    try:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for _ in range(rng.choice((1, 2, 500))):
                # A key the services know (the OIP parameters), or an odd one.
                key = rng.choice((odd_string(rng)[:200] or "k", rng.choice(OIP_PARAMETERS)))
                if value_field.message_type is not None:
                    mutate(value[key], rng, depth + 1)  # e.g. an InferParameter's oneof
                elif value_field.cpp_type == CPP.CPPTYPE_STRING:
                    value[key] = odd_string(rng)
                else:
                    value[key] = odd_scalar(value_field, rng)
        elif field.is_repeated and field.message_type is not None:
            if rng.random() < 0.2 or not value:
                msg.ClearField(name) if rng.random() < 0.5 else value.add()
            elif rng.random() < 0.3:
                first = value[0]
                for _ in range(rng.choice((2, 16, 64))):
                    value.add().CopyFrom(first)
            else:
                mutate(rng.choice(value), rng, depth + 1)
        elif field.is_repeated:
            for _ in range(rng.choice((1, 3, 100))):
                value.append(odd_scalar(field, rng))
        elif field.message_type is not None:
            full = field.message_type.full_name
            if rng.random() < 0.2:
                msg.ClearField(name)
            elif full in ("google.protobuf.Duration", "google.protobuf.Timestamp"):
                value.seconds = rng.choice((-(2**62), -1, 0, 253_402_300_800, 2**62, 2**63 - 1))
                value.nanos = rng.choice((0, -1, 999_999_999, 2**31 - 1))
            else:
                value.SetInParent()
                if depth < 4:
                    mutate(value, rng, depth + 1)
        else:
            setattr(msg, name, odd_scalar(field, rng))
    except (ValueError, TypeError):
        pass  # a value the Python API itself refuses: try another change next time


def corrupt(body: bytes, rng: random.Random) -> bytes:
    if not body or rng.random() < 0.3:
        return rng.randbytes(rng.choice((1, 7, 100, 5_000)))
    if rng.random() < 0.5:
        return body[: rng.randrange(len(body))]
    data = bytearray(body)
    for _ in range(rng.choice((1, 4, 32))):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


@dataclass(frozen=True)
class Case:
    rpc: Rpc
    path: str
    body: bytes
    kind: str
    timeout_s: float
    cancel_after_s: float | None  # cancel mid-call (or mid-stream) after this long
    metadata: tuple[tuple[str, str], ...]


def make_case(rpc: Rpc, rng: random.Random, tokens: dict[str, str]) -> Case:
    msg = rpc.valid(rng)
    roll = rng.random()
    if roll < 0.1:
        kind, body = "valid", msg.SerializeToString()
    elif roll < 0.55:
        kind = "mutated"
        for _ in range(rng.choice((1, 1, 2, 4))):
            mutate(msg, rng)
        body = msg.SerializeToString()
    elif roll < 0.75 and (lists := tensor_lists(msg)):
        kind = "tensor"
        target = rng.choice(lists)
        target.append(hostile_tensor(rng))  # type: ignore[attr-defined]
        if rng.random() < 0.7:
            del target[0]  # type: ignore[attr-defined]
        body = msg.SerializeToString()
    elif roll < 0.9:
        kind, body = "bytes", corrupt(msg.SerializeToString(), rng)
    else:
        kind, body = "valid", msg.SerializeToString()
    timing = rng.random()
    if timing < 0.12:
        timeout_s, cancel = rng.choice((0.0, 0.0005, 0.001)), None
        kind += "+deadline<=1ms"
    elif timing < 0.24:
        timeout_s, cancel = 3.0, rng.choice((0.0, 0.002, 0.02, 0.1))
        kind += "+cancel"
    else:
        timeout_s, cancel = (rng.uniform(0.3, 1.0) if rpc.streaming else 3.0), None
    return Case(rpc, rpc.path, body, kind, timeout_s, cancel, credentials(rpc, rng, tokens))


def credentials(
    rpc: Rpc, rng: random.Random, tokens: dict[str, str]
) -> tuple[tuple[str, str], ...]:
    """The token the local mesh gives its router (cloud) or its site and operator
    (registry), mostly, so calls get past authentication to the handlers; none or a bad
    one too. ``tokens``: the registry's ``site`` and ``operator`` tokens."""
    if rpc.channel == "registry":
        token = tokens["operator"] if rpc.method in ("Promote", "Rollback") else tokens["site"]
    elif rpc.channel.startswith("cloud"):
        token = SITE_TOKEN
    else:
        return ()
    roll = rng.random()
    if roll < 0.85:
        return (("authorization", f"Bearer {token}"),)
    if roll < 0.95:
        return ()
    return (("authorization", rng.choice(("Bearer ", "Basic x", "Bearer " + "y" * 4000))),)


def unknown_method_cases(rng: random.Random) -> list[Case]:
    cases = []
    for channel, service in sorted(SERVICES):
        for path in (f"/{service}/NoSuchMethod", "/hybridmesh.nope.v1.NopeService/Infer"):
            rpc = Rpc(channel, service, "<unknown method>", rng.random() < 0.5, RPCS[0].valid)
            metadata = (
                (("authorization", f"Bearer {SITE_TOKEN}"),) if channel.startswith("cloud") else ()
            )
            cases.append(Case(rpc, path, rng.randbytes(20), "unknown", 3.0, None, metadata))
    return cases


# -- running ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    case: Case
    status: str
    details: str
    elapsed_s: float


async def run_case(channel: grpc.aio.Channel, case: Case) -> Outcome:
    started = time.monotonic()
    details = ""
    try:
        if case.rpc.streaming:
            stream = channel.unary_stream(case.path, None, None)(
                case.body, timeout=case.timeout_s, metadata=case.metadata
            )
            if case.cancel_after_s is not None:
                asyncio.get_running_loop().call_later(case.cancel_after_s, stream.cancel)
            async for _ in stream:
                pass
        else:
            call = channel.unary_unary(case.path, None, None)(
                case.body, timeout=case.timeout_s, metadata=case.metadata
            )
            if case.cancel_after_s is not None:
                await asyncio.sleep(case.cancel_after_s)
                call.cancel()
            await call
        status = "OK"
    except grpc.aio.AioRpcError as error:
        status, details = error.code().name, error.details() or ""
    except asyncio.CancelledError:
        status = "CANCELLED"  # by us: the grpc call object raises it when cancelled
    return Outcome(case, status, details, time.monotonic() - started)


async def run_all(channels: dict[str, grpc.aio.Channel], cases: list[Case]) -> list[Outcome]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(case: Case) -> Outcome:
        async with gate:
            try:
                return await asyncio.wait_for(
                    run_case(channels[case.rpc.channel], case), case.timeout_s + SLACK_S + 5
                )
            except TimeoutError:
                return Outcome(case, "HANG", "", case.timeout_s + SLACK_S + 5)

    return await asyncio.gather(*(one(case) for case in cases))


def table(outcomes: list[Outcome]) -> str:
    """Counts per RPC (rows) and status (columns)."""
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for outcome in outcomes:
        counts[outcome.case.rpc.label][outcome.status] += 1
    counts["all"] = collections.Counter(o.status for o in outcomes)
    statuses = sorted({o.status for o in outcomes}, key=lambda s: (s != "OK", s))
    short = {s: SHORT.get(s, s) for s in statuses}
    widths = {s: max(len(short[s]), 5) for s in statuses}
    first = max(len(label) for label in counts)
    header = f"{'rpc':<{first}} " + " ".join(f"{short[s]:>{widths[s]}}" for s in statuses)
    rows = [header + "  total", "-" * (len(header) + 7)]
    for label in [*sorted(set(counts) - {"all"}), "all"]:
        cells = " ".join(f"{counts[label][s] or '':>{widths[s]}}" for s in statuses)
        rows.append(f"{label:<{first}} {cells}  {sum(counts[label].values()):>5}")
    legend = ", ".join(f"{short[s]} = {s}" for s in statuses if short[s] != s)
    return "\n".join([*rows, legend])


@dataclass
class FuzzMesh:
    mesh: LocalMesh
    state: MeshState


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FuzzMesh]:
    mesh = LocalMesh(
        MeshOptions(
            state_dir=tmp_path_factory.mktemp("fuzz-mesh"),
            repository_root=REPO,
            random_ports=True,
            log_level=CLI_LOG_LEVEL,
        )
    )
    state = await mesh.up()
    yield FuzzMesh(mesh, state)
    await mesh.down()


def read_tokens(state: MeshState) -> dict[str, str]:
    """The registry's site and operator tokens the local mesh made."""
    files = state.credentials
    return {
        "site": Path(files["site_token"]).read_text().strip(),
        "operator": Path(files["operator_token"]).read_text().strip(),
    }


def read_log(running: FuzzMesh, name: str) -> str:
    return Path(running.state.logs[name]).read_text(errors="replace")


def open_channels(state: MeshState) -> dict[str, grpc.aio.Channel]:
    endpoints = state.endpoints
    tls = mtls_credentials(Path(state.state_dir) / "router-tls")
    assert tls is not None
    return {
        "router": grpc.aio.insecure_channel(endpoints["router"]),
        "edge": grpc.aio.insecure_channel(endpoints["edge"]),
        "cloud": grpc.aio.insecure_channel(endpoints["cloud"]),
        "cloud@envoy": grpc.aio.secure_channel(endpoints["envoy"], tls),
        "registry": grpc.aio.insecure_channel(endpoints["registry"]),
    }


async def classify(
    stub: router_service_pb2_grpc.RouterServiceAsyncStub, index: int, preference: int
) -> tuple[int, int]:
    reply = await stub.Infer(
        router_service_pb2.InferRequest(
            model="fashion-mnist",
            inputs=[encode_tensor("image", IMAGES[index : index + 1])],
            hints=routing_pb2.RoutingHints(
                privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC,
                preference=preference,  # type: ignore[arg-type]
            ),
            top_k=1,
        ),
        timeout=10,
    )
    return reply.predictions[0].classification.top_k[0].class_index, reply.decision.served_by


@MODULE_LOOP
async def test_every_rpc_answers_fuzzed_input_with_a_status_a_caller_can_act_on(
    running: FuzzMesh,
) -> None:
    rng = random.Random(SEED)
    tokens = await asyncio.to_thread(read_tokens, running.state)
    cases = [make_case(rpc, rng, tokens) for rpc in RPCS for _ in range(CASES_PER_RPC)]
    cases += unknown_method_cases(rng)
    rng.shuffle(cases)
    pids = {name: process.pid for name, process in running.mesh.processes.items()}
    channels = open_channels(running.state)
    started = time.monotonic()
    try:
        outcomes = await run_all(channels, cases)
        fuzz_s = time.monotonic() - started
        sys.stdout.write(
            f"\nfuzz: seed {SEED}, {len(outcomes)} calls in {fuzz_s:.1f} s, "
            f"{CONCURRENCY} in flight\n{table(outcomes)}\n"
        )
        bad = [
            (o.case.rpc.label, o.case.kind, o.status, o.details[:300])
            for o in outcomes
            if o.status in FORBIDDEN
            or o.status == "HANG"
            or any(x in o.details for x in LEAKS)
            or any(x in o.details for x in ECHOES)
        ]
        late = [
            (o.case.rpc.label, o.case.kind, o.status, round(o.elapsed_s, 3), o.case.timeout_s)
            for o in outcomes
            if o.elapsed_s > o.case.timeout_s + SLACK_S
        ]
        unknown_methods = collections.Counter(
            o.status for o in outcomes if o.case.kind == "unknown"
        )
        assert not bad, bad
        assert not late, late
        assert set(unknown_methods) <= {"UNIMPLEMENTED", "UNAUTHENTICATED", "PERMISSION_DENIED"}, (
            unknown_methods
        )
        # Afterwards: no process died (nor was restarted), every part is SERVING...
        assert {n: p.poll() for n, p in running.mesh.processes.items()} == dict.fromkeys(pids)
        assert {n: p.pid for n, p in running.mesh.processes.items()} == pids
        for name in ("router", "edge", "cloud", "registry"):
            assert await grpc_serving(running.state.endpoints[name]), name
        through_envoy = await health_pb2_grpc.HealthStub(channels["cloud@envoy"]).Check(
            health_pb2.HealthCheckRequest(service=CLOUD), timeout=5
        )
        assert through_envoy.status == health_pb2.HealthCheckResponse.SERVING
        # ...their logs hold no error, no task left pending...
        logs = {name: await asyncio.to_thread(read_log, running, name) for name in SERVICE_LOGS}
        sys.stdout.write(
            "service log lines: "
            + ", ".join(f"{name} {len(text.splitlines())}" for name, text in logs.items())
            + "; OpenTelemetry detach noise: "
            + ", ".join(f"{name} {text.count(OTEL_DETACH)}" for name, text in logs.items())
            + "\n"
        )
        problems = [
            (name, line[:300])
            for name, text in logs.items()
            for line in text.splitlines()
            if any(problem in line for problem in LOG_PROBLEMS)
        ]
        assert not problems, problems
        # ...and the router classifies a known image right, on the edge and in the cloud.
        stub = router_service_pb2_grpc.RouterServiceStub(channels["router"])
        label = int(SPLIT.labels[EASY[0]])
        assert await classify(stub, EASY[0], routing_pb2.ROUTE_PREFERENCE_EDGE_ONLY) == (
            label,
            routing_pb2.TIER_EDGE,
        )
        assert await classify(stub, EASY[0], routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY) == (
            label,
            routing_pb2.TIER_CLOUD,
        )
    finally:
        for channel in channels.values():
            await channel.close(None)
