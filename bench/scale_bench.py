"""Scale benchmark: the router's capacity, its behaviour at 2x that, and 1 vs 2 workers.

The router (``python -m router_service``, remote edge mode) in front of a real edge node,
both their own processes; the cloud is down (nothing listens at its target), and every
request is an image the router keeps on the edge, so the figures are the router's own.
The load comes from ``--clients`` separate processes (one Python process cannot drive
the router past its capacity), each over several connections (SO_REUSEPORT spreads
connections, not calls, over the workers). Per run, for 1 worker:

- ``unloaded``: p50/p99 at concurrency 1;
- ``capacity``: completed requests/s, closed loop at ``--concurrency`` in all (the router
  saturates from concurrency ~4), with each server's CPU microseconds per request
  (bench/cpu.py: /proc utime + stime, a service's workers included);
- ``overload``: an open loop at 2x that capacity for ``--seconds``, each call with a
  ``--deadline-ms`` deadline: goodput (OK answers/s) over capacity, p99 of admitted (OK)
  answers over the unloaded p99, and the slowest RESOURCE_EXHAUSTED answer (client-side,
  so it includes the load generator's own delays);

then ``capacity`` again with 2 workers (the ratio to 1 worker). Runs are repeated
``--runs`` times with the worker counts interleaved; the report gives medians.

``python -m bench.scale_bench --runs 3 --out results/bench/scale_bench.json``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.cpu import CpuMeter
from bench.load import ServerProcess, free_port, median, publish_report
from hybridmesh.common.v1 import routing_pb2
from hybridmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
from services.loop_lag import LoopLag
from services.tensors import encode_tensor
from workload.fashion_mnist import load_split

REPO_ROOT = Path(__file__).resolve().parent.parent
PAIR = "fashion-mnist"
EDGE_MODEL = "fashion-edge"
# Goals of issue 21 (overload at 2x capacity).
GOODPUT_GOAL = 0.9
ADMITTED_P99_GOAL = 3.0
SHED_MAX_MS_GOAL = 10.0
OK = grpc.StatusCode.OK.name


def _request(image: np.ndarray[Any, Any]) -> router_service_pb2.InferRequest:
    return router_service_pb2.InferRequest(
        model=PAIR,
        inputs=[encode_tensor("image", image)],
        top_k=3,
        hints=routing_pb2.RoutingHints(
            privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC,
            preference=routing_pb2.ROUTE_PREFERENCE_AUTO,
        ),
    )


@dataclass(frozen=True)
class LoadSpec:
    """One client process's share of a load phase."""

    address: str
    image_index: int
    mode: str  # "latency" (one at a time), "closed" (concurrency), "open" (rate)
    seconds: float = 0.0
    count: int = 0
    concurrency: int = 1
    rate: float = 0.0
    timeout_s: float = 1.0
    channels: int = 4


@dataclass
class Answer:
    latency_ms: float
    code: str


def _stubs(spec: LoadSpec) -> tuple[list[grpc.aio.Channel], list[Any]]:
    # A local subchannel pool: each channel its own TCP connection (to any worker).
    channels = [
        grpc.aio.insecure_channel(spec.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(spec.channels)
    ]
    return channels, [router_service_pb2_grpc.RouterServiceStub(c) for c in channels]


async def _client(spec: LoadSpec) -> tuple[list[tuple[float, str]], float]:
    """The answers (latency ms, status name) and the peak smoothed lag of this client's
    own event loop in ms (how much of a latency the load generator itself added)."""
    request = _request(load_split("test").images[spec.image_index : spec.image_index + 1])
    channels, stubs = _stubs(spec)
    answers: list[tuple[float, str]] = []
    lag = LoopLag()
    peak_lag_s = 0.0

    async def watch_lag() -> None:
        nonlocal peak_lag_s
        while True:
            await asyncio.sleep(0.05)
            peak_lag_s = max(peak_lag_s, lag.lag_s)

    async def call(stub: Any) -> None:
        started = time.perf_counter()
        try:
            await stub.Infer(request, timeout=spec.timeout_s)
            code = OK
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        answers.append(((time.perf_counter() - started) * 1e3, code))

    for stub in stubs:  # connect and warm up every connection
        for _ in range(20):
            # e.g. still shedding after the previous phase: the phase's answers count.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Infer(request, timeout=5, wait_for_ready=True)
    sampler = asyncio.create_task(lag.run())
    watcher = asyncio.create_task(watch_lag())
    if spec.mode == "latency":
        for index in range(spec.count):
            await call(stubs[index % len(stubs)])
    elif spec.mode == "closed":
        stop_at = time.perf_counter() + spec.seconds

        async def worker(stub: Any) -> None:
            while time.perf_counter() < stop_at:
                await call(stub)

        await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(spec.concurrency)))
    else:  # open loop: request i leaves at i / rate, whatever became of the others
        tasks = []
        started = time.perf_counter()
        for index in range(int(spec.rate * spec.seconds)):
            delay = started + index / spec.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(call(stubs[index % len(stubs)])))
        await asyncio.gather(*tasks)
    sampler.cancel()
    watcher.cancel()
    for channel in channels:
        await channel.close(None)
    return answers, peak_lag_s * 1e3


def _run_client(spec: LoadSpec) -> tuple[list[tuple[float, str]], float]:
    return asyncio.run(_client(spec))


class LoadGenerator:
    """``clients`` load processes (spawned: no gRPC state shared with this one)."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self._pool = ProcessPoolExecutor(clients, mp_context=multiprocessing.get_context("spawn"))
        self.client_lag_ms = 0.0

    def run(self, spec: LoadSpec, clients: int | None = None) -> tuple[list[Answer], float]:
        """All clients' answers and the phase's wall time (s); ``spec`` is one client's.
        ``client_lag_ms``: the largest peak loop lag of a client in this phase."""
        started = time.perf_counter()
        futures = [self._pool.submit(_run_client, spec) for _ in range(clients or self.clients)]
        results = [future.result() for future in futures]
        self.client_lag_ms = max(lag for _, lag in results)
        answers = [Answer(*a) for answers, _ in results for a in answers]
        return answers, time.perf_counter() - started

    def close(self) -> None:
        self._pool.shutdown()


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _edge(directory: Path) -> ServerProcess:
    return ServerProcess(
        ["-m", "edge_node"],
        {
            "HYBRIDMESH_EDGE_PORT": "{port}",
            "HYBRIDMESH_EDGE_MODEL_STORE": str(REPO_ROOT / "models" / "store"),
            "HYBRIDMESH_EDGE_SERVED_MODELS": f'["{EDGE_MODEL}"]',
            "HYBRIDMESH_EDGE_LOG_LEVEL": "warning",
            "HYBRIDMESH_EDGE_UPDATE_STAGING": str(directory / "edge-updates"),
        },
    )


def _router(
    directory: Path, edge: ServerProcess, workers: int, extra: dict[str, str]
) -> ServerProcess:
    state = directory / f"router-{workers}-{time.monotonic_ns()}"
    return ServerProcess(
        ["-m", "router_service"],
        {
            "HYBRIDMESH_ROUTER_PORT": "{port}",
            "HYBRIDMESH_ROUTER_WORKERS": str(workers),
            "HYBRIDMESH_ROUTER_EDGE_TARGET": edge.address,
            # Nothing listens there: the cloud is down, the breaker and health know it.
            "HYBRIDMESH_ROUTER_CLOUD_TARGET": f"127.0.0.1:{free_port()}",
            "HYBRIDMESH_ROUTER_CATALOG": str(REPO_ROOT / "models" / "catalog.toml"),
            "HYBRIDMESH_ROUTER_POLICIES_DIR": str(REPO_ROOT / "models" / "policies"),
            "HYBRIDMESH_ROUTER_OUTBOX_PATH": str(state / "outbox.sqlite"),
            "HYBRIDMESH_ROUTER_AUDIT_LOG_PATH": str(state / "audit.log"),
            "HYBRIDMESH_ROUTER_POLICY_UPDATE_STAGING": str(state / "policy-updates"),
            "HYBRIDMESH_ROUTER_LOG_LEVEL": "warning",
            **extra,
        },
    )


async def _kept_image(address: str) -> int:
    """The index of a test image the router serves from the edge without escalating."""
    images = load_split("test").images
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        for index in range(200):
            reply = await stub.Infer(_request(images[index : index + 1]), timeout=5)
            if reply.decision.served_by == routing_pb2.TIER_EDGE and not reply.decision.degraded:
                return index
    raise RuntimeError("no image of the first 200 is kept on the edge")


def _capacity(
    load: LoadGenerator, address: str, image: int, args: argparse.Namespace, pids: dict[str, int]
) -> dict[str, Any]:
    meter = CpuMeter(pids)
    meter.start()
    spec = LoadSpec(
        address,
        image,
        "closed",
        seconds=args.seconds,
        concurrency=max(args.concurrency // load.clients, 1),
    )
    answers, elapsed = load.run(spec)
    ok = sum(a.code == OK for a in answers)
    # The phase's wall time includes the clients' connection warm-up: count it in the
    # CPU, not in the rate (the rate is over the measured seconds).
    return {
        "rps": ok / args.seconds,
        "errors": dict(Counter(a.code for a in answers if a.code != OK)),
        "cpu_us_per_request": meter.per_request_us(ok),
        "wall_s": elapsed,
    }


def _overload(
    load: LoadGenerator, address: str, image: int, args: argparse.Namespace, capacity: float
) -> dict[str, Any]:
    rate = 2 * capacity
    spec = LoadSpec(
        address,
        image,
        "open",
        seconds=args.seconds,
        rate=rate / load.clients,
        timeout_s=args.deadline_ms / 1e3,
    )
    answers, _ = load.run(spec)
    admitted = [a.latency_ms for a in answers if a.code == OK]
    shed = [a.latency_ms for a in answers if a.code == grpc.StatusCode.RESOURCE_EXHAUSTED.name]
    return {
        "offered_rps": rate,
        "sent": len(answers),
        "codes": dict(Counter(a.code for a in answers)),
        "goodput_rps": len(admitted) / args.seconds,
        "admitted_p50_ms": _percentile(admitted, 50),
        "admitted_p99_ms": _percentile(admitted, 99),
        "shed_p99_ms": _percentile(shed, 99),
        "shed_max_ms": max(shed) if shed else None,
        # The load generator's own share of those latencies (its loop, same cores).
        "client_loop_lag_peak_ms": load.client_lag_ms,
    }


async def one_run(
    load: LoadGenerator, directory: Path, edge: ServerProcess, args: argparse.Namespace, run: int
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    # Interleaved: odd runs measure 2 workers first.
    for workers in (1, 2) if run % 2 == 0 else (2, 1):
        router = _router(directory, edge, workers, dict(args.router_env))
        try:
            await router.wait_serving()
            image = await _kept_image(router.address)
            pids = {"router": router.pid, "edge_node": edge.pid}
            part: dict[str, Any] = {}
            if workers == 1:
                unloaded, _ = load.run(
                    LoadSpec(router.address, image, "latency", count=args.count, channels=1), 1
                )
                latencies = [a.latency_ms for a in unloaded if a.code == OK]
                part["unloaded"] = {
                    "p50_ms": _percentile(latencies, 50),
                    "p99_ms": _percentile(latencies, 99),
                }
            part["capacity"] = await asyncio.to_thread(
                _capacity, load, router.address, image, args, pids
            )
            if workers == 1:
                part["overload"] = await asyncio.to_thread(
                    _overload, load, router.address, image, args, part["capacity"]["rps"]
                )
            result[f"workers_{workers}"] = part
        finally:
            router.stop()
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    one = [run["workers_1"] for run in runs]
    two = [run["workers_2"] for run in runs]

    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return median(present) if present else None

    capacity_1 = med([r["capacity"]["rps"] for r in one])
    capacity_2 = med([r["capacity"]["rps"] for r in two])
    return {
        "unloaded_p50_ms": med([r["unloaded"]["p50_ms"] for r in one]),
        "unloaded_p99_ms": med([r["unloaded"]["p99_ms"] for r in one]),
        "capacity_rps": capacity_1,
        "capacity_2_workers_rps": capacity_2,
        "workers_2_over_1": None if not capacity_1 or not capacity_2 else capacity_2 / capacity_1,
        # Per run, so a ratio compares figures of the same run.
        "goodput_over_capacity": med(
            [r["overload"]["goodput_rps"] / r["capacity"]["rps"] for r in one]
        ),
        "admitted_p99_over_unloaded": med(
            [
                None
                if r["overload"]["admitted_p99_ms"] is None
                else r["overload"]["admitted_p99_ms"] / r["unloaded"]["p99_ms"]
                for r in one
            ]
        ),
        "admitted_p99_ms": med([r["overload"]["admitted_p99_ms"] for r in one]),
        "shed_max_ms": med([r["overload"]["shed_max_ms"] for r in one]),
        "client_loop_lag_peak_ms": med([r["overload"].get("client_loop_lag_peak_ms") for r in one]),
        "shed_share": med(
            [
                r["overload"]["codes"].get("RESOURCE_EXHAUSTED", 0) / r["overload"]["sent"]
                for r in one
            ]
        ),
        "cpu_us_per_request": {
            f"{workers}_worker{'s' if workers > 1 else ''}": {
                name: med([r["capacity"]["cpu_us_per_request"][name] for r in parts])
                for name in ("router", "edge_node")
            }
            for workers, parts in ((1, one), (2, two))
        },
    }


def goals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Goal rows (bench/__main__.py's table): goal, measured (text), met."""

    def row(goal: str, value: float | None, text: str, met: bool) -> dict[str, Any]:
        return {"goal": goal, "measured": "none" if value is None else text, "met": met}

    goodput = summary["goodput_over_capacity"]
    p99 = summary["admitted_p99_over_unloaded"]
    shed = summary["shed_max_ms"]
    ratio = summary["workers_2_over_1"]
    return [
        row(
            f"overload at 2x capacity: goodput >= {GOODPUT_GOAL}x capacity",
            goodput,
            f"{goodput:.2f}x" if goodput is not None else "",
            goodput is not None and goodput >= GOODPUT_GOAL,
        ),
        row(
            f"overload at 2x capacity: admitted p99 <= {ADMITTED_P99_GOAL:.0f}x unloaded p99",
            p99,
            f"{p99:.1f}x" if p99 is not None else "",
            p99 is not None and p99 <= ADMITTED_P99_GOAL,
        ),
        row(
            f"overload at 2x capacity: every shed request answered within "
            f"{SHED_MAX_MS_GOAL:.0f} ms",
            shed,
            f"max {shed:.1f} ms" if shed is not None else "",
            shed is not None and shed <= SHED_MAX_MS_GOAL,
        ),
        row(
            "router throughput, 2 workers over 1 (reported, no goal)",
            ratio,
            f"{ratio:.2f}x" if ratio is not None else "",
            True,
        ),
    ]


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]

    def f(value: float | None, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    cpu = s["cpu_us_per_request"]
    lines = [
        f"Router in front of a real edge node (remote edge mode), cloud down, one kept image "
        f"per request; {report['args']['clients']} load processes; medians of "
        f"{report['args']['runs']} runs (1 and 2 workers interleaved); overload deadline "
        f"{report['args']['deadline_ms']} ms.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| unloaded p50 / p99 (c=1) | {f(s['unloaded_p50_ms'])} / {f(s['unloaded_p99_ms'])} ms |",
        f"| capacity, 1 worker (closed loop, c={report['args']['concurrency']}) | "
        f"{f(s['capacity_rps'], '.0f')} rps |",
        f"| capacity, 2 workers | {f(s['capacity_2_workers_rps'], '.0f')} rps "
        f"({f(s['workers_2_over_1'])}x) |",
        f"| at 2x capacity: goodput / capacity | {f(s['goodput_over_capacity'])} |",
        f"| at 2x capacity: admitted p99 (over unloaded p99) | {f(s['admitted_p99_ms'])} ms "
        f"({f(s['admitted_p99_over_unloaded'], '.1f')}x) |",
        f"| at 2x capacity: share shed, slowest shed answer | {f(s['shed_share'])}, "
        f"{f(s['shed_max_ms'], '.1f')} ms |",
        f"| at 2x capacity: the load generator's own loop lag (peak, smoothed) | "
        f"{f(s['client_loop_lag_peak_ms'], '.1f')} ms |",
        *[
            f"| CPU per request, {name.replace('_', ' ')}: router / edge node | "
            f"{f(value['router'], '.0f')} / {f(value['edge_node'], '.0f')} µs |"
            for name, value in cpu.items()
        ],
    ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    load = LoadGenerator(args.clients)
    runs = []
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as temporary:
        directory = Path(temporary)
        edge = _edge(directory)
        try:
            await edge.wait_serving()
            for run in range(args.runs):
                runs.append(await one_run(load, directory, edge, args, run))
        finally:
            edge.stop()
            load.close()
    summary = summarise(runs)
    return {"args": vars(args) | {"out": str(args.out)}, "runs": runs, "summary": summary,
            "goals": goals(summary)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=300, help="calls of the unloaded phase")
    parser.add_argument("--seconds", type=float, default=4.0, help="each load phase")
    parser.add_argument("--concurrency", type=int, default=16, help="capacity phase, in all")
    parser.add_argument("--clients", type=int, default=2, help="load generator processes")
    parser.add_argument("--deadline-ms", type=float, default=1000.0, help="overload calls")
    parser.add_argument(
        "--router-env",
        action="append",
        default=[],
        type=lambda text: tuple(text.split("=", 1)),
        help="extra router setting, e.g. HYBRIDMESH_ROUTER_MAX_IN_FLIGHT=8 (repeatable)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    publish_report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
