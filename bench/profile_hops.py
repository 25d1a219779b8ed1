"""Where the router and the cloud service spend their CPU under load: py-spy on the
running local mesh, summarised as text (issue 21, "lean hops").

Starts the local mesh (remote edge node, WAN 0 ms) and a second router with the edge model
in its process, then for each target drives closed-loop load and records it with
``py-spy record --format raw --gil`` (collapsed stacks of the thread holding the GIL:
the Python work, wherever it runs; native work with the GIL released, e.g. onnxruntime's
compute in a worker thread, is not in it):

- ``router``: edge-served requests through the remote-edge router;
- ``router_colocated``: the same through the co-located router;
- ``cloud``: the cloud service called directly (in front of Triton).

Each summary gives the samples by where they were spent (our domain code, the gRPC and
interceptor machinery, OpenTelemetry, protobuf, logging, onnxruntime, ...) by the
innermost frame's file, and the top frames by own (self) samples.

``python -m bench.profile_hops --seconds 15 --concurrency 8 --out results/profile``
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from bench.load import throughput
from bench.mesh_bench import CLOUD_MODEL, PAIR, REPO_ROOT, router_request
from hybridmesh.cloud.v1 import cloud_service_pb2, cloud_service_pb2_grpc
from hybridmesh.common.v1 import model_pb2, routing_pb2
from hybridmesh.router.v1 import router_service_pb2_grpc
from localmesh.launcher import SITE_TOKEN, LocalMesh, MeshOptions
from services.tensors import encode_tensor
from workload.fashion_mnist import load_split

PY_SPY = Path(sys.executable).parent / "py-spy"
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*)\)$")
# A frame's file as py-spy prints it (relative to its sys.path entry; OpenTelemetry's
# namespace package shows as its subpackages) -> the bucket its samples are counted in.
BUCKETS = (
    ("onnxruntime", ("onnxruntime/",)),
    (
        "opentelemetry",
        (
            "opentelemetry",
            "trace/",
            "sdk/",
            "util/",
            "attributes/",
            "context/",
            "propagation/",
            "propagators/",
            "_internal/",
            "metrics/",
            "instrumentation/",
            "semconv",
            "baggage/",
            "resources/",
        ),
    ),
    ("grpc", ("grpc/", "grpc_", "_cython/")),
    ("protobuf", ("google/protobuf/",)),
    ("logging", ("structlog/", "logging/")),
    ("asyncio", ("asyncio/",)),
    ("numpy", ("numpy/",)),
    ("our interceptors", ("services/interceptors.py", "services/rpc_metrics.py")),
    ("shared kernel (services/)", ("services/",)),
    ("router domain", ("router_service/",)),
    ("edge domain", ("edge_node/",)),
    ("cloud domain", ("cloud_inference/",)),
    ("tritonclient", ("tritonclient/",)),
    ("generated protos", ("hybridmesh/",)),
    ("python runtime", ("<",)),  # <frozen abc>, <string> (dataclass __init__), ...
)


def bucket(file: str) -> str:
    for name, prefixes in BUCKETS:
        if any(file.startswith(prefix) or f"/{prefix}" in file for prefix in prefixes):
            return name
    return "stdlib and other"


def summarise(raw: str, top: int = 15) -> dict[str, Any]:
    """Samples by bucket of the innermost frame, and the top self frames, from py-spy's
    raw output (``frame;frame;... count`` per line, outermost first)."""
    by_bucket: collections.Counter[str] = collections.Counter()
    by_frame: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        innermost = stack.split(";")[-1]
        match = FRAME.match(innermost)
        file = match["file"] if match else innermost
        function = match["function"] if match else innermost
        short = "/".join(Path(file.split(":")[0]).parts[-2:])
        by_bucket[bucket(file)] += count
        by_frame[f"{function} ({short})"] += count
        total += count
    return {
        "samples": total,
        "buckets": {name: count / total for name, count in by_bucket.most_common()},
        "top_self": [(frame, count / total) for frame, count in by_frame.most_common(top)],
    }


async def record(
    pid: int, seconds: float, load: Callable[[], Awaitable[float]]
) -> tuple[str, float]:
    """py-spy on ``pid`` for ``seconds`` while ``load`` runs; (raw stacks, load's rps)."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        spy = await asyncio.create_subprocess_exec(
            str(PY_SPY), "record", "--pid", str(pid), "--duration", str(int(seconds)),
            "--format", "raw", "--nolineno", "--gil", "--rate", "200", "--output", out.name,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        rate = await load()
        await spy.wait()
        return await asyncio.to_thread(Path(out.name).read_text), rate


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    image = load_split("test").images[:1]
    with tempfile.TemporaryDirectory() as temporary:
        mesh = LocalMesh(
            MeshOptions(
                state_dir=Path(temporary) / "mesh",
                repository_root=REPO_ROOT,
                random_ports=True,
                wan_delay_ms=0,
                log_level="warning",
                edge_mode="remote",
            )
        )
        try:
            state = await mesh.up()
            colocated = await mesh.add_router("router_colocated", "in-process")
            targets = {"router": state.endpoints["router"], "router_colocated": colocated}
            report: dict[str, Any] = {}
            for name, address in targets.items():
                async with grpc.aio.insecure_channel(address) as channel:
                    stub = router_service_pb2_grpc.RouterServiceStub(channel)
                    request = router_request(image, routing_pb2.ROUTE_PREFERENCE_EDGE_ONLY)

                    async def call(stub: Any = stub, request: Any = request) -> object:
                        return await stub.Infer(request, timeout=5)

                    report[name] = await profile(name, mesh.processes[name].pid, call, args)
            cloud_request = cloud_service_pb2.InferRequest(
                request_id="profile",
                model=model_pb2.ModelRef(name=CLOUD_MODEL),
                inputs=[encode_tensor("image", image)],
                top_k=3,
                privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC,
            )
            site = (("authorization", f"Bearer {SITE_TOKEN}"),)
            async with grpc.aio.insecure_channel(state.endpoints["cloud"]) as channel:
                cloud = cloud_service_pb2_grpc.CloudServiceStub(channel)

                async def call_cloud() -> object:
                    return await cloud.Infer(cloud_request, timeout=5, metadata=site)

                report["cloud"] = await profile(
                    "cloud", mesh.processes["cloud"].pid, call_cloud, args
                )
        finally:
            await mesh.down()
    return {"settings": {"pair": PAIR} | {k: str(v) for k, v in vars(args).items()}, **report}


async def profile(
    name: str, pid: int, call: Callable[[], Awaitable[object]], args: argparse.Namespace
) -> dict[str, Any]:
    failed = 0

    async def tolerant() -> object:
        # On a loaded machine a call can miss its deadline; the profile is what matters.
        nonlocal failed
        try:
            return await call()
        except grpc.aio.AioRpcError:
            failed += 1
            return None

    await throughput(tolerant, args.concurrency, 1.0)  # warm up
    raw, rate = await record(
        pid, args.seconds, lambda: throughput(tolerant, args.concurrency, args.seconds)
    )
    if args.out is not None:  # the stacks themselves, for a flame graph or another cut
        args.out.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread((args.out / f"{name}.stacks.txt").write_text, raw)
    return {"throughput_rps": rate, "failed_calls": failed, **summarise(raw)}


def markdown(report: dict[str, Any]) -> str:
    lines = []
    for name in ("router", "router_colocated", "cloud"):
        part = report[name]
        lines += [
            f"**{name}** ({part['samples']} samples, {part['throughput_rps']:.0f} requests/s "
            "while recorded)",
            "",
            "```",
            *(f"{share:6.1%}  {where}" for where, share in part["buckets"].items()),
            "top self frames:",
            *(f"{share:6.1%}  {frame}" for frame, share in part["top_self"]),
            "```",
            "",
        ]
    return "\n".join(lines)


def from_stacks(directory: Path) -> dict[str, Any]:
    """The summaries again from a run's saved stacks and report (another cut)."""
    report: dict[str, Any] = json.loads((directory / "profile_hops.json").read_text())
    for name in ("router", "router_colocated", "cloud"):
        stacks = (directory / f"{name}.stacks.txt").read_text()
        report[name] = {"throughput_rps": report[name]["throughput_rps"], **summarise(stacks)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--from-stacks", type=Path, help="summarise a run's saved stacks (its --out) again"
    )
    args = parser.parse_args()
    report = from_stacks(args.from_stacks) if args.from_stacks else asyncio.run(main_async(args))
    text = markdown(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_hops.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "profile_hops.md").write_text(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
