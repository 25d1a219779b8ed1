"""Faults under load on the local mesh: what callers see while parts fail and recover.

Each scenario starts a fresh local mesh, drives the router with a closed loop of
``--concurrency`` callers cycling through the Fashion-MNIST test split (so about one in
five requests is escalated), each call with a 1 s deadline, and on a fixed timeline
injects one fault and later removes it:

- ``cloud_killed``: the cloud service process is SIGKILLed, later restarted;
- ``wan_spike``: the emulated WAN delay jumps to 2 s, beyond every deadline;
- ``cloud_failing_20pct``: Envoy's fault filter fails 20 % of cloud calls (UNAVAILABLE);
- ``edge_killed``: the edge node process is SIGKILLed, later restarted.

Reported per scenario: success rate, degraded share, p50/p99 (all and during the fault),
time until the router's breaker opened (from the router's own "breaker state change" log
lines), and time until escalation (or the edge) served again after recovery.
``python -m bench.fault_bench --out results/fault_bench.json``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from bench.load import publish_report
from bench.mesh_bench import router_request
from hybridmesh.common.v1 import decision_pb2, routing_pb2
from hybridmesh.router.v1 import router_service_pb2_grpc
from localmesh.launcher import LocalMesh, MeshOptions
from workload.fashion_mnist import load_split

DEADLINE_S = 1.0
WAN_MS = 40
REPO_ROOT = Path(__file__).resolve().parent.parent
CLOUD_TIERS = (routing_pb2.TIER_CLOUD, routing_pb2.TIER_EDGE_AND_CLOUD)


@dataclass(frozen=True)
class Sample:
    """One call as the caller saw it; times in seconds since the scenario started."""

    started: float
    latency_s: float
    code: str
    served_by: int = 0
    reason: int = 0
    degraded: bool = False

    @property
    def finished(self) -> float:
        return self.started + self.latency_s


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    inject: Callable[[LocalMesh], Awaitable[None]]
    recover: Callable[[LocalMesh], Awaitable[None]]
    # The breaker this fault should open, and the tier whose service marks recovery.
    breaker: str
    resumes: tuple[int, ...]


def _wan(delay_ms: int) -> Callable[[LocalMesh], Awaitable[None]]:
    async def change(mesh: LocalMesh) -> None:
        await asyncio.to_thread(mesh.wan.set_delay, delay_ms)

    return change


def _failures(percent: int) -> Callable[[LocalMesh], Awaitable[None]]:
    async def change(mesh: LocalMesh) -> None:
        await asyncio.to_thread(mesh.wan.set_failure_percent, percent)

    return change


def _kill(part: str) -> Callable[[LocalMesh], Awaitable[None]]:
    async def kill(mesh: LocalMesh) -> None:
        await mesh.kill(part)

    return kill


def _restart(part: str) -> Callable[[LocalMesh], Awaitable[None]]:
    async def restart(mesh: LocalMesh) -> None:
        await mesh.restart(part)

    return restart


FAULTS = {
    fault.name: fault
    for fault in (
        Fault(
            "cloud_killed",
            "cloud service SIGKILLed, restarted later",
            _kill("cloud"),
            _restart("cloud"),
            "cloud",
            CLOUD_TIERS,
        ),
        Fault(
            "wan_spike",
            "emulated WAN delay 2,000 ms (beyond the 1 s deadline), back to 40 ms later",
            _wan(2000),
            _wan(WAN_MS),
            "cloud",
            CLOUD_TIERS,
        ),
        Fault(
            "cloud_failing_20pct",
            "Envoy fails 20 % of cloud calls with UNAVAILABLE, then 0 %",
            _failures(20),
            _failures(0),
            "cloud",
            CLOUD_TIERS,
        ),
        Fault(
            "edge_killed",
            "edge node SIGKILLed, restarted later",
            _kill("edge"),
            _restart("edge"),
            "edge",
            (routing_pb2.TIER_EDGE,),
        ),
    )
}


async def drive(
    stub: router_service_pb2_grpc.RouterServiceAsyncStub,
    images: npt.NDArray[np.uint8],
    concurrency: int,
    origin: float,
    stop: asyncio.Event,
) -> list[Sample]:
    """Closed-loop callers until ``stop``; every call is recorded, failed or not."""
    samples: list[Sample] = []
    requests = [
        router_request(images[i : i + 1], routing_pb2.ROUTE_PREFERENCE_AUTO)
        for i in range(len(images))
    ]

    async def caller(offset: int) -> None:
        index = offset
        while not stop.is_set():
            request = requests[index % len(requests)]
            index += concurrency
            started = time.time()
            try:
                reply = await stub.Infer(request, timeout=DEADLINE_S)
            except grpc.aio.AioRpcError as error:
                samples.append(Sample(started - origin, time.time() - started, error.code().name))
                continue
            decision = reply.decision
            samples.append(
                Sample(
                    started - origin,
                    time.time() - started,
                    "OK",
                    decision.served_by,
                    decision.reason,
                    decision.degraded,
                )
            )

    await asyncio.gather(*(caller(offset) for offset in range(concurrency)))
    return samples


def breaker_transitions(router_log: Path, origin: float) -> list[dict[str, Any]]:
    """The router's own breaker state changes, from its JSON log lines."""
    transitions = []
    for line in router_log.read_text().splitlines():
        if '"breaker state change"' not in line:
            continue
        entry = json.loads(line)
        at = datetime.fromisoformat(entry["timestamp"]).timestamp() - origin
        transitions.append(
            {
                "at_s": round(at, 3),
                "target": entry["target"],
                "old": entry["old"],
                "new": entry["new"],
            }
        )
    return transitions


def percentile_ms(samples: list[Sample], q: float) -> float | None:
    values = [s.latency_s * 1e3 for s in samples]
    return float(np.percentile(values, q)) if values else None


def summarise(
    fault: Fault,
    samples: list[Sample],
    transitions: list[dict[str, Any]],
    timeline: dict[str, float],
) -> dict[str, Any]:
    injected, recovered = timeline["injected_at_s"], timeline["recovered_at_s"]
    ok = [s for s in samples if s.code == "OK"]
    during = [s for s in samples if injected <= s.started < timeline["recover_started_at_s"]]
    failures: dict[str, int] = {}
    for sample in samples:
        if sample.code != "OK":
            failures[sample.code] = failures.get(sample.code, 0) + 1
    opened = next(
        (
            t["at_s"]
            for t in transitions
            if t["target"] == fault.breaker and t["new"] == "open" and t["at_s"] >= injected
        ),
        None,
    )
    resumed = min(
        (
            s.finished
            for s in ok
            if s.started >= recovered and s.served_by in fault.resumes and not s.degraded
        ),
        default=None,
    )
    reasons: dict[str, int] = {}
    for sample in during:
        if sample.code == "OK":
            name = decision_pb2.DecisionReason.Name(sample.reason)  # type: ignore[arg-type]
            reasons[name] = reasons.get(name, 0) + 1
    return {
        "fault": fault.description,
        "requests": len(samples),
        "failed": failures,
        "success_rate": len(ok) / len(samples),
        "degraded_share": sum(s.degraded for s in ok) / max(len(ok), 1),
        "p50_ms": percentile_ms(ok, 50),
        "p99_ms": percentile_ms(ok, 99),
        "during_fault": {
            "requests": len(during),
            "success_rate": sum(s.code == "OK" for s in during) / max(len(during), 1),
            "degraded_share": sum(s.degraded for s in during if s.code == "OK")
            / max(sum(s.code == "OK" for s in during), 1),
            "p99_ms": percentile_ms([s for s in during if s.code == "OK"], 99),
            "reasons": reasons,
        },
        "breaker": fault.breaker,
        "breaker_opened_after_s": None if opened is None else opened - injected,
        "resumed_after_recovery_s": None if resumed is None else resumed - recovered,
        "recovery_took_s": recovered - timeline["recover_started_at_s"],
        "timeline": timeline,
        "breaker_transitions": transitions,
    }


async def run_fault(fault: Fault, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    images = load_split("test").images[: args.images]
    mesh = LocalMesh(
        MeshOptions(
            state_dir=directory / fault.name,
            repository_root=REPO_ROOT,
            random_ports=True,
            wan_delay_ms=WAN_MS,
            log_level="warning",
        )
    )
    try:
        state = await mesh.up()
        async with grpc.aio.insecure_channel(state.endpoints["router"]) as channel:
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            stop = asyncio.Event()
            origin = time.time()
            load = asyncio.create_task(drive(stub, images, args.concurrency, origin, stop))
            await asyncio.sleep(args.before_s)
            injected = time.time() - origin
            await fault.inject(mesh)
            await asyncio.sleep(args.fault_s)
            recover_started = time.time() - origin
            await fault.recover(mesh)
            recovered = time.time() - origin
            await asyncio.sleep(args.after_s)
            stop.set()
            samples = await load
            ended = time.time() - origin
    finally:
        await mesh.down()
    timeline = {
        "injected_at_s": injected,
        "recover_started_at_s": recover_started,
        "recovered_at_s": recovered,
        "ended_at_s": ended,
    }
    transitions = breaker_transitions(Path(mesh.logs["router"]), origin)
    summary = summarise(fault, samples, transitions, timeline)
    summary["samples"] = [asdict(s) for s in samples]
    return summary


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"}
        | {"deadline_s": DEADLINE_S, "wan_delay_ms": WAN_MS},
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory() as temporary:
        for name in args.faults:
            sys.stderr.write(f"fault bench: {name}\n")
            report["scenarios"][name] = await run_fault(FAULTS[name], args, Path(temporary))
    return report


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        f"{settings['concurrency']} closed-loop callers, {settings['deadline_s']:.0f} s deadline "
        f"per call; fault at {settings['before_s']:.0f} s for {settings['fault_s']:.0f} s, then "
        f"{settings['after_s']:.0f} s of recovery. WAN emulated at {settings['wan_delay_ms']} ms.",
        "",
        "| scenario | requests | success | degraded | p99 ms | p99 ms in fault "
        "| breaker opened after | served again after recovery |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in report["scenarios"].items():
        during = row["during_fault"]
        p99_during = during["p99_ms"]
        lines.append(
            f"| {name} | {row['requests']} | {row['success_rate']:.2%} "
            f"| {row['degraded_share']:.1%} | {row['p99_ms']:.1f} "
            f"| {'-' if p99_during is None else f'{p99_during:.1f}'} "
            f"| {_seconds(row['breaker_opened_after_s'])} ({row['breaker']}) "
            f"| {_seconds(row['resumed_after_recovery_s'])} |"
        )
    lines.append("")
    for name, row in report["scenarios"].items():
        failed = ", ".join(f"{code} {count}" for code, count in row["failed"].items()) or "none"
        reasons = ", ".join(
            f"{reason.removeprefix('DECISION_REASON_').lower()} {count}"
            for reason, count in sorted(row["during_fault"]["reasons"].items())
        )
        lines.append(
            f"- **{name}** ({row['fault']}): failed calls: {failed}; during the fault: {reasons}."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--faults", nargs="+", choices=list(FAULTS), default=list(FAULTS))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--before-s", type=float, default=5.0)
    parser.add_argument("--fault-s", type=float, default=10.0)
    parser.add_argument("--after-s", type=float, default=15.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    publish_report(args.out, report, markdown(report), indent=None)


if __name__ == "__main__":
    main()
