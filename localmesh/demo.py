"""The main job: stream the Fashion-MNIST test split through the router of a running local
mesh three ways (edge only, cloud only, hybrid) and compare them.

Reports accuracy, cloud share, client-side p50/p95/p99 latency, cost per 1,000 requests
and the saving against all-cloud; writes JSON and PNG plots; prints one escalated
request's trace as a tree. The WAN between edge and cloud is emulated (Envoy's fault
filter delay), not a real network.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from hybridmesh.common.v1 import routing_pb2
from hybridmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
from localmesh.otlp_receiver import OtlpReceiver, trace_tree
from services.tensors import encode_tensor
from workload.fashion_mnist import load_split

MODES = {
    "edge only": routing_pb2.ROUTE_PREFERENCE_EDGE_ONLY,
    "cloud only": routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY,
    "hybrid": routing_pb2.ROUTE_PREFERENCE_AUTO,
}


@dataclass
class ModeResult:
    mode: str
    correct: int
    total: int
    cloud_items: int
    degraded: int
    failed: int
    latencies_ms: list[float]
    cost_micros: int
    all_cloud_micros: int
    escalated_trace_id: str

    def summary(self) -> dict[str, Any]:
        latencies = np.array(self.latencies_ms) if self.latencies_ms else np.array([0.0])
        return {
            "mode": self.mode,
            "requests": self.total,
            "accuracy": self.correct / max(self.total - self.failed, 1),
            "cloud_share": self.cloud_items / max(self.total, 1),
            "degraded": self.degraded,
            "failed": self.failed,
            "p50_ms": float(np.percentile(latencies, 50)),
            "p95_ms": float(np.percentile(latencies, 95)),
            "p99_ms": float(np.percentile(latencies, 99)),
            "cost_per_1000_usd": self.cost_micros / max(self.total, 1) * 1000 / 1e6,
            "saved_vs_all_cloud_pct": 100 * (1 - self.cost_micros / max(self.all_cloud_micros, 1)),
        }


async def run_mode(
    stub: router_service_pb2_grpc.RouterServiceAsyncStub,
    mode: str,
    *,
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.int64],
    concurrency: int,
    progress: Progress,
) -> ModeResult:
    result = ModeResult(mode, 0, 0, 0, 0, 0, [], 0, 0, "")
    task = progress.add_task(mode, total=len(labels))
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(labels)):
        queue.put_nowait(index)
    hints = routing_pb2.RoutingHints(
        privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC, preference=MODES[mode]
    )

    async def worker() -> None:
        while not queue.empty():
            index = queue.get_nowait()
            request = router_service_pb2.InferRequest(
                request_id=f"demo-{mode.replace(' ', '-')}-{index}",
                model="fashion-mnist",
                inputs=[encode_tensor("image", images[index : index + 1])],
                hints=hints,
            )
            started = time.perf_counter()
            try:
                reply = await stub.Infer(request, timeout=2.0)
            except grpc.aio.AioRpcError:
                result.failed += 1
            else:
                result.latencies_ms.append((time.perf_counter() - started) * 1e3)
                decision = reply.decision
                top1 = reply.predictions[0].classification.top_k[0].class_index
                result.correct += int(top1 == labels[index])
                result.cloud_items += int(reply.predictions[0].served_by == routing_pb2.TIER_CLOUD)
                result.degraded += int(decision.degraded)
                result.cost_micros += decision.cost.edge_micros + decision.cost.cloud_micros
                result.all_cloud_micros += decision.cost.all_cloud_micros
                if (
                    mode == "hybrid"
                    and not result.escalated_trace_id
                    and decision.served_by == routing_pb2.TIER_CLOUD
                ):
                    result.escalated_trace_id = decision.trace_id
            result.total += 1
            progress.advance(task)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


def write_plots(
    summaries: list[dict[str, Any]], results: list[ModeResult], out: Path
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    figure, axis = plt.subplots(figsize=(7, 4.5))
    evaluation = Path("docs/router-evaluation.json")
    if evaluation.exists():
        curves = json.loads(evaluation.read_text())["curves"]
        shares = np.array(curves["shares"]) * 100
        axis.plot(
            shares,
            np.array(curves["learned_router"]) * 100,
            label="router curve (test split, offline)",
            alpha=0.6,
        )
    for summary in summaries:
        axis.scatter(
            summary["cloud_share"] * 100,
            summary["accuracy"] * 100,
            s=60,
            label=summary["mode"],
            zorder=5,
        )
    axis.set_xlabel("cloud share (%)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title("Accuracy against cloud share, through the running mesh")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    written.append(out / "accuracy_vs_cloud_share.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for result in results:
        values = np.sort(np.array(result.latencies_ms))
        if len(values):
            axis.plot(values, np.linspace(0, 1, len(values)), label=result.mode)
    axis.set_xscale("log")
    axis.set_xlabel("client latency (ms, log scale)")
    axis.set_ylabel("fraction of requests")
    axis.set_title("Latency distribution (emulated 40 ms WAN to the cloud)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(loc="lower right")
    figure.tight_layout()
    written.append(out / "latency_cdf.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    return written


async def run_demo(
    router: str,
    *,
    receiver: OtlpReceiver | None,
    out: Path,
    limit: int,
    concurrency: int,
    console: Console,
) -> dict[str, Any]:
    test = load_split("test")
    images, labels = test.images[:limit], test.labels[:limit]
    results = []
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            for mode in MODES:
                results.append(
                    await run_mode(
                        stub,
                        mode,
                        images=images,
                        labels=labels,
                        concurrency=concurrency,
                        progress=progress,
                    )
                )
    summaries = [result.summary() for result in results]
    report: dict[str, Any] = {
        "requests_per_mode": len(labels),
        "concurrency": concurrency,
        "wan": "emulated by Envoy's fault filter (fixed delay), not a real network",
        "modes": summaries,
    }
    title = f"Fashion-MNIST test split, {len(labels):,} requests per mode"
    table = Table(title=f"{title}, concurrency {concurrency}")
    for column in (
        "mode",
        "accuracy",
        "cloud share",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "$ / 1,000",
        "saved vs all-cloud",
        "degraded",
        "failed",
    ):
        table.add_column(column, justify="right")
    for s in summaries:
        table.add_row(
            s["mode"],
            f"{s['accuracy'] * 100:.2f} %",
            f"{s['cloud_share'] * 100:.1f} %",
            f"{s['p50_ms']:.1f}",
            f"{s['p95_ms']:.1f}",
            f"{s['p99_ms']:.1f}",
            f"${s['cost_per_1000_usd']:.2f}",
            f"{s['saved_vs_all_cloud_pct']:.0f} %",
            str(s["degraded"]),
            str(s["failed"]),
        )
    console.print(table)
    plots = await asyncio.to_thread(write_plots, summaries, results, out)
    trace_id = results[-1].escalated_trace_id
    if receiver is not None and trace_id:
        await asyncio.sleep(1.5)  # exporters batch; let the last spans arrive
        tree = trace_tree(receiver.trace(trace_id))
        report["example_trace"] = {"trace_id": trace_id, "tree": tree}
        console.print(f"\nOne escalated request's trace ({trace_id}):\n{tree}")
    await asyncio.to_thread((out / "demo.json").write_text, json.dumps(report, indent=2) + "\n")
    console.print(f"\nWrote {out / 'demo.json'} and {', '.join(str(p) for p in plots)}")
    return report
