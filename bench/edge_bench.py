"""Edge node benchmark: direct edge_node calls next to a bare grpc.aio echo server.

Both run as separate processes on loopback with the same contract and payload (one uint8
Fashion-MNIST image, as the router sends it). Reports p50/p99 at concurrency 1 and
throughput at concurrency 32, medians over ``--runs`` runs, and the ratios. Also measures
what micro-batching could save: the model's compute per item at batch 1 against batch 32.
``python -m bench.edge_bench --runs 3 --out results/edge_bench.json``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import onnxruntime as ort

from bench.load import ServerProcess, latency, median, throughput
from hybridmesh.common.v1 import model_pb2
from hybridmesh.edge.v1 import edge_service_pb2, edge_service_pb2_grpc
from services.tensors import encode_tensor
from workload.fashion_mnist import load_split

STORE = Path("models/store")


async def measure(
    address: str, request: edge_service_pb2.InferRequest, args: argparse.Namespace
) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = edge_service_pb2_grpc.EdgeServiceStub(channel)

        async def call() -> object:
            return await stub.Infer(request, timeout=5)

        single = await latency(call, args.count)
        rate = await throughput(call, args.concurrency, args.seconds)
    return {"p50_ms": single.p50_ms, "p99_ms": single.p99_ms, "throughput_rps": rate}


def compute_per_item_us() -> dict[str, float]:
    version_dir = STORE / "fashion-edge" / "1"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(version_dir / "model.onnx"), options)
    images = load_split("test").images[:32]
    results = {}
    for batch in (1, 32):
        feed = {"image": images[:batch]}
        for _ in range(50):
            session.run(None, feed)
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(100):
                session.run(None, feed)
            runs.append((time.perf_counter() - started) / 100 / batch * 1e6)
        results[f"batch{batch}_us_per_item"] = median(runs)
    return results


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    image = load_split("test").images[:1]
    request = edge_service_pb2.InferRequest(
        request_id="bench",
        model=model_pb2.ModelRef(name="fashion-edge"),
        inputs=[encode_tensor("image", image)],
        top_k=3,
    )
    scenarios: dict[str, list[dict[str, float]]] = {"echo": [], "edge_node": []}
    for _ in range(args.runs):
        echo = ServerProcess(["-m", "bench.echo_server", "--port", "{port}"])
        edge = ServerProcess(
            ["-m", "edge_node"],
            env={
                "HYBRIDMESH_EDGE_PORT": "{port}",
                "HYBRIDMESH_EDGE_SERVED_MODELS": '["fashion-edge"]',
                "HYBRIDMESH_EDGE_LOG_LEVEL": "warning",
            },
        )
        try:
            await echo.wait_serving(health=False)
            await edge.wait_serving()
            scenarios["echo"].append(await measure(echo.address, request, args))
            scenarios["edge_node"].append(await measure(edge.address, request, args))
        finally:
            echo.stop()
            edge.stop()
    summary = {
        name: {key: median([run[key] for run in runs]) for key in runs[0]}
        for name, runs in scenarios.items()
    }
    ratios = {
        "p50_edge_over_echo": summary["edge_node"]["p50_ms"] / summary["echo"]["p50_ms"],
        "p99_edge_over_echo": summary["edge_node"]["p99_ms"] / summary["echo"]["p99_ms"],
        "throughput_edge_over_echo": summary["edge_node"]["throughput_rps"]
        / summary["echo"]["throughput_rps"],
    }
    return {
        "runs": scenarios,
        "median": summary,
        "ratios": ratios,
        "compute": compute_per_item_us(),
        "settings": {
            "count": args.count,
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "runs": args.runs,
        },
    }


def markdown(report: dict[str, Any]) -> str:
    median_ = report["median"]
    lines = [
        "| scenario | p50 ms (c=1) | p99 ms (c=1) | throughput rps (c=32) |",
        "| --- | --- | --- | --- |",
    ]
    for name in ("echo", "edge_node"):
        row = median_[name]
        lines.append(
            f"| {name} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {row['throughput_rps']:.0f} |"
        )
    ratios = report["ratios"]
    compute = report["compute"]
    lines += [
        "",
        f"edge_node / echo: p50 {ratios['p50_edge_over_echo']:.2f}x, "
        f"p99 {ratios['p99_edge_over_echo']:.2f}x, "
        f"throughput {ratios['throughput_edge_over_echo']:.2f}x",
        f"model compute per item: batch 1 {compute['batch1_us_per_item']:.1f} µs, "
        f"batch 32 {compute['batch32_us_per_item']:.1f} µs",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=1000)
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
