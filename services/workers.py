"""Several worker processes serving one port (SO_REUSEPORT), supervised by their parent.

Python runs one core's worth of a grpc.aio server per process, so a service scales with
cores by running N processes that each bind the same port with ``grpc.so_reuseport`` and
let the kernel spread incoming connections over them. This is grpc's own Python
multiprocessing example (examples/python/multiprocessing/server.py): the parent forks the
workers *before* it creates any gRPC object (grpc's core does not survive a fork that
happens after it started), and keeps a socket bound to the port with SO_REUSEPORT so that
port 0 picks one free port that every worker then binds.

The parent only supervises:

- SIGTERM/SIGINT: it forwards SIGTERM to every worker (each drains gracefully, as a single
  process does) and waits ``stop_timeout_s``; what is still alive then gets SIGKILL. No
  worker outlives the parent: each asks the kernel for SIGTERM when its parent dies
  (``PR_SET_PDEATHSIG``), so a SIGKILLed parent leaves no orphans either.
- A worker that exits on its own is logged and restarted with the same index (so it takes
  up the same per-worker state, e.g. the router's outbox file), at most
  ``max_restarts`` times in ``restart_window_s``; past that the parent stops the others
  and exits non-zero, for the orchestrator to restart the whole service.

With one worker nothing is forked: the service runs in this process, as before.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TypeVar

from services.config import ServiceSettings
from services.logging import get_logger

_log = get_logger("services.workers")

# linux/prctl.h: deliver this signal to the process when its parent exits.
_PR_SET_PDEATHSIG = 1

SettingsT = TypeVar("SettingsT", bound=ServiceSettings)

# Runs one worker's service; gets (worker index, the port every worker binds).
WorkerMain = Callable[[int, int], None]


@dataclass(frozen=True)
class WorkerPolicy:
    """How the parent stops and restarts its workers."""

    # How long the workers may drain after SIGTERM before they are killed (their own
    # grace period plus a margin).
    stop_timeout_s: float = 15.0
    max_restarts: int = 5
    restart_window_s: float = 60.0


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT, not listening (so the kernel
    gives it no connections): port 0 becomes a concrete free port the workers can share,
    and no other process without SO_REUSEPORT can take it while the parent runs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind((host, port))
    return reserved


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _worker_entry(main: WorkerMain, index: int, port: int, parent: int) -> None:
    # The parent's handlers only forward signals; a worker stops itself gracefully.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before PDEATHSIG was set
        return
    main(index, port)


class WorkerGroup:
    """The parent's view of its workers: start, restart, stop."""

    def __init__(self, main: WorkerMain, workers: int, port: int, policy: WorkerPolicy) -> None:
        self._main = main
        self._port = port
        self._policy = policy
        self._context = multiprocessing.get_context("fork")
        self._processes: dict[int, BaseProcess] = {}
        self._restarts: deque[float] = deque()
        self._stopping = False
        self.count = workers

    @property
    def pids(self) -> dict[int, int]:
        """Worker index -> pid of the workers started so far."""
        return {index: p.pid for index, p in self._processes.items() if p.pid is not None}

    def start(self, index: int) -> None:
        process = self._context.Process(
            target=_worker_entry,
            args=(self._main, index, self._port, os.getpid()),
            name=f"worker-{index}",
        )
        process.start()
        self._processes[index] = process
        _log.info("worker started", worker=index, pid=process.pid, port=self._port)

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True

    def stopping(self) -> bool:
        return self._stopping

    def supervise(self) -> int:
        """Until a stop is requested: restart workers that exit. Returns the exit code."""
        while not self.stopping():
            sentinels = {p.sentinel: i for i, p in self._processes.items()}
            for ready in wait(list(sentinels), timeout=0.5):
                if self.stopping():  # e.g. Ctrl-C: the workers got SIGINT too
                    break
                index = sentinels[ready]  # type: ignore[index]
                # The sentinel closes as the worker exits, a moment before it can be reaped.
                self._processes[index].join(5)
                code = self._processes[index].exitcode
                _log.error("worker exited", worker=index, exit_code=code)
                if not self._may_restart():
                    _log.error(
                        "workers restart too often; stopping the service",
                        restarts=len(self._restarts),
                        window_s=self._policy.restart_window_s,
                    )
                    self.stop()
                    return 1
                self.start(index)
        self.stop()
        return 0

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > self._policy.restart_window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self._policy.max_restarts:
            return False
        self._restarts.append(now)
        return True

    def stop(self) -> None:
        """SIGTERM to every live worker, SIGKILL to those alive after the timeout."""
        alive = [p for p in self._processes.values() if p.is_alive()]
        for process in alive:
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._policy.stop_timeout_s
        for process in alive:
            process.join(max(deadline - time.monotonic(), 0.0))
        for process in alive:
            if process.is_alive():
                _log.warning("worker killed after the stop timeout", pid=process.pid)
                process.kill()
                process.join()
        _log.info("workers stopped", count=len(self._processes))


def run_workers(
    main: WorkerMain,
    *,
    workers: int,
    host: str,
    port: int,
    policy: WorkerPolicy | None = None,
) -> int:
    """Serve with ``workers`` processes on ``host:port`` (0: one free port for all);
    blocks until SIGTERM/SIGINT and returns the process's exit code. ``main(index,
    port)`` runs one worker's service to completion; no gRPC object may exist in this
    process before the call. ``workers == 1`` runs ``main(0, port)`` here, unforked."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        main(0, port)
        return 0
    with closing(reserve_port(host, port)) as reserved:
        bound = int(reserved.getsockname()[1])
        group = WorkerGroup(main, workers, bound, policy or WorkerPolicy())
        # Installed before forking; each worker resets them to the default first.
        signal.signal(signal.SIGTERM, group.request_stop)
        signal.signal(signal.SIGINT, group.request_stop)
        for index in range(workers):
            group.start(index)
        _log.info("serving with workers", workers=workers, port=bound, parent=os.getpid())
        code = group.supervise()
    sys.stdout.flush()
    return code


def worker_settings(settings: SettingsT, index: int, port: int) -> SettingsT:
    """``settings`` for worker ``index`` of ``settings.workers``: the shared port, and its
    own /metrics port (``metrics_port + index``; each process has its own counters)."""
    if settings.workers == 1:
        return settings.model_copy(update={"port": port})
    metrics_port = settings.metrics_port + index if settings.metrics_port else 0
    return settings.model_copy(update={"port": port, "metrics_port": metrics_port})
