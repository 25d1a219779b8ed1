"""OpenTelemetry for every service: explicit providers, OTLP by the standard variables.

Providers are created here and injected, never installed as globals by library code:
a global provider can be set only once per process, which breaks tests that need
several services, each with its own exporter, in one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.instrumentation.grpc import filters as grpc_filters
from opentelemetry.propagate import inject
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import PROCESS_PID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from services.prometheus import MetricsEndpoint
from services.rpc_metrics import RpcMetricsInterceptor

OTLP_ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"


@dataclass
class Telemetry:
    """The providers one service uses; pass it down instead of using globals."""

    service_name: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    _span_processors: list[SpanProcessor] = field(default_factory=list)
    # Prometheus /metrics (services/prometheus.py); None when the metrics port is 0.
    metrics_endpoint: MetricsEndpoint | None = None
    _rpc_metrics: RpcMetricsInterceptor | None = None

    def tracer(self, name: str) -> trace.Tracer:
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str) -> metrics.Meter:
        return self.meter_provider.get_meter(name)

    def server_interceptors(
        self, *, tracing: bool = True
    ) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
        """With ``tracing``, a server span per RPC (health checks are not traced: they
        would drown the rest), then the RPC duration metric of every call
        (services/rpc_metrics.py)."""
        if self._rpc_metrics is None:  # one instrument, however many servers share it
            self._rpc_metrics = RpcMetricsInterceptor(self.meter("hybridmesh.rpc"))
        interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = []
        if tracing:
            interceptors.append(
                aio_server_interceptor(  # type: ignore[no-untyped-call]
                    tracer_provider=self.tracer_provider,
                    filter_=grpc_filters.negate(grpc_filters.health_check()),
                )
            )
        # Inside the span, still outside the error mapping (it records the status the
        # caller got); there it sees a stable handler per method and wraps it once.
        interceptors.append(self._rpc_metrics)
        return interceptors

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """Client span per RPC, propagating W3C trace context in the metadata."""
        interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(  # type: ignore[no-untyped-call]
            tracer_provider=self.tracer_provider,
            filter_=grpc_filters.negate(grpc_filters.health_check()),
        )
        return interceptors

    def shutdown(self) -> None:
        """Flush and stop exporters; call once at process exit."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()


def create_telemetry(
    service_name: str,
    *,
    span_processors: Sequence[SpanProcessor] = (),
    metric_readers: Sequence[MetricReader] = (),
    export_otlp: bool | None = None,
    metrics_port: int = 0,
    metrics_host: str = "127.0.0.1",
) -> Telemetry:
    """Build providers for one service.

    ``export_otlp=None`` exports over OTLP/gRPC exactly when ``OTEL_EXPORTER_OTLP_ENDPOINT``
    is set; the exporters read that and the other ``OTEL_*`` variables themselves, so
    pointing a service at Jaeger or a collector needs no code change. ``metrics_port``
    (not 0) serves Prometheus ``/metrics`` on ``metrics_host`` (services/prometheus.py).
    """
    # process.pid tells the workers of one service apart (services/workers.py); the
    # Prometheus exporter shows it in target_info.
    resource = Resource.create({SERVICE_NAME: service_name, PROCESS_PID: os.getpid()})
    tracer_provider = TracerProvider(resource=resource)
    processors = list(span_processors)
    readers = list(metric_readers)
    if export_otlp is None:
        export_otlp = bool(os.environ.get(OTLP_ENDPOINT_VARIABLE))
    if export_otlp:
        # Imported lazily: the exporter pulls in its own gRPC channel machinery.
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        processors.append(BatchSpanProcessor(OTLPSpanExporter()))
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    endpoint = MetricsEndpoint.start(metrics_host, metrics_port) if metrics_port else None
    if endpoint is not None:
        readers.append(endpoint.reader)
    for processor in processors:
        tracer_provider.add_span_processor(processor)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    return Telemetry(
        service_name, tracer_provider, meter_provider, processors, metrics_endpoint=endpoint
    )


def inject_trace_headers(
    headers: dict[str, str] | None = None, *, level1_flags: bool = False
) -> dict[str, str]:
    """W3C trace context of the current span as plain headers (for clients that take no
    interceptor, such as tritonclient's aio client).

    ``level1_flags`` keeps only the sampled bit of the trace flags: the Python SDK sets W3C
    level 2's "random" bit (flags ``03``), which opentelemetry-cpp 1.13 in this Triton does
    not know. Sending ``03`` under load coincided with Triton crashing (a segfault, and
    once its python stub dying) in two of two demo runs; level-1 flags never did.
    """
    carrier: dict[str, str] = dict(headers or {})
    inject(carrier)
    traceparent = carrier.get("traceparent")
    if level1_flags and traceparent and len(traceparent) == 55:
        flags = int(traceparent[-2:], 16) & 0x01
        carrier["traceparent"] = f"{traceparent[:-2]}{flags:02x}"
    return carrier


def observe_info(
    meter: metrics.Meter,
    name: str,
    description: str,
    rows: Callable[[], Iterable[Mapping[str, str]]],
) -> None:
    """An info metric (Prometheus convention: a gauge named ``*.info`` of value 1 whose
    labels carry the facts), one series per row ``rows()`` returns at scrape time."""

    def observe(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [metrics.Observation(1, dict(row)) for row in rows()]

    meter.create_observable_gauge(name, callbacks=[observe], description=description)
