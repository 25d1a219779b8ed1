"""Settings shared by every service; each service subclasses with its own env_prefix.

Settings are built once in ``main()`` and passed down; tests construct them directly.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's own default; raised per service.


class ServiceSettings(BaseSettings):
    """What the kernel needs to run any gRPC service."""

    model_config = SettingsConfigDict(env_prefix="HYBRIDMESH_", extra="ignore", frozen=True)

    service_name: str = "hybridmesh"
    host: str = "127.0.0.1"
    # 0 lets the OS choose a free port (tests); deployments set a fixed one.
    port: int = Field(default=0, ge=0, le=65535)
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    # How long in-flight RPCs may run after SIGTERM before they are cancelled.
    shutdown_grace_seconds: float = Field(default=5.0, ge=0)
    # After health flips to NOT_SERVING and before the listener closes, so that pollers
    # (k8s readiness probes, the router's health watch) stop sending new work first.
    shutdown_drain_delay_seconds: float = Field(default=0.0, ge=0)
    log_level: str = "info"
    # Tracing exports over OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT is set (standard
    # OTEL_* variables, read by the exporter itself); this switch only turns it off.
    tracing_enabled: bool = True
    # Prometheus /metrics over HTTP on this port (services/prometheus.py), on ``host``;
    # 0: off. The local mesh gives each service one and records them in state.json.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # RPCs in progress at once (any method, streams included) beyond which grpc itself
    # answers RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!" before any interceptor
    # or handler runs (no retry pushback); 0: no limit.
    max_concurrent_rpcs: int = Field(default=0, ge=0)
    # Worker processes serving ``port`` together (SO_REUSEPORT, services/workers.py), for
    # the services whose ``__main__`` runs through ``run_workers`` (router, cloud). With
    # several, worker i serves /metrics on ``metrics_port + i``.
    workers: int = Field(default=1, ge=1, le=64)


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def settings_from_environment(cls: type[SettingsT]) -> SettingsT:
    """``cls()`` read from the environment, for a service's ``main()``. A bad value exits
    (SystemExit, status 1) with one line per problem naming the variable and its value;
    pydantic's traceback named only the field."""
    try:
        return cls()
    except ValidationError as error:
        prefix = str(cls.model_config.get("env_prefix", ""))
        lines = []
        for problem in error.errors():
            if problem["loc"]:
                variable = prefix + "_".join(str(part) for part in problem["loc"]).upper()
                lines.append(f"{variable}={problem['input']!r}: {problem['msg']}")
            else:  # a rule over several settings
                lines.append(problem["msg"])
        raise SystemExit(f"{cls.__name__}: " + "; ".join(lines)) from None
