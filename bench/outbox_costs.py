"""Outbox costs on the real local mesh (``python -m bench.outbox_bench costs``; the method
is in bench/outbox_bench.py's docstring): router CPU per queued escalation at several
outbox depths, and the drain of a backlog under a steady light load."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import statistics
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from hybridmesh.common.v1 import routing_pb2
from hybridmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
from localmesh.launcher import LocalMesh, MeshOptions
from router_service.outbox import Outbox, read_stats
from services.tensors import encode_tensor

REPO = Path(__file__).resolve().parent.parent
PAIR = "fashion-mnist"
# Items held back: their next attempt is this far ahead (queued, not due).
HOLD_BACK_S = 1e9
# CPU per escalation at depth 50k within this of depth 0; the drain's goals.
CPU_RATIO_GOAL = 1.1
DRAIN_RATE_GOAL = 100.0
DRAIN_P99_RATIO_GOAL = 1.5


@dataclass(frozen=True)
class Workload:
    images: npt.NDArray[np.uint8]
    # Indices of items the committed policy escalates, with the edge's top-1 class.
    hard: list[int]
    edge_class: dict[int, int]


@dataclass
class Options:
    runs: int = 3
    depths: Sequence[int] = (0, 5_000, 50_000)
    escalations: int = 400
    backlog: int = 5_000
    load_per_s: float = 20.0
    before_s: float = 15.0
    drain_timeout_s: float = 300.0
    router_environment: dict[str, str] = field(default_factory=dict)


def cpu_s(pid: int) -> float:
    """utime + stime of a process in seconds (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tensor(images: npt.NDArray[np.uint8], index: int) -> bytes:
    return encode_tensor("image", images[index : index + 1]).SerializeToString()


def prefill(path: Path, workload: Workload, depth: int, history: int, due_at: float) -> None:
    """A fresh outbox file holding ``depth`` queued items (due at ``due_at``) and
    ``history`` reconciled rows, written in one transaction (what a long outage leaves)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    Outbox(path, max_items=1).close()  # the schema, counters and triggers
    now = time.time()
    hard = workload.hard
    db = sqlite3.connect(path)
    with db:
        db.executemany(
            "INSERT INTO outbox (request_id, priority, enqueued_at, pair, privacy_class, top_k,"
            " item_indices, edge_classes, edge_model, inputs, next_attempt_at)"
            " VALUES (?, 1, ?, ?, ?, 1, '[0]', ?, 'fashion-edge:1', ?, ?)",
            (
                (
                    f"backlog-{n}",
                    now - depth + n,
                    PAIR,
                    routing_pb2.PRIVACY_CLASS_PUBLIC,
                    f"[{workload.edge_class[hard[n % len(hard)]]}]",
                    _tensor(workload.images, hard[n % len(hard)]),
                    due_at,
                )
                for n in range(depth)
            ),
        )
        db.executemany(
            "INSERT INTO reconciled (request_id, item_index, pair, enqueued_at, reconciled_at,"
            " edge_model, edge_class, cloud_model, cloud_class, agrees, input)"
            " VALUES (?, 0, ?, ?, ?, 'fashion-edge:1', 3, 'fashion-cloud:1', ?, ?, ?)",
            (
                (f"history-{n}", PAIR, now, now, 3 if n % 5 else 4, int(n % 5 != 0), b"x" * 800)
                for n in range(history)
            ),
        )
    db.close()


def request(workload: Workload, index: int, request_id: str) -> router_service_pb2.InferRequest:
    return router_service_pb2.InferRequest(
        request_id=request_id,
        model=PAIR,
        inputs=[encode_tensor("image", workload.images[index : index + 1])],
        hints=routing_pb2.RoutingHints(privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC),
    )


def _print(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


class Bench:
    def __init__(self, mesh: LocalMesh, workload: Workload, options: Options) -> None:
        self.mesh = mesh
        self.workload = workload
        self.options = options
        self.sent = 0

    @property
    def router_pid(self) -> int:
        return self.mesh.processes["router"].pid

    async def restart_router(self, depth: int, history: int, due_at: float) -> None:
        await self.mesh.kill("router")
        prefill(self.mesh.outbox_path, self.workload, depth, history, due_at)
        await self.mesh.restart("router")

    async def escalation_cost(self, run: int, depth: int) -> dict[str, Any]:
        """Router CPU per queued escalation with ``depth`` items queued (cloud down)."""
        await self.restart_router(depth, depth, time.time() + HOLD_BACK_S)
        hard = self.workload.hard
        latencies = []
        async with grpc.aio.insecure_channel(self.mesh.endpoint("router")) as channel:
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            count = self.options.escalations
            warmup = 50  # the breaker opens and the health watch marks the cloud down
            cpu_before = 0.0
            for n in range(warmup + count):
                if n == warmup:
                    cpu_before = cpu_s(self.router_pid)
                self.sent += 1
                started = time.perf_counter()
                reply = await stub.Infer(
                    request(self.workload, hard[n % len(hard)], f"esc-{self.sent}"), timeout=5
                )
                latencies.append(time.perf_counter() - started)
                if not reply.decision.queued_for_reconciliation:
                    raise RuntimeError(f"esc-{self.sent} was not queued")
            cpu_used = cpu_s(self.router_pid) - cpu_before
        measured = np.array(latencies[warmup:]) * 1e3
        result = {
            "run": run,
            "depth": depth,
            "history": depth,
            "escalations": count,
            "router_cpu_us_per_escalation": cpu_used / count * 1e6,
            "p50_ms": float(np.percentile(measured, 50)),
            "p99_ms": float(np.percentile(measured, 99)),
        }
        _print(result)
        return result

    async def drain(self, run: int) -> dict[str, Any]:
        """The backlog's drain under a steady light load; the load's p99 before and during."""
        options = self.options
        await self.restart_router(options.backlog, 0, time.time() + HOLD_BACK_S)
        samples: list[tuple[float, float, bool]] = []  # (sent at, latency s, ok)
        stop = asyncio.Event()
        images = self.workload.images

        async def load(stub: router_service_pb2_grpc.RouterServiceAsyncStub) -> None:
            interval = 1.0 / options.load_per_s
            next_at = time.perf_counter()
            n = 0
            while not stop.is_set():
                next_at += interval
                self.sent += 1
                started = time.perf_counter()
                try:
                    await stub.Infer(
                        request(self.workload, n % len(images), f"load-{self.sent}"), timeout=5
                    )
                    ok = True
                except grpc.aio.AioRpcError:
                    ok = False
                samples.append((started, time.perf_counter() - started, ok))
                n += 1
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

        path = self.mesh.outbox_path
        async with grpc.aio.insecure_channel(self.mesh.endpoint("router")) as channel:
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            for n in range(50):  # warm-up: channels, breaker closed, health known
                await stub.Infer(request(self.workload, n, f"warm-{run}-{n}"), timeout=5)
            loader = asyncio.create_task(load(stub))
            await asyncio.sleep(options.before_s)
            cpu_before = cpu_s(self.router_pid)
            released = time.perf_counter()
            await asyncio.to_thread(_release, path)
            deadline = released + options.drain_timeout_s
            while read_stats(path).reconciled_items < options.backlog:
                if time.perf_counter() > deadline:
                    stop.set()
                    await loader
                    raise TimeoutError(f"the backlog did not drain in {options.drain_timeout_s} s")
                await asyncio.sleep(0.2)
            drained = time.perf_counter()
            cpu_used = cpu_s(self.router_pid) - cpu_before
            stop.set()
            await loader
        before = [lat for at, lat, _ in samples if at < released]
        during = [lat for at, lat, _ in samples if released <= at <= drained]
        failed = sum(1 for _, _, ok in samples if not ok)
        p99_before = float(np.percentile(before, 99)) * 1e3
        p99_during = float(np.percentile(during, 99)) * 1e3
        result = {
            "run": run,
            "backlog": options.backlog,
            "drain_s": drained - released,
            "drain_per_s": options.backlog / (drained - released),
            "router_cpu_us_per_drained_item": cpu_used / options.backlog * 1e6,
            "load_per_s": options.load_per_s,
            "p50_before_ms": float(np.percentile(before, 50)) * 1e3,
            "p99_before_ms": p99_before,
            "p50_during_ms": float(np.percentile(during, 50)) * 1e3,
            "p99_during_ms": p99_during,
            "p99_ratio": p99_during / p99_before,
            "requests_before": len(before),
            "requests_during": len(during),
            "failed": failed,
            "drain_metrics": await asyncio.to_thread(self.drain_metrics),
        }
        _print(result)
        return result

    def drain_metrics(self) -> dict[str, float]:
        """The router's hybridmesh_outbox_drain_* samples from its Prometheus /metrics."""
        url = f"http://127.0.0.1:{self.mesh.ports['router_metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return {
            name: float(value)
            for name, _, value in (line.rpartition(" ") for line in text.splitlines())
            if name.startswith("hybridmesh_outbox_drain")
        }


def _release(path: Path) -> None:
    """Every held-back item becomes due (as when the cloud is back after an outage)."""
    db = sqlite3.connect(path, timeout=10)
    with db:
        db.execute("UPDATE outbox SET next_attempt_at = 0")
    db.close()


def load_workload() -> Workload:
    import onnxruntime as ort

    from router_service.escalation import EscalationClassifier, latest_policy
    from router_service.features import router_features
    from services.classification import softmax
    from services.views import apply_view
    from workload.fashion_mnist import load_split

    images = load_split("test").images[:2000]
    session = ort.InferenceSession(str(REPO / "models/store/fashion-edge/1/model.onnx"))
    (logits,) = session.run(["logits"], {"image": images})
    logits = np.asarray(logits, dtype=np.float32)
    classifier = EscalationClassifier(latest_policy(REPO / f"models/policies/{PAIR}"))
    # The policy's test-time views (services.views), as the router asks the edge for them.
    views = {}
    for view in classifier.metadata.views:
        (view_logits,) = session.run(["logits"], {"image": apply_view(view, images)})
        views[view] = softmax(np.asarray(view_logits, dtype=np.float32))
    scores = classifier.score(router_features(softmax(logits), images, views))
    hard = [int(i) for i in np.flatnonzero(scores >= classifier.threshold)]
    return Workload(images, hard, {i: int(np.argmax(logits[i])) for i in hard})


async def measure(options: Options, state_dir: Path) -> dict[str, Any]:
    workload = load_workload()
    bookkeeping = bookkeeping_cost(options.depths, workload)
    mesh = LocalMesh(
        MeshOptions(
            state_dir=state_dir,
            repository_root=REPO,
            random_ports=True,
            log_level="warning",
            cloud_intake_log=False,
            router_environment={
                "HYBRIDMESH_ROUTER_OUTBOX_MAX_ITEMS": str(max(options.depths) + 100_000),
                "HYBRIDMESH_ROUTER_OUTBOX_MAX_EXAMPLES": str(max(options.depths) + 100_000),
                "HYBRIDMESH_ROUTER_DRAIN_IDLE_S": "0.2",
                **options.router_environment,
            },
        )
    )
    await mesh.up()
    costs: list[dict[str, Any]] = []
    drains: list[dict[str, Any]] = []
    try:
        bench = Bench(mesh, workload, options)
        await mesh.kill("cloud")
        for run in range(options.runs):
            for depth in options.depths:  # interleaved: each run sees every depth
                costs.append(await bench.escalation_cost(run, depth))
        await mesh.restart("cloud")
        for run in range(options.runs):
            drains.append(await bench.drain(run))
    finally:
        await mesh.down()
    return {**summarise(options, costs, drains), "in_process_outbox_us": bookkeeping}


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(row[key] for row in rows))


def summarise(
    options: Options, costs: list[dict[str, Any]], drains: list[dict[str, Any]]
) -> dict[str, Any]:
    by_depth = {
        depth: {
            "router_cpu_us_per_escalation": _median(rows, "router_cpu_us_per_escalation"),
            "p50_ms": _median(rows, "p50_ms"),
            "p99_ms": _median(rows, "p99_ms"),
        }
        for depth in options.depths
        if (rows := [row for row in costs if row["depth"] == depth])
    }
    base = by_depth[min(options.depths)]["router_cpu_us_per_escalation"]
    deepest = max(options.depths)
    cpu_ratio = by_depth[deepest]["router_cpu_us_per_escalation"] / base
    drain = {
        key: _median(drains, key)
        for key in (
            "drain_per_s",
            "drain_s",
            "router_cpu_us_per_drained_item",
            "p50_before_ms",
            "p99_before_ms",
            "p50_during_ms",
            "p99_during_ms",
            "p99_ratio",
        )
    }
    goals = [
        {
            "goal": f"outbox: router CPU per queued escalation at depth {deepest:,} "
            f"≤ {CPU_RATIO_GOAL}x depth {min(options.depths)}",
            "measured": f"{cpu_ratio:.2f}x ({by_depth[deepest]['router_cpu_us_per_escalation']:.0f}"
            f" vs {base:.0f} µs)",
            "met": cpu_ratio <= CPU_RATIO_GOAL,
        },
        {
            "goal": f"outbox: drain of {options.backlog:,} items ≥ {DRAIN_RATE_GOAL:.0f} items/s",
            "measured": f"{drain['drain_per_s']:.0f} items/s",
            "met": drain["drain_per_s"] >= DRAIN_RATE_GOAL,
        },
        {
            "goal": f"outbox: router p99 during the drain ≤ {DRAIN_P99_RATIO_GOAL}x before",
            "measured": f"{drain['p99_ratio']:.2f}x ({drain['p99_during_ms']:.1f} vs "
            f"{drain['p99_before_ms']:.1f} ms)",
            "met": drain["p99_ratio"] <= DRAIN_P99_RATIO_GOAL,
        },
    ]
    return {
        "options": {
            "runs": options.runs,
            "depths": list(options.depths),
            "escalations": options.escalations,
            "backlog": options.backlog,
            "load_per_s": options.load_per_s,
            "before_s": options.before_s,
            "router_environment": options.router_environment,
        },
        "escalation_cost": {str(depth): row for depth, row in by_depth.items()},
        "drain": drain,
        "goals": goals,
        "runs": {"escalation_cost": costs, "drain": drains},
    }


def markdown(report: dict[str, Any]) -> str:
    options = report["options"]
    lines = [
        f"Router CPU per queued escalation (cloud service down; utime + stime of the router "
        f"process from /proc over {options['escalations']} hard requests sent one at a time, "
        f"each answered by the edge and queued; the outbox holds `depth` queued items and as "
        f"many reconciled rows; medians of {options['runs']} interleaved runs):",
        "",
        "| depth | router CPU µs / escalation | p50 ms | p99 ms |",
        "| ---: | ---: | ---: | ---: |",
        *[
            f"| {int(depth):,} | {row['router_cpu_us_per_escalation']:.0f} | "
            f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} |"
            for depth, row in report["escalation_cost"].items()
        ],
        "",
        "The outbox's own share, measured in the benchmark's process (put + age read + "
        "stats per escalation, synchronous NORMAL, CPU µs, median of 3 passes of 500): "
        + ", ".join(
            f"depth {int(depth):,}: {us:.0f} µs"
            for depth, us in report.get("in_process_outbox_us", {}).items()
        )
        + ".",
        "",
        f"Drain of {options['backlog']:,} queued items (released at once, as when the cloud "
        f"is back) under a steady load of {options['load_per_s']:.0f} requests/s (the test "
        f"split in order), medians of {options['runs']} runs (each column its own median; "
        "the ratio is the median of the per-run ratios):",
        "",
        "| drain items/s | drain s | router CPU µs / item | load p50 before / during ms "
        "| load p99 before / during ms | p99 ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    d = report["drain"]
    lines.append(
        f"| {d['drain_per_s']:.0f} | {d['drain_s']:.1f} | "
        f"{d['router_cpu_us_per_drained_item']:.0f} | "
        f"{d['p50_before_ms']:.1f} / {d['p50_during_ms']:.1f} | "
        f"{d['p99_before_ms']:.1f} / {d['p99_during_ms']:.1f} | {d['p99_ratio']:.2f}x |"
    )
    return "\n".join(lines)


def run(options: Options, out: Path | None) -> dict[str, Any]:
    import tempfile

    from bench.load import publish_report

    with tempfile.TemporaryDirectory() as state_dir:
        report = asyncio.run(measure(options, Path(state_dir)))
    publish_report(out, report, markdown(report))
    return report


def bookkeeping_cost(depths: Sequence[int], workload: Workload, puts: int = 500) -> dict[str, Any]:
    """In this process: the outbox's own work per queued escalation at each depth (and as
    many history rows), i.e. what the router does per escalation during an outage:
    ``put`` (synchronous NORMAL, so fsync does not drown the figure), the age read and
    ``stats``; CPU µs per escalation from ``time.process_time``, median of 3 passes."""
    import tempfile

    from router_service.outbox import OutboxItem, Priority

    payload = _tensor(workload.images, workload.hard[0])
    result: dict[str, Any] = {}
    for depth in depths:
        passes = []
        for attempt in range(3):
            with tempfile.TemporaryDirectory() as directory:
                path = Path(directory) / "outbox.sqlite"
                prefill(path, workload, depth, depth, time.time() + HOLD_BACK_S)
                outbox = Outbox(path, max_items=depth + puts + 1, synchronous="NORMAL")
                started = time.process_time()
                for n in range(puts):
                    outbox.put(
                        OutboxItem(
                            f"new-{attempt}-{n}", Priority.ESCALATION, PAIR, 1, 1, (0,), (3,),
                            "fashion-edge:1", payload,
                        )
                    )  # fmt: skip
                    outbox.oldest_age_s()
                    outbox.stats()
                passes.append((time.process_time() - started) / puts * 1e6)
                outbox.close()
        result[str(depth)] = float(statistics.median(passes))
        _print({"in_process_outbox_us_per_escalation": result[str(depth)], "depth": depth})
    return result
