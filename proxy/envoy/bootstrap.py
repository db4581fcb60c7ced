"""Envoy's bootstrap for a Meshwork sidecar or gateway: everything comes over ADS on
the sidecar's Unix socket; admin on loopback; limits sane for a sidecar.

The bootstrap is a plain dict in Envoy's JSON form (what `envoy -c file.json` reads),
built from a typed, frozen `BootstrapOptions`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the message `INTERNAL_LISTENERS` names, in the descriptor pool for whoever parses the
# bootstrap into its proto (the tests, `meshctl proxy-config`)
import envoy.extensions.bootstrap.internal_listener.v3.internal_listener_pb2  # noqa: F401

from mesh.telemetry import BYTES_BUCKETS, DURATION_BUCKETS_MS

XDS_CLUSTER = "xds-grpc"
_HTTP2_OPTIONS = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


@dataclass(frozen=True)
class BootstrapOptions:
    node_id: str  # our instance id: how the xDS server and logs name this Envoy
    cluster: str  # the service this Envoy serves
    xds_socket: Path  # the sidecar's ADS server
    admin_port: int
    admin_address: str = "127.0.0.1"
    # the sidecar's gRPC access-log service, when it runs one: (cluster name, socket)
    access_log_cluster: str = ""
    access_log_socket: Path | None = None
    # the sidecar's OTLP trace receiver, when it runs one: (cluster name, socket)
    tracing_cluster: str = ""
    tracing_socket: Path | None = None
    # how often Envoy's OpenTelemetry tracer exports what it sampled (Envoy's default:
    # 5 s, and a stopping sidecar waits for a quiet socket before stopping Envoy)
    tracing_flush_interval_ms: int = 1_000
    # ... and how many spans make it export before that interval (Envoy's default: 5,
    # so at 1 % sampling of 1,000 requests/s each Envoy sent a few gRPC exports a
    # second, each a wakeup of the agent's gRPC threads and loop; docs/architecture.md
    # §7): the interval alone paces the exports unless a worker samples this many
    tracing_min_flush_spans: int = 256
    max_downstream_connections: int = 50_000
    # how fast Envoy comes back to the sidecar's socket once it went away (the sidecar
    # restarting): Envoy's default backoff grows to 30 s
    xds_retry_base_ms: int = 250
    xds_retry_max_ms: int = 5_000
    metadata: tuple[tuple[str, str], ...] = ()
    # `--envoy-telemetry stats` (docs/architecture.md §7): Envoy's request histograms
    # take Istio's buckets, and are merged when the agent reads them (one consistent
    # snapshot of counters and histograms per read, no flush timer)
    request_stats: bool = False

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("bootstrap: node_id is empty")
        if not self.cluster:
            raise ValueError("bootstrap: cluster (the service name) is empty")
        if not 0 < self.admin_port < 65536:
            raise ValueError(f"bootstrap: admin_port {self.admin_port} is not a TCP port")
        if bool(self.access_log_cluster) != (self.access_log_socket is not None):
            raise ValueError("bootstrap: access_log_cluster and access_log_socket go together")
        if bool(self.tracing_cluster) != (self.tracing_socket is not None):
            raise ValueError("bootstrap: tracing_cluster and tracing_socket go together")
        if self.tracing_flush_interval_ms < 1:
            raise ValueError("bootstrap: tracing_flush_interval_ms must be positive")
        if self.tracing_min_flush_spans < 1:
            raise ValueError("bootstrap: tracing_min_flush_spans must be positive")
        if self.max_downstream_connections < 1:
            raise ValueError("bootstrap: max_downstream_connections must be positive")


def _grpc_pipe_cluster(name: str, socket_path: Path) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _HTTP2_OPTIONS,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(socket_path)}}}}]}
            ],
        },
    }


# internal listeners (`outbound_tunnel`: the connections the app opens with CONNECT,
# `proxy.envoy.translate.connect`)
INTERNAL_LISTENERS: dict[str, Any] = {
    "name": "envoy.bootstrap.internal_listener",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.bootstrap."
        "internal_listener.v3.InternalListener"
    },
}


# Node metadata naming how this sidecar's listeners bind (architecture §5.2, "Listener
# sockets"). It is part of the bootstrap, hence of the digest that decides adoption: an
# Envoy left running by a sidecar whose listeners used SO_REUSEPORT has another digest
# and is replaced, since Envoy refuses to change reuse port on a listener update.
LISTENER_SOCKETS = ("meshwork.listener_sockets", "exclusive")


def request_stats_config() -> dict[str, Any]:
    """`stats_config` giving the stats access logger's histograms Istio's buckets
    (`mesh.telemetry`): durations in ms, sizes in bytes."""
    return {
        "histogram_bucket_settings": [
            {
                "match": {"safe_regex": {"regex": r"^meshwork\.\w+\.duration(\..*)?$"}},
                "buckets": list(DURATION_BUCKETS_MS),
            },
            {
                "match": {"safe_regex": {"regex": r"^meshwork\.\w+\.\w+_bytes(\..*)?$"}},
                "buckets": list(BYTES_BUCKETS),
            },
        ]
    }


def build_bootstrap(options: BootstrapOptions) -> dict[str, Any]:
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    clusters = [_grpc_pipe_cluster(XDS_CLUSTER, options.xds_socket)]
    if options.access_log_socket is not None:
        clusters.append(_grpc_pipe_cluster(options.access_log_cluster, options.access_log_socket))
    static_runtime: dict[str, Any] = {}
    if options.tracing_socket is not None:
        clusters.append(_grpc_pipe_cluster(options.tracing_cluster, options.tracing_socket))
        static_runtime["tracing.opentelemetry.flush_interval_ms"] = (
            options.tracing_flush_interval_ms
        )
        static_runtime["tracing.opentelemetry.min_flush_spans"] = options.tracing_min_flush_spans
    extra: dict[str, Any] = {}
    if options.request_stats:
        extra = {"stats_config": request_stats_config(), "stats_flush_on_admin": True}
    return {
        **extra,
        "node": {
            "id": options.node_id,
            "cluster": options.cluster,
            "metadata": dict((LISTENER_SOCKETS, *options.metadata)),
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {"cluster_name": XDS_CLUSTER},
                        "retry_policy": {
                            "retry_back_off": {
                                "base_interval": f"{options.xds_retry_base_ms / 1000}s",
                                "max_interval": f"{options.xds_retry_max_ms / 1000}s",
                            }
                        },
                    }
                ],
            },
            "lds_config": ads_source,
            "cds_config": ads_source,
        },
        "static_resources": {"clusters": clusters},
        "bootstrap_extensions": [INTERNAL_LISTENERS],
        "admin": {
            "address": {
                "socket_address": {
                    "address": options.admin_address,
                    "port_value": options.admin_port,
                }
            }
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": options.max_downstream_connections,
                    },
                }
            ]
        },
        "layered_runtime": {
            "layers": [
                # an operator may flip a runtime flag while debugging (admin
                # /runtime_modify); statically only the tracer's flush pacing
                {"name": "static", "static_layer": static_runtime},
                {"name": "admin", "admin_layer": {}},
            ]
        },
    }


def bootstrap_json(bootstrap: dict[str, Any]) -> str:
    return json.dumps(bootstrap, indent=2, sort_keys=True)


def bootstrap_digest(bootstrap: dict[str, Any]) -> str:
    """Identifies a bootstrap: an Envoy started from another one is not adopted."""
    return hashlib.sha256(bootstrap_json(bootstrap).encode()).hexdigest()[:16]
