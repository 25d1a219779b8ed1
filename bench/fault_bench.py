"""Faults under load on the local mesh: what callers see while parts fail and recover.

Each scenario starts a fresh local mesh, drives the router with a closed loop of
``--concurrency`` callers cycling through the Fashion-MNIST test split (so about one in
five requests is escalated), each call with a 1 s deadline, and on a fixed timeline
injects one fault and later removes it:

- ``cloud_killed``: the cloud service process is SIGKILLed, later restarted;
- ``wan_spike``: the emulated WAN delay jumps to 2 s, beyond every deadline;
- ``cloud_failing_20pct``: Envoy's fault filter fails 20 % of cloud calls (UNAVAILABLE);
- ``edge_killed``: the edge node process is SIGKILLed, later restarted;
- ``edge_hung`` / ``cloud_hung``: the edge node / cloud service is SIGSTOPped (its port
  still accepts connections, nothing answers), later SIGCONTed;
- ``cancel_mid_escalation``: the WAN slows to 300 ms and callers cancel 10 % of their
  calls 50-250 ms in, so a cancel lands while the escalation is in flight; Envoy's access
  log says how long each cancelled call's cloud call ran on after the cancel.

Reported per scenario: success rate, degraded share, p50/p99 (all and during the fault),
calls that hit their deadline during the fault, time until the router's breaker opened
(from the router's own "breaker state change" log lines), time until escalation (or the
edge) served again after recovery, and for cancellations the run-on after the cancel.
``python -m bench.fault_bench --out results/fault_bench.json [--faults edge_hung ...]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from bench.load import publish_report
from bench.mesh_bench import router_request
from hybridmesh.common.v1 import decision_pb2, routing_pb2
from hybridmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
from localmesh.launcher import LocalMesh, MeshOptions
from workload.fashion_mnist import load_split

DEADLINE_S = 1.0
WAN_MS = 40
# The cancellation scenario: escalations slow enough that a cancel lands mid-flight (and
# below the cloud breaker's 0.5 s slow-call threshold, so escalation goes on).
CANCEL_WAN_MS = 300
CANCEL_SHARE = 0.1
CANCEL_AFTER_S = (0.05, 0.25)
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
    # Set for calls the caller cancelled: its request id and when (s since the start).
    request_id: str = ""
    cancelled_at: float | None = None

    @property
    def finished(self) -> float:
        return self.started + self.latency_s


@dataclass
class LoadControl:
    """What the callers do, changed by a scenario while the load runs."""

    cancel_share: float = 0.0
    # Process groups stopped by the scenario (continued whatever happens).
    stopped: list[int] = field(default_factory=list)


Change = Callable[[LocalMesh, LoadControl], Awaitable[None]]


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    inject: Change
    recover: Change
    # The breaker this fault should open, and the tier whose service marks recovery.
    breaker: str
    resumes: tuple[int, ...]


def set_wan(delay_ms: int) -> Change:
    async def change(mesh: LocalMesh, load: LoadControl) -> None:
        await asyncio.to_thread(mesh.wan.set_delay, delay_ms)

    return change


def fail_percent(percent: int) -> Change:
    async def change(mesh: LocalMesh, load: LoadControl) -> None:
        await asyncio.to_thread(mesh.wan.set_failure_percent, percent)

    return change


def kill_part(part: str) -> Change:
    async def kill(mesh: LocalMesh, load: LoadControl) -> None:
        await mesh.kill(part)

    return kill


def restart_part(part: str) -> Change:
    async def restart(mesh: LocalMesh, load: LoadControl) -> None:
        await mesh.restart(part)

    return restart


def signal_part(part: str, signum: signal.Signals) -> Change:
    """SIGSTOP (a hang: its socket still accepts, nothing answers) or SIGCONT the part's
    process group; the stopped ones are kept in ``load.stopped``."""

    async def send(mesh: LocalMesh, load: LoadControl) -> None:
        pid = mesh.processes[part].pid
        os.killpg(pid, signum)
        if signum == signal.SIGSTOP:
            load.stopped.append(pid)
        elif pid in load.stopped:
            load.stopped.remove(pid)

    return send


def continue_stopped(load: LoadControl) -> None:
    """SIGCONT whatever a scenario left stopped (on any way out)."""
    for pid in load.stopped:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGCONT)
    load.stopped.clear()


def _cancelling(share: float) -> Change:
    async def change(mesh: LocalMesh, load: LoadControl) -> None:
        await asyncio.to_thread(mesh.wan.set_delay, CANCEL_WAN_MS if share else WAN_MS)
        load.cancel_share = share

    return change


FAULTS = {
    fault.name: fault
    for fault in (
        Fault(
            "cloud_killed",
            "cloud service SIGKILLed, restarted later",
            kill_part("cloud"),
            restart_part("cloud"),
            "cloud",
            CLOUD_TIERS,
        ),
        Fault(
            "wan_spike",
            "emulated WAN delay 2,000 ms (beyond the 1 s deadline), back to 40 ms later",
            set_wan(2000),
            set_wan(WAN_MS),
            "cloud",
            CLOUD_TIERS,
        ),
        Fault(
            "cloud_failing_20pct",
            "Envoy fails 20 % of cloud calls with UNAVAILABLE, then 0 %",
            fail_percent(20),
            fail_percent(0),
            "cloud",
            CLOUD_TIERS,
        ),
        Fault(
            "edge_killed",
            "edge node SIGKILLed, restarted later",
            kill_part("edge"),
            restart_part("edge"),
            "edge",
            (routing_pb2.TIER_EDGE,),
        ),
        Fault(
            "edge_hung",
            "edge node SIGSTOPped (hung: connections accepted, nothing answered), SIGCONT later",
            signal_part("edge", signal.SIGSTOP),
            signal_part("edge", signal.SIGCONT),
            "edge",
            (routing_pb2.TIER_EDGE,),
        ),
        Fault(
            "cloud_hung",
            "cloud service SIGSTOPped (hung behind Envoy), SIGCONT later",
            signal_part("cloud", signal.SIGSTOP),
            signal_part("cloud", signal.SIGCONT),
            "cloud",
            CLOUD_TIERS,
        ),
        Fault(
            "cancel_mid_escalation",
            f"WAN {CANCEL_WAN_MS} ms; callers cancel {CANCEL_SHARE:.0%} of calls "
            f"{CANCEL_AFTER_S[0] * 1e3:.0f}-{CANCEL_AFTER_S[1] * 1e3:.0f} ms in "
            "(mid-escalation), then WAN 40 ms and no cancels",
            _cancelling(CANCEL_SHARE),
            _cancelling(0.0),
            "cloud",
            CLOUD_TIERS,
        ),
    )
}


async def call_once(
    stub: router_service_pb2_grpc.RouterServiceAsyncStub,
    request: router_service_pb2.InferRequest,
    origin: float,
    cancel_after_s: float | None = None,
) -> Sample:
    """One call as its caller saw it; with ``cancel_after_s``, cancelled that far in
    unless it ended by then."""
    started = time.time()
    call = stub.Infer(request, timeout=DEADLINE_S)
    waiter: asyncio.Future[router_service_pb2.InferResponse] = asyncio.ensure_future(call)
    if cancel_after_s is not None:
        done, _ = await asyncio.wait({waiter}, timeout=cancel_after_s)
        if not done:
            cancelled_at = time.time()
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await waiter
            return Sample(
                started - origin,
                cancelled_at - started,
                "CANCELLED",
                request_id=request.request_id,
                cancelled_at=cancelled_at - origin,
            )
    try:
        reply = await waiter
    except grpc.aio.AioRpcError as error:
        return Sample(started - origin, time.time() - started, error.code().name)
    decision = reply.decision
    return Sample(
        started - origin,
        time.time() - started,
        "OK",
        decision.served_by,
        decision.reason,
        decision.degraded,
    )


async def drive(
    stub: router_service_pb2_grpc.RouterServiceAsyncStub,
    images: npt.NDArray[np.uint8],
    concurrency: int,
    origin: float,
    stop: asyncio.Event,
    *,
    load: LoadControl | None = None,
) -> list[Sample]:
    """Closed-loop callers until ``stop``; every call is recorded, failed or not. While
    ``load.cancel_share`` is set, that share of calls is cancelled mid-flight."""
    samples: list[Sample] = []
    control = load or LoadControl()
    requests = [
        router_request(images[i : i + 1], routing_pb2.ROUTE_PREFERENCE_AUTO)
        for i in range(len(images))
    ]

    async def caller(offset: int) -> None:
        index = offset
        rng = random.Random(offset)
        while not stop.is_set():
            request = requests[index % len(requests)]
            index += concurrency
            if control.cancel_share and rng.random() < control.cancel_share:
                # Named, so its cloud call can be found in Envoy's access log.
                named = router_service_pb2.InferRequest()
                named.CopyFrom(request)
                named.request_id = f"bench-cancel-{offset}-{index}"
                cancel_after = rng.uniform(*CANCEL_AFTER_S)
                samples.append(await call_once(stub, named, origin, cancel_after))
            else:
                samples.append(await call_once(stub, request, origin))

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
    # A call its caller cancelled is neither an answer nor a failure.
    cancelled = [s for s in samples if s.cancelled_at is not None]
    samples = [s for s in samples if s.cancelled_at is None]
    ok = [s for s in samples if s.code == "OK"]
    during = [s for s in samples if injected <= s.started < timeline["recover_started_at_s"]]
    during_ok = [s for s in during if s.code == "OK"]
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
        "cancelled_by_callers": len(cancelled),
        "failed": failures,
        "success_rate": len(ok) / max(len(samples), 1),
        "degraded_share": sum(s.degraded for s in ok) / max(len(ok), 1),
        "p50_ms": percentile_ms(ok, 50),
        "p99_ms": percentile_ms(ok, 99),
        "during_fault": {
            "requests": len(during),
            "success_rate": len(during_ok) / max(len(during), 1),
            "degraded_share": sum(s.degraded for s in during_ok) / max(len(during_ok), 1),
            "p50_ms": percentile_ms(during_ok, 50),
            "p99_ms": percentile_ms(during_ok, 99),
            "deadline_exceeded": sum(s.code == "DEADLINE_EXCEEDED" for s in during),
            "reasons": reasons,
        },
        "breaker": fault.breaker,
        "breaker_opened_after_s": None if opened is None else opened - injected,
        "resumed_after_recovery_s": None if resumed is None else resumed - recovered,
        "recovery_took_s": recovered - timeline["recover_started_at_s"],
        "timeline": timeline,
        "breaker_transitions": transitions,
    }


def cancellations(
    samples: list[Sample], access_log: list[dict[str, Any]], origin: float
) -> dict[str, Any]:
    """For each call its caller cancelled: how long its cloud calls (Envoy's access log at
    the cloud ingress: start + duration) went on after the cancel."""
    upstream: dict[str, list[dict[str, Any]]] = {}
    for entry in access_log:
        upstream.setdefault(str(entry.get("request_id")), []).append(entry)
    cancelled = [s for s in samples if s.cancelled_at is not None]
    ran_on_ms: list[float] = []
    answered_after = 0
    for sample in cancelled:
        assert sample.cancelled_at is not None
        for entry in upstream.get(sample.request_id, []):
            start = datetime.fromisoformat(entry["start_time"].replace("Z", "+00:00"))
            ended = start.timestamp() + int(entry["duration_ms"]) / 1e3
            ran_on_ms.append((ended - origin - sample.cancelled_at) * 1e3)
            answered_after += str(entry.get("grpc_status")) == "0" and ran_on_ms[-1] > 0
    return {
        "cancelled": len(cancelled),
        "with_cloud_call": len(ran_on_ms),
        "ran_on_after_cancel_ms": {
            "median": float(np.median(ran_on_ms)) if ran_on_ms else None,
            "max": max(ran_on_ms) if ran_on_ms else None,
            "values": sorted(ran_on_ms),
        },
        # Cloud calls that ran to an answer after their caller had left.
        "answered_after_cancel": answered_after,
    }


def read_access_log(path: Path) -> list[dict[str, Any]]:
    entries = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


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
    control = LoadControl()
    try:
        state = await mesh.up()
        async with grpc.aio.insecure_channel(state.endpoints["router"]) as channel:
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            stop = asyncio.Event()
            origin = time.time()
            load = asyncio.create_task(
                drive(stub, images, args.concurrency, origin, stop, load=control)
            )
            await asyncio.sleep(args.before_s)
            injected = time.time() - origin
            await fault.inject(mesh, control)
            await asyncio.sleep(args.fault_s)
            recover_started = time.time() - origin
            await fault.recover(mesh, control)
            recovered = time.time() - origin
            await asyncio.sleep(args.after_s)
            stop.set()
            samples = await load
            ended = time.time() - origin
        # Envoy writes its access log every second; the after-phase is far longer.
        access_log = read_access_log(Path(mesh.audit_logs["envoy_access"]))
    finally:
        continue_stopped(control)
        await mesh.down()
    timeline = {
        "injected_at_s": injected,
        "recover_started_at_s": recover_started,
        "recovered_at_s": recovered,
        "ended_at_s": ended,
    }
    transitions = breaker_transitions(Path(mesh.logs["router"]), origin)
    summary = summarise(fault, samples, transitions, timeline)
    if any(s.cancelled_at is not None for s in samples):
        summary["cancellation"] = cancellations(samples, access_log, origin)
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


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


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
    lines += [
        "",
        "During the fault only (answers' latency; calls that ended DEADLINE_EXCEEDED at the "
        "caller):",
        "",
        "| scenario | requests | success | degraded | p50 ms | p99 ms | hit the deadline |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in report["scenarios"].items():
        during = row["during_fault"]
        lines.append(
            f"| {name} | {during['requests']} | {during['success_rate']:.2%} "
            f"| {during['degraded_share']:.1%} | {_ms(during.get('p50_ms'))} "
            f"| {_ms(during['p99_ms'])} | {during.get('deadline_exceeded', '-')} |"
        )
    lines.append("")
    for name, row in report["scenarios"].items():
        cancelled = row.get("cancellation")
        if cancelled is None:
            continue
        ran_on = cancelled["ran_on_after_cancel_ms"]
        lines += [
            f"**{name}**: {cancelled['cancelled']} calls cancelled by their callers while in "
            f"flight, {cancelled['with_cloud_call']} of them with a cloud call; that cloud call "
            f"ended (Envoy's access log: start + duration) {_ms(ran_on['median'])} ms after the "
            f"cancel at the median, {_ms(ran_on['max'])} ms at the most; "
            f"{cancelled['answered_after_cancel']} ran on to an answer nobody received.",
            "",
        ]
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
