"""Prometheus ``/metrics`` for one service: the OpenTelemetry Prometheus exporter as a
metric reader on the service's own meter provider, served by prometheus_client's HTTP
server on the service's metrics port.

Each service gets its own ``CollectorRegistry`` (never prometheus_client's global one),
so several services in one process (the tests) each expose only their own metrics.
Instruments keep their OpenTelemetry names; the exporter turns them into Prometheus
names (``hybridmesh.router.requests`` -> ``hybridmesh_router_requests_total``, a
histogram in seconds -> ``..._seconds_bucket``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, start_http_server


@dataclass
class MetricsEndpoint:
    """A running ``/metrics`` HTTP server and the reader it serves."""

    reader: PrometheusMetricReader
    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @classmethod
    def start(cls, host: str, port: int) -> MetricsEndpoint:
        """Serve on ``host:port`` (a fixed port: 0 means off and is the caller's to
        check); the reader must then be given to the meter provider."""
        registry = CollectorRegistry(auto_describe=True)
        reader = PrometheusMetricReader(registry=registry)
        server, thread = start_http_server(port, addr=host, registry=registry)
        return cls(reader, host, server.server_port, server, thread)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
