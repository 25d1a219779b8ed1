"""grpc.aio server bootstrap: health, reflection, error mapping, graceful shutdown.

On SIGTERM (or SIGINT) health flips to NOT_SERVING first, so load balancers and the
router stop sending new work, then the server drains in-flight RPCs for the grace period.
Draining starts before that: ``ServiceHost.draining`` is set and the ``on_draining``
callbacks run, so endless server streams (e.g. the router's WatchCorrections) end at once
with UNAVAILABLE "server shutting down" instead of holding the process for the whole grace.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.config import ServiceSettings
from services.interceptors import ErrorMappingInterceptor
from services.logging import get_logger
from services.telemetry import Telemetry

OVERALL_HEALTH = ""  # grpc.health.v1: the empty service name is the server as a whole
# SERVING for as long as the process runs (until shutdown): the liveness probe's target,
# so a service waiting for its dependencies is not restarted for being unready.
LIVENESS_HEALTH = "liveness"

_log = get_logger("services.server")


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to host: its full name (for health and reflection) and how to add it."""

    full_name: str
    add_to_server: Callable[[grpc.aio.Server], None]
    # Services that must load something first (models, a Triton connection) start
    # NOT_SERVING and flip themselves through ServiceHost.set_serving.
    serving_at_start: bool = True


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Workers of one service share its port on purpose (services/workers.py); otherwise
        # two servers must never share a port silently (tests bind port 0 in parallel).
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        # Accept the clients' keepalive pings (services.channels) instead of GOAWAY.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ]


class ServiceHost:
    """Owns one grpc.aio server with health and reflection, and its lifecycle."""

    def __init__(
        self,
        settings: ServiceSettings,
        registrations: Sequence[ServiceRegistration],
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
        server_credentials: grpc.ServerCredentials | None = None,
        plaintext_ports: Sequence[int] = (),
    ) -> None:
        self._settings = settings
        self._registrations = list(registrations)
        self._server_credentials = server_credentials
        # Extra plaintext listeners beside a TLS port (e.g. for the kubelet's gRPC
        # probes, which speak no TLS); what they may reach is the interceptors' call.
        self._plaintext_ports = list(plaintext_ports)
        # Telemetry interceptors first, so the error mapping runs inside the server span.
        self._server = grpc.aio.server(
            interceptors=[*interceptors, ErrorMappingInterceptor()],
            options=server_options(settings),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
        )
        # grpc-stubs lacks the aio health servicer; it is the library's own, not ours.
        self._health: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._port: int | None = None
        self._serving: dict[str, bool] = {}
        self._stopped = asyncio.Event()
        self._draining = asyncio.Event()
        self._drain_callbacks: list[Callable[[], None]] = []
        self._stop_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def address(self) -> str:
        return f"{self._settings.host}:{self.port}"

    @property
    def draining(self) -> asyncio.Event:
        """Set when a graceful stop begins, before in-flight RPCs are drained: what an
        endless stream waits on to end itself."""
        return self._draining

    def on_draining(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (synchronously, in registration order) when draining starts."""
        self._drain_callbacks.append(callback)

    async def start(self) -> int:
        """Bind, start and publish health; returns the bound port."""
        for registration in self._registrations:
            registration.add_to_server(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [r.full_name for r in self._registrations]
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self._server,
        )
        bind = f"{self._settings.host}:{self._settings.port}"
        if self._server_credentials is None:
            self._port = self._server.add_insecure_port(bind)
        else:
            self._port = self._server.add_secure_port(bind, self._server_credentials)
        for port in self._plaintext_ports:
            self._server.add_insecure_port(f"{self._settings.host}:{port}")
        await self._server.start()
        await self._health.set(LIVENESS_HEALTH, health_pb2.HealthCheckResponse.SERVING)
        for registration in self._registrations:
            await self.set_serving(registration.full_name, registration.serving_at_start)
        await self._update_overall()
        _log.info(
            "server started",
            service=self._settings.service_name,
            address=self.address,
            pid=os.getpid(),
        )
        return self._port

    async def set_serving(self, full_name: str, serving: bool) -> None:
        """Publish one service's health (ignored once shutdown has begun)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._serving[full_name] = serving
        await self._health.set(full_name, status)
        await self._update_overall()

    async def _update_overall(self) -> None:
        serving = all(self._serving.values())
        await self._health.set(
            OVERALL_HEALTH,
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING first, then drain in-flight RPCs for ``grace`` seconds."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._draining.set()
        for callback in self._drain_callbacks:
            try:
                callback()
            except Exception:
                # One broken hook must not keep the server from stopping.
                _log.exception("draining callback failed", service=self._settings.service_name)
        await self._health.enter_graceful_shutdown()
        if self._settings.shutdown_drain_delay_seconds > 0:
            # Keep accepting RPCs while pollers (k8s probes, routers) see NOT_SERVING.
            await asyncio.sleep(self._settings.shutdown_drain_delay_seconds)
        grace = self._settings.shutdown_grace_seconds if grace is None else grace
        _log.info("server draining", service=self._settings.service_name, grace_s=grace)
        await self._server.stop(grace)
        _log.info("server stopped", service=self._settings.service_name)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    def stop_on_signals(
        self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Install handlers that start a graceful stop; call from the running loop."""
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        _log.info("signal received", signal=sig.name, service=self._settings.service_name)
        self._stop_task = asyncio.get_running_loop().create_task(self.stop())


class ServiceNode(Protocol):
    """What a service process assembles around its ServiceHost."""

    host: ServiceHost

    async def start(self) -> int: ...

    async def stop(self, grace: float | None = None) -> None: ...


async def serve_until_signalled(node: ServiceNode, telemetry: Telemetry) -> None:
    """Run a service process: start, stop gracefully on SIGTERM/SIGINT, flush telemetry."""
    try:
        await node.start()
        node.host.stop_on_signals()
        await node.host.wait_for_termination()
    finally:
        await node.stop()
        telemetry.shutdown()
