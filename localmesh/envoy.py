"""Envoy as the cloud ingress of the local mesh: mTLS from the edge site, HTTP/2 gRPC to
cloud_inference, deliberate outlier detection and circuit-breaker limits, no retries
(the router is the mesh's one retry layer), OpenTelemetry tracing, and an emulated WAN.

The WAN is emulated: Envoy's fault filter delays every request by a fixed time (default
40 ms, a typical edge-to-cloud round trip) before it goes to the cloud service. The delay
and an injected failure rate can be changed at run time through Envoy's admin runtime
(``WanControl``). Envoy's fault filter has no jitter, so the emulated WAN has none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from urllib.request import Request, urlopen

import envoy

ENVOY_BINARY = Path(envoy.__file__).parent / "_bin" / "envoy"
DELAY_PERCENT_KEY = "fault.http.delay.fixed_delay_percent"
DELAY_MS_KEY = "fault.http.delay.fixed_duration_ms"
ABORT_PERCENT_KEY = "fault.http.abort.abort_percent"
ABORT_GRPC_STATUS_KEY = "fault.http.abort.grpc_status"
GRPC_UNAVAILABLE = 14
_API = "type.googleapis.com/envoy.extensions"
HCM_TYPE = f"{_API}.filters.network.http_connection_manager.v3.HttpConnectionManager"
TLS_TYPE = f"{_API}.transport_sockets.tls.v3.DownstreamTlsContext"


# The cloud service's own gRPC services: the only paths the ingress routes. Any other
# path matches no route, and Envoy answers a gRPC request without a route itself, with
# grpc-status 12 UNIMPLEMENTED (its local reply maps HTTP 404 so), the status the cloud
# service gives an unknown method.
CLOUD_SERVICES = ("hybridmesh.cloud.v1.CloudService", "grpc.health.v1.Health")


def service_routes(services: tuple[str, ...], route: dict[str, Any]) -> list[dict[str, Any]]:
    """One route per gRPC service (``/<package.Service>/``), all to the same ``route``."""
    return [{"match": {"prefix": f"/{service}/"}, "route": route} for service in services]


@dataclass(frozen=True)
class EnvoyPorts:
    ingress: int
    admin: int


def _h2_options() -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def _static_cluster(name: str, host: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _h2_options(),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
        **extra,
    }


def envoy_config(
    ports: EnvoyPorts,
    cloud_port: int,
    certificates_dir: Path,
    *,
    wan_delay_ms: int,
    otlp_grpc: tuple[str, int] | None,
    access_log: Path | None = None,
    services: tuple[str, ...] = CLOUD_SERVICES,
) -> dict[str, Any]:
    """The bootstrap, as a dict (Envoy reads it as JSON). ``access_log``: a JSON line per
    request at the cloud ingress, with the request id and privacy class the router sends
    as headers (what crossed the WAN, seen from outside the router). Only ``services``
    are routed to the cloud service; anything else gets UNIMPLEMENTED from Envoy."""
    http_filters: list[dict[str, Any]] = [
        {
            "name": "envoy.filters.http.fault",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                "delay": {
                    # Envoy refuses a 0 s delay; "no WAN delay" is 0 % of requests delayed.
                    "fixed_delay": f"{max(wan_delay_ms, 1) / 1000:.3f}s",
                    "percentage": {
                        "numerator": 100 if wan_delay_ms else 0,
                        "denominator": "HUNDRED",
                    },
                },
                "abort": {
                    "grpc_status": GRPC_UNAVAILABLE,
                    "percentage": {"numerator": 0, "denominator": "HUNDRED"},
                },
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            },
        },
    ]
    manager: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": "cloud_ingress",
        "codec_type": "HTTP2",
        "route_config": {
            "name": "cloud",
            "virtual_hosts": [
                {
                    "name": "cloud",
                    "domains": ["*"],
                    "routes": service_routes(
                        services,
                        {
                            "cluster": "cloud_inference",
                            # The caller's grpc-timeout bounds the request; no retries.
                            "timeout": "0s",
                            "max_stream_duration": {"grpc_timeout_header_max": "30s"},
                        },
                    ),
                }
            ],
        },
        "http_filters": http_filters,
    }
    if access_log is not None:
        manager["access_log"] = [_json_access_log(access_log)]
    clusters = [
        _static_cluster(
            "cloud_inference",
            "127.0.0.1",
            cloud_port,
            circuit_breakers={
                "thresholds": [
                    {
                        "max_connections": 1024,
                        "max_pending_requests": 1024,
                        "max_requests": 1024,
                        "max_retries": 0,
                    }
                ]
            },
            outlier_detection={
                "consecutive_5xx": 5,
                "consecutive_gateway_failure": 5,
                "interval": "1s",
                "base_ejection_time": "5s",
                # One upstream here: never eject it entirely, the router's breaker decides.
                "max_ejection_percent": 0,
            },
        )
    ]
    if otlp_grpc is not None:
        manager["tracing"] = {
            "provider": {
                "name": "envoy.tracers.opentelemetry",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                    "grpc_service": {
                        "envoy_grpc": {"cluster_name": "otlp_collector"},
                        "timeout": "1s",
                    },
                    "service_name": "envoy-cloud-ingress",
                },
            }
        }
        clusters.append(_static_cluster("otlp_collector", otlp_grpc[0], otlp_grpc[1]))
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS_TYPE,
            "require_client_certificate": True,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(certificates_dir / "server.crt")},
                        "private_key": {"filename": str(certificates_dir / "server.key")},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(certificates_dir / "ca.crt")}
                },
            },
        },
    }
    return _bootstrap(ports, "cloud_ingress", manager, clusters, transport_socket=tls)


def _json_access_log(path: Path) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": {
                "json_format": {
                    "start_time": "%START_TIME%",
                    "path": "%REQ(:PATH)%",
                    "request_id": "%REQ(X-HYBRIDMESH-REQUEST-ID)%",
                    "privacy_class": "%REQ(X-HYBRIDMESH-PRIVACY-CLASS)%",
                    "grpc_status": "%GRPC_STATUS_NUMBER%",
                    "response_flags": "%RESPONSE_FLAGS%",
                    "bytes_received": "%BYTES_RECEIVED%",
                    "duration_ms": "%DURATION%",
                    "upstream_host": "%UPSTREAM_HOST%",
                }
            },
        },
    }


def plain_proxy_config(ports: EnvoyPorts, upstream_port: int) -> dict[str, Any]:
    """Envoy as a plain gRPC proxy in front of one upstream (the benchmark's C++ peer of
    the router): plaintext HTTP/2 in and out, no fault filter, no tracing, no retries."""
    manager: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": "plain_proxy",
        "codec_type": "HTTP2",
        "route_config": {
            "name": "upstream",
            "virtual_hosts": [
                {
                    "name": "upstream",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "upstream", "timeout": "0s"},
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    clusters = [_static_cluster("upstream", "127.0.0.1", upstream_port)]
    return _bootstrap(ports, "plain_proxy", manager, clusters, transport_socket=None)


def _bootstrap(
    ports: EnvoyPorts,
    listener: str,
    manager: dict[str, Any],
    clusters: list[dict[str, Any]],
    *,
    transport_socket: dict[str, Any] | None,
) -> dict[str, Any]:
    chain: dict[str, Any] = {
        "filters": [
            {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
        ]
    }
    if transport_socket is not None:
        chain["transport_socket"] = transport_socket
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.admin}}
        },
        "layered_runtime": {"layers": [{"name": "admin", "admin_layer": {}}]},
        "static_resources": {
            "listeners": [
                {
                    "name": listener,
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": ports.ingress}
                    },
                    "filter_chains": [chain],
                }
            ],
            "clusters": clusters,
        },
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


def envoy_command(config_path: Path, log_path: Path) -> list[str]:
    return [
        str(ENVOY_BINARY),
        "-c",
        str(config_path),
        "--log-level",
        "warning",
        "--log-path",
        str(log_path),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        # Access log lines reach the file within a second (the default is 10 s).
        "--file-flush-interval-msec",
        "1000",
    ]


class WanControl:
    """Changes the emulated WAN at run time through Envoy's admin runtime."""

    def __init__(self, admin_port: int) -> None:
        self._base = f"http://127.0.0.1:{admin_port}"

    def _modify(self, values: dict[str, int]) -> None:
        with urlopen(
            Request(f"{self._base}/runtime_modify?{urlencode(values)}", method="POST"), timeout=2
        ):
            pass

    def set_delay(self, milliseconds: int) -> None:
        self._modify({DELAY_PERCENT_KEY: 100 if milliseconds else 0, DELAY_MS_KEY: milliseconds})

    def set_failure_percent(self, percent: int) -> None:
        """Fail this share of requests with UNAVAILABLE before they reach the cloud."""
        self._modify({ABORT_PERCENT_KEY: percent, ABORT_GRPC_STATUS_KEY: GRPC_UNAVAILABLE})

    def ready(self) -> bool:
        try:
            with urlopen(f"{self._base}/ready", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False
