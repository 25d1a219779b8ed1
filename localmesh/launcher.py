"""Start the whole mesh as real processes on loopback, wait until all are healthy, and
stop them all (no orphans). The state file lets scripts, tests and ``hybridmesh down``
find the endpoints and process ids.

Order: Triton -> cloud_inference -> Envoy (cloud ingress, mTLS, emulated WAN) ->
edge_node -> router. The router reaches the cloud only through Envoy.

While the mesh's process runs, a dead Triton is restarted (``localmesh.triton.supervise``:
bounded, logged with its exit code); the state file follows its new pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_inference.auth import token_sha256
from localmesh import ota
from localmesh.certs import ensure_certificates
from localmesh.envoy import EnvoyPorts, WanControl, envoy_command, envoy_config, write_config
from localmesh.triton import RestartBudget, RestartPolicy, TritonServer, supervise
from services.logging import get_logger
from workload.triton_repository import cloud_models, write_repository

STATE_FILE = "state.json"


class StateFileError(ValueError):
    """``<state_dir>/state.json`` exists but is not a mesh's state (truncated, edited, or
    from another program): the message names the file."""


EdgeMode = Literal["remote", "in-process"]
OTEL_SAMPLER_VARIABLES = ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG")
SITE_TOKEN = "local-site-token"  # the local mesh's one edge site
DEFAULT_PORTS = {
    "router": 50051,
    "edge": 50052,
    "cloud": 50053,
    "envoy": 50443,
    "envoy_admin": 59901,
    "triton": 58001,
    "registry": 50054,
    # Prometheus /metrics of each service (HYBRIDMESH_<SERVICE>_METRICS_PORT).
    "router_metrics": 59101,
    "edge_metrics": 59102,
    "cloud_metrics": 59103,
    "registry_metrics": 59104,
}
METRICS_PARTS = ("router", "edge", "cloud", "registry")
# With several workers (MeshOptions.workers), worker i of the router and of the cloud
# service serves /metrics on base + i: these bases leave room for up to 16 each.
WORKER_METRICS_BASES = {"router_metrics": 59110, "cloud_metrics": 59130}
MAX_WORKERS = 16
PARTS = ("triton", "cloud", "registry", "envoy", "edge", "router")
# How often the local site asks the registry for new versions.
UPDATE_INTERVAL_S = "10"

_log = get_logger("localmesh")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def free_port_range(count: int) -> int:
    """The first of ``count`` consecutive ports free now (the workers' /metrics ports)."""
    for _ in range(100):
        first = free_port()
        probes = [socket.socket() for _ in range(count - 1)]
        try:
            for offset, probe in enumerate(probes, start=1):
                probe.bind(("127.0.0.1", first + offset))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


@dataclass
class MeshState:
    """What ``up --detach`` writes to ``<state_dir>/state.json``."""

    state_dir: str
    endpoints: dict[str, str]
    pids: dict[str, int]
    logs: dict[str, str]
    wan_delay_ms: int
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    # The router's outbox (SQLite), read by `hybridmesh status`; audit and access logs.
    outbox: str = ""
    audit_logs: dict[str, str] = field(default_factory=dict)
    # The process that started the parts and supervises them (restarts a dead Triton);
    # `hybridmesh down` stops the mesh through it.
    supervisor_pid: int = 0
    # The control plane's credentials (localmesh.ota.Credentials): the operator's token
    # and signing keys (the CLI's), the site's token (the edge node's and router's).
    credentials: dict[str, str] = field(default_factory=dict)
    # The pair catalog and model store the mesh serves (`hybridmesh status` lists pairs).
    catalog: str = ""
    store: str = ""
    # Each service's Prometheus endpoint: name -> http://127.0.0.1:PORT/metrics.
    metrics: dict[str, str] = field(default_factory=dict)

    def write(self) -> Path:
        """Atomically: a reader (``up --detach``, ``status``) never sees half a file."""
        path = Path(self.state_dir) / STATE_FILE
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(asdict(self), indent=2) + "\n")
        partial.replace(path)
        return path

    @classmethod
    def read(cls, state_dir: Path) -> MeshState:
        """The state ``up`` wrote. Raises FileNotFoundError (no mesh is up) or
        StateFileError (the file is not a mesh's state, said in one line)."""
        path = state_dir / STATE_FILE
        try:
            fields = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StateFileError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(fields, dict):
            raise StateFileError(f"{path}: not a JSON object")
        try:
            return cls(**fields)
        except TypeError as error:  # a missing or unknown field
            raise StateFileError(f"{path}: not a mesh's state ({error})") from error


@dataclass(frozen=True)
class MeshOptions:
    state_dir: Path = Path("var/mesh")
    repository_root: Path = Path(".")
    random_ports: bool = False
    wan_delay_ms: int = 40
    # OTLP: services read OTEL_EXPORTER_OTLP_ENDPOINT themselves; Envoy gets the same
    # collector over gRPC and Triton an OTLP/HTTP URL (it speaks only HTTP).
    otlp_grpc_endpoint: str | None = None
    otlp_http_traces_url: str | None = None
    log_level: str = "info"
    # The cloud service logs every Infer call it receives (a JSON line each): what the
    # privacy tests assert on; a benchmark may turn it off.
    cloud_intake_log: bool = True
    # Worker processes of the router and of the cloud service, each on its one port
    # (services/workers.py; HYBRIDMESH_ROUTER_WORKERS, HYBRIDMESH_CLOUD_WORKERS).
    workers: int = 1
    # Extra HYBRIDMESH_ROUTER_* settings (e.g. a faster drain in tests).
    router_environment: dict[str, str] = field(default_factory=dict)
    # Restart a dead Triton within these bounds; None: leave it dead.
    triton_restarts: RestartPolicy | None = field(default_factory=RestartPolicy)
    # Start the parts in order up to this one only (e.g. "cloud": Triton and the cloud
    # service), for tests of one end of the mesh.
    last_part: str = "router"
    # "remote": the edge node is its own process; "in-process": the router runs the edge
    # model itself (router_service/colocated_edge.py), serving the edge's port too.
    edge_mode: EdgeMode = "remote"
    # The pairs to serve: catalog, model store, policy root; None: the repository's
    # models/ (catalog.toml, store, policies). Every catalog pair is served.
    models: ota.ModelSources | None = None


class LocalMesh:
    def __init__(self, options: MeshOptions) -> None:
        self.options = options
        self.state_dir = options.state_dir.resolve()
        self.ports = (
            {name: free_port() for name in DEFAULT_PORTS}
            if options.random_ports
            else dict(DEFAULT_PORTS)
        )
        if not 1 <= options.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be within 1..{MAX_WORKERS}, got {options.workers}")
        if options.workers > 1 and options.edge_mode == "in-process":
            # The router's own rule (RouterSettings), said before anything starts.
            raise ValueError("several router workers need edge_mode 'remote' (not 'in-process')")
        if options.workers > 1:
            for name, base in WORKER_METRICS_BASES.items():
                self.ports[name] = (
                    free_port_range(options.workers) if options.random_ports else base
                )
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        # How each spawned part was started, so a fault test can restart it the same way.
        self._spawned: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.triton: TritonServer | None = None
        self.logs = {name: str(self.state_dir / "logs" / f"{name}.log") for name in PARTS}
        # Off-site transfers as each side saw them: the router's audit trail, Envoy's
        # access log at the cloud ingress, and what the cloud service received.
        self.audit_logs = {
            name: str(self.state_dir / "logs" / f"{name}.jsonl")
            for name in ("router_audit", "envoy_access", "cloud_intake")
        }
        self.outbox_path = self.state_dir / "router" / "outbox.sqlite"
        self.state: MeshState | None = None
        self._triton_supervisor: asyncio.Task[None] | None = None
        self._site: ota.SiteArtifacts | None = None
        self._trusted = "[]"
        self.models = (
            options.models or ota.ModelSources.of_repository(options.repository_root)
        ).resolved()

    def endpoint(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    @property
    def wan(self) -> WanControl:
        return WanControl(self.ports["envoy_admin"])

    def _environment(self, extra: dict[str, str]) -> dict[str, str]:
        # The caller's OTLP settings stay out (the mesh sets its own below); the standard
        # sampler variables pass through, so tracing's cost can be set as anywhere else.
        environment = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("OTEL_") or k in OTEL_SAMPLER_VARIABLES
        }
        if self.options.otlp_grpc_endpoint:
            environment["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.options.otlp_grpc_endpoint
            environment["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
            # Export quickly: a demo or a test reads the trace seconds later.
            environment["OTEL_BSP_SCHEDULE_DELAY"] = "200"
        return {**environment, **extra}

    def _spawn(self, name: str, command: list[str], environment: dict[str, str]) -> None:
        self._spawned[name] = (command, environment)
        log = Path(self.logs[name])
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as stream:
            self.processes[name] = subprocess.Popen(
                command,
                cwd=self.options.repository_root,
                stdout=stream,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,  # own process group: stopped as a whole
            )

    async def up(self) -> MeshState:
        """Start every part and wait until each is healthy; on failure stop what started."""
        try:
            await self._start_all()
        except BaseException:
            await self.down()
            raise
        state = MeshState(
            state_dir=str(self.state_dir),
            endpoints={
                "router": self.endpoint("router"),
                "edge": self.endpoint("edge"),
                "cloud": self.endpoint("cloud"),
                "envoy": self.endpoint("envoy"),
                "envoy_admin": f"http://{self.endpoint('envoy_admin')}",
                "triton": self.endpoint("triton"),
                "registry": self.endpoint("registry"),
            },
            pids={name: process.pid for name, process in self.processes.items()},
            logs=self.logs,
            wan_delay_ms=self.options.wan_delay_ms,
            outbox=str(self.outbox_path),
            audit_logs=self.audit_logs,
            supervisor_pid=os.getpid(),
            credentials=operator_credentials(self.state_dir),
            catalog=str(self.models.catalog),
            store=str(self.models.store),
            metrics=self._metrics_urls(),
        )
        state.write()
        self.state = state
        if self.triton is not None and self.options.triton_restarts is not None:
            self._triton_supervisor = asyncio.create_task(
                supervise(
                    self.triton,
                    self._triton_restarted,
                    RestartBudget(self.options.triton_restarts),
                )
            )
        return state

    def _metrics_urls(self) -> dict[str, str]:
        """name -> /metrics URL; worker i > 0 of a service with several is "<name>.worker<i>"."""
        urls = {}
        for name in METRICS_PARTS:
            if name not in self.processes:
                continue
            port = self.ports[f"{name}_metrics"]
            urls[name] = f"http://127.0.0.1:{port}/metrics"
            if f"{name}_metrics" in WORKER_METRICS_BASES:
                for index in range(1, self.options.workers):
                    urls[f"{name}.worker{index}"] = f"http://127.0.0.1:{port + index}/metrics"
        return urls

    def _triton_restarted(self, pid: int) -> None:
        assert self.triton is not None and self.triton.process is not None
        self.processes["triton"] = self.triton.process
        if self.state is not None:
            self.state.pids["triton"] = pid
            self.state.write()

    async def _start_all(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        certificates = ensure_certificates(self.state_dir / "certs")
        router_tls = self.state_dir / "router-tls"
        router_tls.mkdir(exist_ok=True)
        for source, target in (
            ("ca.crt", "ca.crt"),
            ("client.crt", "tls.crt"),
            ("client.key", "tls.key"),
        ):
            shutil.copyfile(certificates.directory / source, router_tls / target)
        python = sys.executable
        level = self.options.log_level

        repository = self.state_dir / "triton-repository"
        shutil.rmtree(repository, ignore_errors=True)
        write_repository(self.models.store, repository, "local", cloud_models(self.models.catalog))
        self.triton = TritonServer(
            repository,
            self.state_dir / "triton-run",
            grpc_port=self.ports["triton"],
            otlp_http_endpoint=self._triton_otlp(),
        )
        self.triton.start_process()
        assert self.triton._process is not None
        self.processes["triton"] = self.triton._process
        await self.triton.wait_ready()
        if self.options.last_part == "triton":
            return

        self._spawn(
            "cloud",
            [python, "-m", "cloud_inference"],
            self._environment(
                {
                    "HYBRIDMESH_CLOUD_PORT": str(self.ports["cloud"]),
                    "HYBRIDMESH_CLOUD_METRICS_PORT": str(self.ports["cloud_metrics"]),
                    "HYBRIDMESH_CLOUD_WORKERS": str(self.options.workers),
                    "HYBRIDMESH_CLOUD_TRITON_URL": self.endpoint("triton"),
                    "HYBRIDMESH_CLOUD_CATALOG": str(self.models.catalog),
                    "HYBRIDMESH_CLOUD_MODEL_STORE": str(self.models.store),
                    "HYBRIDMESH_CLOUD_SITE_TOKEN_SHA256": json.dumps(
                        {"site-local": token_sha256(SITE_TOKEN)}
                    ),
                    "HYBRIDMESH_CLOUD_LOG_LEVEL": level,
                    "OTEL_SERVICE_NAME": "cloud-inference",
                    **self._intake_environment(),
                }
            ),
        )
        await self._wait_ready("cloud")
        if self.options.last_part == "cloud":
            return

        config = envoy_config(
            EnvoyPorts(self.ports["envoy"], self.ports["envoy_admin"]),
            self.ports["cloud"],
            certificates.directory,
            wan_delay_ms=self.options.wan_delay_ms,
            otlp_grpc=self._envoy_otlp(),
            access_log=Path(self.audit_logs["envoy_access"]),
        )
        config_path = write_config(self.state_dir / "envoy.json", config)
        self._spawn(
            "envoy", envoy_command(config_path, Path(self.logs["envoy"])), self._environment({})
        )

        await self._wait_ready("envoy")

        # Over-the-air updates: a registry (in the real deployment behind the cloud
        # ingress; here on loopback) and the site's own copies of model and policy.
        site = await asyncio.to_thread(ota.prepare, self.state_dir, self.models)
        trusted = json.dumps([str(site.trusted_key)])
        self._spawn(
            "registry",
            [python, "-m", "registry"],
            self._environment(
                {
                    "HYBRIDMESH_REGISTRY_PORT": str(self.ports["registry"]),
                    "HYBRIDMESH_REGISTRY_METRICS_PORT": str(self.ports["registry_metrics"]),
                    "HYBRIDMESH_REGISTRY_ROOT": str(site.registry_root),
                    "HYBRIDMESH_REGISTRY_LOG_LEVEL": level,
                    "HYBRIDMESH_REGISTRY_TOKENS_FILE": str(site.credentials.registry_tokens),
                    "HYBRIDMESH_REGISTRY_TRUSTED_KEYS": trusted,
                }
            ),
        )
        await self._wait_ready("registry")

        self._site = site
        self._trusted = trusted
        if self.options.edge_mode == "remote":
            self._spawn(
                "edge",
                [python, "-m", "edge_node"],
                self._environment(
                    self._edge_environment(self.ports["edge"], self.ports["edge_metrics"])
                ),
            )
            await self._wait_ready("edge")

        self._spawn(
            "router",
            [python, "-m", "router_service"],
            self._environment(
                self._router_environment(
                    self.options.edge_mode,
                    port=self.ports["router"],
                    metrics_port=self.ports["router_metrics"],
                    edge_port=self.ports["edge"],
                    outbox=self.outbox_path,
                    audit_log=Path(self.audit_logs["router_audit"]),
                )
            ),
        )
        await self._wait_ready("router")
        if self.options.edge_mode == "in-process":
            # The co-located edge serves its own port (health, admin, EdgeService) from
            # the router's process; it loaded its models before the router served.
            await self._wait_ready("edge")

    def _edge_environment(self, port: int, metrics_port: int) -> dict[str, str]:
        """The edge node's settings, whether it runs alone or inside a router."""
        site = self._site
        assert site is not None, "the site is prepared before any edge starts"
        return {
            "HYBRIDMESH_EDGE_PORT": str(port),
            "HYBRIDMESH_EDGE_METRICS_PORT": str(metrics_port),
            # Every catalog pair's edge model.
            "HYBRIDMESH_EDGE_SERVED_MODELS": json.dumps(self.models.edge_models()),
            "HYBRIDMESH_EDGE_LOG_LEVEL": self.options.log_level,
            "HYBRIDMESH_EDGE_MODEL_STORE": str(site.edge_store),
            "HYBRIDMESH_EDGE_REGISTRY_TARGET": self.endpoint("registry"),
            "HYBRIDMESH_EDGE_SITE_ID": ota.SITE,
            "HYBRIDMESH_EDGE_REGISTRY_TOKEN_FILE": str(site.credentials.site_token),
            "HYBRIDMESH_EDGE_ADMIN_TOKENS_FILE": str(site.credentials.edge_admin_tokens),
            "HYBRIDMESH_EDGE_TRUSTED_KEYS": self._trusted,
            "HYBRIDMESH_EDGE_GOLDEN_SET": str(site.golden_set),
            "HYBRIDMESH_EDGE_UPDATE_STAGING": str(site.staging / "edge"),
            "HYBRIDMESH_EDGE_UPDATE_INTERVAL_S": UPDATE_INTERVAL_S,
        }

    def _router_environment(
        self,
        edge_mode: EdgeMode,
        *,
        port: int,
        metrics_port: int,
        edge_port: int,
        outbox: Path,
        audit_log: Path,
    ) -> dict[str, str]:
        site = self._site
        assert site is not None, "the site is prepared before any router starts"
        environment = {
            "HYBRIDMESH_ROUTER_PORT": str(port),
            "HYBRIDMESH_ROUTER_METRICS_PORT": str(metrics_port),
            "HYBRIDMESH_ROUTER_EDGE_MODE": edge_mode,
            # A co-located edge runs in one router process (RouterSettings refuses more).
            "HYBRIDMESH_ROUTER_WORKERS": str(self.options.workers if edge_mode == "remote" else 1),
            "HYBRIDMESH_ROUTER_EDGE_TARGET": f"127.0.0.1:{edge_port}",
            "HYBRIDMESH_ROUTER_CLOUD_TARGET": self.endpoint("envoy"),
            "HYBRIDMESH_ROUTER_CLOUD_TLS_DIR": str(self.state_dir / "router-tls"),
            "HYBRIDMESH_ROUTER_CLOUD_SITE_TOKEN": SITE_TOKEN,
            "HYBRIDMESH_ROUTER_LOG_LEVEL": self.options.log_level,
            "HYBRIDMESH_ROUTER_CATALOG": str(self.models.catalog),
            "HYBRIDMESH_ROUTER_OUTBOX_PATH": str(outbox),
            "HYBRIDMESH_ROUTER_AUDIT_LOG_PATH": str(audit_log),
            # One policy root per pair under it (the site's copies).
            "HYBRIDMESH_ROUTER_POLICIES_DIR": str(site.policies_dir),
            "HYBRIDMESH_ROUTER_REGISTRY_TARGET": self.endpoint("registry"),
            "HYBRIDMESH_ROUTER_REGISTRY_TOKEN_FILE": str(site.credentials.site_token),
            "HYBRIDMESH_ROUTER_TRUSTED_KEYS": self._trusted,
            "HYBRIDMESH_ROUTER_POLICY_UPDATE_STAGING": str(site.staging / "router"),
            "HYBRIDMESH_ROUTER_POLICY_UPDATE_INTERVAL_S": UPDATE_INTERVAL_S,
            **self.options.router_environment,
        }
        if edge_mode == "in-process":
            # The co-located edge node reads its own settings in the router's process.
            environment |= self._edge_environment(edge_port, metrics_port)
        return environment

    async def add_router(self, name: str, edge_mode: EdgeMode) -> str:
        """Start one more router beside the mesh's (its own ports, outbox and audit log;
        the same cloud ingress, registry and policies), e.g. to compare edge modes in
        one run; ``down`` stops it first. Returns its address."""
        if self.state is None:
            raise RuntimeError("the mesh is not up")
        port, metrics_port, edge_port = free_port(), free_port(), free_port()
        self.logs[name] = str(self.state_dir / "logs" / f"{name}.log")
        self._spawn(
            name,
            [sys.executable, "-m", "router_service"],
            self._environment(
                self._router_environment(
                    edge_mode,
                    port=port,
                    metrics_port=metrics_port,
                    edge_port=edge_port if edge_mode == "in-process" else self.ports["edge"],
                    outbox=self.state_dir / name / "outbox.sqlite",
                    audit_log=self.state_dir / "logs" / f"{name}_audit.jsonl",
                )
            ),
        )
        address = f"127.0.0.1:{port}"
        await self._wait(lambda: grpc_serving(address), name)
        self.state.endpoints[name] = address
        self.state.pids[name] = self.processes[name].pid
        self.state.write()
        return address

    def _intake_environment(self) -> dict[str, str]:
        if not self.options.cloud_intake_log:
            return {}
        return {"HYBRIDMESH_CLOUD_INTAKE_LOG_PATH": self.audit_logs["cloud_intake"]}

    def _triton_otlp(self) -> str | None:
        if self.options.otlp_http_traces_url:
            parsed = urlparse(self.options.otlp_http_traces_url)
            return f"{parsed.netloc}{parsed.path}"
        return None

    def _envoy_otlp(self) -> tuple[str, int] | None:
        if not self.options.otlp_grpc_endpoint:
            return None
        parsed = urlparse(self.options.otlp_grpc_endpoint)
        return parsed.hostname or "127.0.0.1", parsed.port or 4317

    async def _wait(
        self, ready: Callable[[], Awaitable[bool]], name: str, timeout_s: float = 60.0
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode}); see {self.logs[name]}")
            if await ready():
                _log.info("part healthy", part=name)
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{name} not healthy after {timeout_s} s; see {self.logs[name]}")

    async def _wait_ready(self, name: str) -> None:
        async def ready() -> bool:
            if name == "envoy":
                return await asyncio.to_thread(self.wan.ready)
            return await grpc_serving(self.endpoint(name))

        await self._wait(ready, name)

    async def kill(self, name: str) -> None:
        """SIGKILL one part's process group, as a crash would (fault injection)."""
        process = self.processes.pop(name)
        await stop_process_group(process.pid, 0.0, process, signal.SIGKILL)

    async def restart(self, name: str) -> None:
        """Start a killed part again, as it was started (same port, settings, log), and
        wait until it is healthy. Triton is not restartable here (it is not spawned)."""
        if name in self.processes:
            raise RuntimeError(f"{name} is still running")
        command, environment = self._spawned[name]
        self._spawn(name, command, environment)
        if self.state is not None:
            self.state.pids[name] = self.processes[name].pid
            self.state.write()
        await self._wait_ready(name)

    async def down(self, grace_s: float = 10.0) -> None:
        """Stop every part, router first, Triton last; SIGKILL what outlives ``grace_s``."""
        if self._triton_supervisor is not None:
            self._triton_supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._triton_supervisor
        added = [name for name in self.processes if name not in PARTS]  # add_router's
        for name in [*added, *reversed(PARTS)]:
            process = self.processes.pop(name, None)
            if process is not None:
                await stop_process_group(process.pid, grace_s, process)
        _log.info("mesh stopped")


def operator_credentials(state_dir: Path) -> dict[str, str]:
    credentials = ota.Credentials(state_dir / "credentials")
    return {
        "operator_token": str(credentials.operator_token),
        "operator_keys": str(state_dir / "operator"),
        "site_token": str(credentials.site_token),
    }


async def grpc_serving(address: str) -> bool:
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def stop_process_group(
    pid: int,
    grace_s: float,
    process: subprocess.Popen[bytes] | None = None,
    first_signal: signal.Signals = signal.SIGTERM,
) -> None:
    """Send ``first_signal`` to the process group led by ``pid``, SIGKILL it after
    ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, first_signal)
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(process.wait, grace_s)
    else:
        # Not our child (a detached mesh): nothing to wait on but polling.
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _alive(pid, None):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if process is not None:
        process.wait()


def _alive(pid: int, process: subprocess.Popen[bytes] | None) -> bool:
    if process is not None:
        return process.poll() is None
    # A zombie counts here: its process group may still hold live children to stop.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited. A part that died stays a zombie
    until the supervisor that started it reaps it, and ``kill(pid, 0)`` still succeeds
    for a zombie, so its state in ``/proc/<pid>/stat`` (Linux) is read too."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (or gone this instant): kill() said it exists
        return True
    # "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the last ")".
    return stat.rpartition(")")[2].split()[0] != "Z"


async def down_from_state(state_dir: Path, grace_s: float = 10.0) -> list[str]:
    """Stop a detached mesh: through its supervising process (which stops every part in
    order, and must not restart Triton meanwhile), then by the process ids left."""
    state = MeshState.read(state_dir)
    stopped = []
    supervisor = state.supervisor_pid
    if supervisor and supervisor != os.getpid() and _alive(supervisor, None):
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + grace_s * len(PARTS)
        while time.monotonic() < deadline and _alive(supervisor, None):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if _alive(supervisor, None):
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGKILL)
        stopped.append("supervisor")
    for name in reversed(PARTS):
        pid = state.pids.get(name)
        if pid is not None and _alive(pid, None):
            await stop_process_group(pid, grace_s)
            stopped.append(name)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped
