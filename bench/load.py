"""Closed-loop load against one gRPC endpoint: latency at concurrency 1, throughput at N."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

Call = Callable[[], Awaitable[object]]


@dataclass(frozen=True)
class LatencyResult:
    p50_ms: float
    p99_ms: float
    count: int
    samples_ms: tuple[float, ...] = ()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def latency(call: Call, count: int, warmup: int = 100) -> LatencyResult:
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    values = np.array(samples) * 1e3
    return LatencyResult(
        float(np.percentile(values, 50)),
        float(np.percentile(values, 99)),
        count,
        tuple(float(v) for v in values),
    )


async def throughput(call: Call, concurrency: int, seconds: float) -> float:
    """Completed calls per second with ``concurrency`` callers for ``seconds``."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


class ServerProcess:
    """A service in its own process (so the load generator does not share its GIL)."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        full_env = {**os.environ, **(env or {})}
        self._process = subprocess.Popen(
            [sys.executable, *[a.replace("{port}", str(self.port)) for a in args]],
            env={k: v.replace("{port}", str(self.port)) for k, v in full_env.items()},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self._process.pid

    async def wait_serving(self, timeout_s: float = 60.0, health: bool = True) -> None:
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(self.address) as channel:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(f"server exited with {self._process.returncode}")
                try:
                    if not health:
                        await channel.channel_ready()
                        return
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.address} not serving after {timeout_s} s")

    def stop(self) -> None:
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()


def publish_report(
    out: Path | None, report: dict[str, Any], markdown: str, indent: int | None = 2
) -> None:
    """Print the Markdown; with ``out``, also write the JSON there and the Markdown beside."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=indent))
        out.with_suffix(".md").write_text(markdown + "\n")
    sys.stdout.write(markdown + "\n")
