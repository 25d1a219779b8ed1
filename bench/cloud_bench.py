"""Cloud path benchmark: cloud_inference in front of Triton, next to tritonclient calling
the same Triton directly, with Triton's dynamic batching on and off.

Triton (the bundled CPU build, python backend running onnxruntime) and cloud_inference
run as their own processes on loopback; one uint8 Fashion-MNIST image per request.
Each run starts a fresh Triton and cloud_inference and measures both paths against that
same Triton (which path goes first alternates between runs); the table shows medians.
``python -m bench.cloud_bench --runs 3 --out results/cloud_bench.json``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import tritonclient.grpc.aio as triton_grpc

from bench.load import ServerProcess, latency, median, throughput
from cloud_inference.auth import token_sha256
from hybridmesh.cloud.v1 import cloud_service_pb2, cloud_service_pb2_grpc
from hybridmesh.common.v1 import model_pb2, routing_pb2
from localmesh.triton import TritonServer
from services.tensors import encode_tensor
from workload.fashion_mnist import load_split
from workload.triton_repository import write_repository

STORE = Path("models/store")
MODEL = "fashion-cloud"
TOKEN = "bench-token"


async def measure_direct(url: str, args: argparse.Namespace) -> dict[str, float]:
    image = load_split("test").images[:1]
    client = triton_grpc.InferenceServerClient(url)
    tensor = triton_grpc.InferInput("image", [1, 1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(image)

    async def call() -> object:
        return await client.infer(MODEL, [tensor], client_timeout=5)

    try:
        single = await latency(call, args.count)
        rate = await throughput(call, args.concurrency, args.seconds)
    finally:
        await client.close()
    return {"p50_ms": single.p50_ms, "p99_ms": single.p99_ms, "throughput_rps": rate}


async def measure_service(address: str, args: argparse.Namespace) -> dict[str, float]:
    request = cloud_service_pb2.InferRequest(
        request_id="bench",
        model=model_pb2.ModelRef(name=MODEL),
        inputs=[encode_tensor("image", load_split("test").images[:1])],
        top_k=3,
        privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC,
    )
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = cloud_service_pb2_grpc.CloudServiceStub(channel)

        async def call() -> object:
            return await stub.Infer(request, timeout=5, metadata=metadata)

        single = await latency(call, args.count)
        rate = await throughput(call, args.concurrency, args.seconds)
    return {"p50_ms": single.p50_ms, "p99_ms": single.p99_ms, "throughput_rps": rate}


async def one_run(
    base: Path, dynamic: bool, args: argparse.Namespace, direct_first: bool
) -> dict[str, dict[str, float]]:
    label = "dynamic" if dynamic else "static"
    repository = base / f"repo-{label}"
    if not repository.exists():
        write_repository(STORE, repository, "local", [MODEL], dynamic_batching=dynamic)
    started = time.monotonic()
    async with TritonServer(repository, base / f"run-{label}") as triton:
        ready_s = time.monotonic() - started
        service = ServerProcess(
            ["-m", "cloud_inference"],
            env={
                "HYBRIDMESH_CLOUD_PORT": "{port}",
                "HYBRIDMESH_CLOUD_TRITON_URL": triton.grpc_url,
                "HYBRIDMESH_CLOUD_SITE_TOKEN_SHA256": json.dumps({"bench": token_sha256(TOKEN)}),
                "HYBRIDMESH_CLOUD_LOG_LEVEL": "warning",
            },
        )
        try:
            await service.wait_serving()
            if direct_first:
                direct = await measure_direct(triton.grpc_url, args)
                via_service = await measure_service(service.address, args)
            else:
                via_service = await measure_service(service.address, args)
                direct = await measure_direct(triton.grpc_url, args)
        finally:
            service.stop()
    return {
        "triton_direct": direct,
        "cloud_inference": via_service,
        "triton_start": {"ready_s": ready_s},
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"settings": vars(args) | {"out": str(args.out)}}
    with tempfile.TemporaryDirectory() as temporary:
        for dynamic in (True, False):
            label = "dynamic_batching_on" if dynamic else "dynamic_batching_off"
            runs = [
                await one_run(Path(temporary), dynamic, args, direct_first=index % 2 == 0)
                for index in range(args.runs)
            ]
            summary = {
                scenario: {
                    key: median([run[scenario][key] for run in runs]) for key in runs[0][scenario]
                }
                for scenario in runs[0]
            }
            direct, service = summary["triton_direct"], summary["cloud_inference"]
            report[label] = {
                "runs": runs,
                "median": summary,
                "ratios": {
                    "p50_service_over_direct": service["p50_ms"] / direct["p50_ms"],
                    "p99_service_over_direct": service["p99_ms"] / direct["p99_ms"],
                    "throughput_service_over_direct": service["throughput_rps"]
                    / direct["throughput_rps"],
                },
            }
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| batching | path | p50 ms (c=1) | p99 ms (c=1) | rps (c=32) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label in ("dynamic_batching_on", "dynamic_batching_off"):
        for scenario in ("triton_direct", "cloud_inference"):
            row = report[label]["median"][scenario]
            lines.append(
                f"| {label.removeprefix('dynamic_batching_')} | {scenario} | {row['p50_ms']:.3f} "
                f"| {row['p99_ms']:.3f} | {row['throughput_rps']:.0f} |"
            )
    for label in ("dynamic_batching_on", "dynamic_batching_off"):
        ratios = report[label]["ratios"]
        lines.append(
            f"\n{label}: cloud_inference / direct p50 {ratios['p50_service_over_direct']:.2f}x, "
            f"p99 {ratios['p99_service_over_direct']:.2f}x, "
            f"throughput {ratios['throughput_service_over_direct']:.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    sys.stdout.write(markdown(report) + "\n")


if __name__ == "__main__":
    main()
