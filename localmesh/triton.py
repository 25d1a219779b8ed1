"""Start and stop the tritonserver bundled in the nvidia-pytriton wheel (CPU, local mesh).

Facts this encodes (seen on this machine): the bundled build has only the python
backend; its stub for this Python must sit in ``backends/python/`` (done in a private
copy of the backends directory, never in site-packages); ``LD_LIBRARY_PATH`` must start
with this Python's LIBDIR or the stub loads the system's older libpython and crashes;
the copied stub finds the wheel's bundled libraries (``nvidia_pytriton.libs``) only
through ``LD_LIBRARY_PATH``. The stub ignores PYTHONPATH: the local repository's
models add this venv's site-packages themselves (workload/triton_python/model.py).

Triton and its python-backend stub processes run in their own process group, so a stop
(or a kill in a fault test) leaves no orphan. ``supervise`` restarts a Triton that died, as
a k8s pod's restart policy would: bounded (``RestartPolicy``: at most 5 restarts in 10
minutes, backoff doubling from 0.5 s), each restart logged with the exit code.
Usage: ``python -m localmesh.triton --model-repository DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytriton
import tritonclient.grpc.aio as triton_grpc

from services.logging import configure_logging, get_logger

_log = get_logger("localmesh.triton")
TRITON_HOME = Path(pytriton.__file__).parent / "tritonserver"
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


# Starts tried when the picked gRPC port was taken before Triton bound it.
PORT_ATTEMPTS = 3


class TritonStartError(RuntimeError):
    """Triton exited or did not become ready; the message carries the log tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def prepare_backends(run_dir: Path) -> Path:
    """A private backends directory with the python backend stub for this Python."""
    backends = run_dir / "backends"
    python_backend = backends / "python"
    if not (python_backend / "triton_python_backend_stub").exists():
        shutil.copytree(TRITON_HOME / "backends" / "python", python_backend, dirs_exist_ok=True)
        stub = TRITON_HOME / "python_backend_stubs" / PYTHON_VERSION / "triton_python_backend_stub"
        shutil.copy2(stub, python_backend / "triton_python_backend_stub")
        # The stub's embedded interpreter ignores PYTHONPATH and would import the base
        # interpreter's numpy (2.x here), whose arrays the stub (built for numpy 1.x)
        # returns as empty tensors. Its first import is this module, so put this venv's
        # site-packages first there, before it imports numpy.
        utils = python_backend / "triton_python_backend_utils.py"
        site_packages = sysconfig.get_paths()["purelib"]
        utils.write_text(
            f"import sys\nsys.path.insert(0, {site_packages!r})  # hybridmesh launcher\n"
            + utils.read_text()
        )
    return backends


def triton_environment() -> dict[str, str]:
    environment = dict(os.environ)
    libdir = str(sysconfig.get_config_var("LIBDIR"))
    # The wheel's own CUDA runtime etc.: the stub's RPATH does not survive being copied.
    wheel_libs = str(TRITON_HOME.parent.parent / "nvidia_pytriton.libs")
    environment["LD_LIBRARY_PATH"] = os.pathsep.join(
        part for part in (libdir, wheel_libs, environment.get("LD_LIBRARY_PATH", "")) if part
    )
    site_packages = sysconfig.get_paths()["purelib"]
    environment["PYTHONPATH"] = os.pathsep.join(
        part for part in (site_packages, environment.get("PYTHONPATH", "")) if part
    )
    return environment


class TritonServer:
    """One tritonserver process; an async context manager that waits for readiness."""

    def __init__(
        self,
        model_repository: Path,
        run_dir: Path,
        *,
        grpc_port: int | None = None,
        otlp_http_endpoint: str | None = None,
        ready_timeout_s: float = 60.0,
    ) -> None:
        self.model_repository = model_repository
        self.run_dir = run_dir
        self.grpc_port = grpc_port or free_port()
        # A port we picked may be taken by another process between picking and binding.
        self._port_picked = grpc_port is None
        self.otlp_http_endpoint = otlp_http_endpoint
        self.ready_timeout_s = ready_timeout_s
        self.log_path = run_dir / "triton.log"
        self._log_offset = 0  # where this run's part of the (appended) log starts
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        """Of tritonserver, which is also its process group's id."""
        return self._process.pid if self._process else None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._process

    def command(self) -> list[str]:
        command = [
            str(TRITON_HOME / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={prepare_backends(self.run_dir)}",
            f"--grpc-port={self.grpc_port}",
            "--grpc-address=127.0.0.1",
            "--allow-http=false",
            "--allow-metrics=false",
            "--strict-readiness=true",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
        ]
        if self.otlp_http_endpoint:
            command += [
                "--trace-config=mode=opentelemetry",
                f"--trace-config=opentelemetry,url={self.otlp_http_endpoint}",
                "--trace-config=rate=1",
                "--trace-config=level=TIMESTAMPS",
                "--trace-config=opentelemetry,resource=service.name=triton",
            ]
        return command

    def start_process(self) -> None:
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError(f"tritonserver already runs as pid {self._process.pid}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        # Own session = own process group: stop/kill reaches the backend stubs too.
        self._process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=triton_environment(),
            start_new_session=True,
        )
        log.close()
        _log.info("triton starting", pid=self._process.pid, grpc=self.grpc_url)

    async def wait_ready(self, models: list[str] | None = None) -> float:
        """Wait until the server and ``models`` (default: all in the repository) are ready."""
        models = models if models is not None else self.repository_models()
        started = time.monotonic()
        client = triton_grpc.InferenceServerClient(self.grpc_url)
        try:
            while time.monotonic() - started < self.ready_timeout_s:
                if self._process is None or self._process.poll() is not None:
                    raise TritonStartError(f"tritonserver exited early{self.diagnosis()}")
                with contextlib.suppress(Exception):
                    if await client.is_server_ready(client_timeout=1.0) and all(
                        [await client.is_model_ready(m, client_timeout=1.0) for m in models]
                    ):
                        elapsed = time.monotonic() - started
                        _log.info("triton ready", seconds=round(elapsed, 2), models=models)
                        return elapsed
                await asyncio.sleep(0.1)
        finally:
            await client.close()
        raise TritonStartError(
            f"tritonserver not ready after {self.ready_timeout_s} s{self.diagnosis()}"
        )

    def repository_models(self) -> list[str]:
        return sorted(
            p.name for p in self.model_repository.iterdir() if (p / "config.pbtxt").exists()
        )

    def diagnosis(self) -> str:
        """Triton's error lines (a failed model says why there) and the log's tail."""
        errors = "\n".join(self.error_lines()) or "(none)"
        return f"; errors logged:\n{errors}\nlog tail ({self.log_path}):\n{self.log_tail()}"

    def error_lines(self, limit: int = 10) -> list[str]:
        errors = [
            line[:400]
            for line in self._log_lines()
            # E-level lines, without the CPU-only machine's harmless CUDA complaint.
            if line.startswith("E") and "CudaDriverHelper" not in line
        ]
        return errors[-limit:]

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self._log_lines()[-lines:]) or "(empty log)"

    def _log_lines(self) -> list[str]:
        """This run's lines of the log."""
        if not self.log_path.exists():
            return []
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace").splitlines()

    def kill(self) -> None:
        """SIGKILL the whole process group (fault injection)."""
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    async def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace_s``."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(process.wait, grace_s)
        # Stubs outlive a crashed server sometimes: clear the group either way.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        _log.info("triton stopped", pid=process.pid, returncode=process.returncode)

    async def __aenter__(self) -> TritonServer:
        for attempt in range(PORT_ATTEMPTS):
            self.start_process()
            try:
                await self.wait_ready()
            except TritonStartError as error:
                await self.stop(grace_s=2.0)
                lost_race = "already in use" in str(error) and self._port_picked
                if not lost_race or attempt == PORT_ATTEMPTS - 1:
                    raise
                self.grpc_port = free_port()  # another process took it first
                continue
            except BaseException:
                await self.stop(grace_s=2.0)
                raise
            return self
        raise AssertionError("unreachable")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


@dataclass(frozen=True)
class RestartPolicy:
    """At most ``max_restarts`` in any ``window_s``; the n-th restart in the window waits
    ``backoff_s * 2**(n-1)`` (capped at ``max_backoff_s``) after the exit."""

    max_restarts: int = 5
    window_s: float = 600.0
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0


class RestartBudget:
    """Pure: how long to wait before the next restart, or None when the budget is spent."""

    def __init__(
        self, policy: RestartPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or RestartPolicy()
        self._clock = clock
        self._restarts: list[float] = []

    def next_delay(self) -> float | None:
        now = self._clock()
        self._restarts = [t for t in self._restarts if now - t < self.policy.window_s]
        if len(self._restarts) >= self.policy.max_restarts:
            return None
        delay = min(self.policy.max_backoff_s, self.policy.backoff_s * 2.0 ** len(self._restarts))
        self._restarts.append(now)
        return delay


# How often the supervisor looks at the process (it is a child: poll() is a waitpid).
SUPERVISE_POLL_S = 0.1


async def supervise(
    server: TritonServer,
    on_restart: Callable[[int], None] = lambda pid: None,
    budget: RestartBudget | None = None,
) -> None:
    """Restart ``server`` whenever its process exits, within ``budget``; returns when the
    budget is spent. Cancel it before stopping the server on purpose."""
    budget = budget or RestartBudget()
    while True:
        process = server.process
        if process is None or process.poll() is None:
            await asyncio.sleep(SUPERVISE_POLL_S)
            continue
        delay = budget.next_delay()
        if delay is None:
            _log.error(
                "triton exited; restart budget spent, not restarting",
                pid=process.pid,
                exit_code=process.returncode,
                max_restarts=budget.policy.max_restarts,
                window_s=budget.policy.window_s,
            )
            return
        _log.warning(
            "triton exited; restarting",
            pid=process.pid,
            exit_code=process.returncode,
            delay_s=delay,
            errors=server.error_lines(3),
        )
        await server.stop(grace_s=0.0)  # clears what is left of its group (python stubs)
        await asyncio.sleep(delay)
        server.start_process()
        assert server.pid is not None
        on_restart(server.pid)
        try:
            await server.wait_ready()
        except TritonStartError as error:
            # Exited again (the next turn restarts it) or never ready: kill it, so the
            # next turn counts it against the budget instead of waiting forever.
            _log.error("restarted triton not ready", error=str(error)[:2000])
            server.kill()


async def _run(arguments: argparse.Namespace) -> None:
    async with TritonServer(
        arguments.model_repository.resolve(),
        arguments.run_dir.resolve(),
        grpc_port=arguments.grpc_port,
        otlp_http_endpoint=arguments.otlp_http_endpoint,
        ready_timeout_s=arguments.ready_timeout_s,
    ) as server:
        _log.info(
            "triton serving; SIGINT/SIGTERM to stop",
            grpc=server.grpc_url,
            pid=server.pid,
            log=str(server.log_path),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--run-dir", type=Path, default=Path("var/triton"))
    parser.add_argument("--grpc-port", type=int, help="default: a free port")
    parser.add_argument(
        "--otlp-http-endpoint",
        help="HOST:PORT/v1/traces: export Triton's own spans there (OTLP/HTTP, JSON)",
    )
    parser.add_argument("--ready-timeout-s", type=float, default=60.0)
    arguments = parser.parse_args()
    configure_logging()
    try:
        asyncio.run(_run(arguments))
    except TritonStartError as error:
        _log.error("triton did not start", error=str(error))
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
