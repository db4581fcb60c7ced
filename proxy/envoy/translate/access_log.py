"""Access logs to the sidecar agent's gRPC access-log service, which turns them into
Meshwork's telemetry records."""

from __future__ import annotations

from .protos import HTTP_GRPC_ACCESS_LOG, TCP_GRPC_ACCESS_LOG, Json, typed

# request headers the telemetry records need: request id, W3C and B3 trace context,
# the caller's peer metadata
TELEMETRY_REQUEST_HEADERS = (
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-meshwork-peer",
    # `application/grpc...` makes a request gRPC (Istio's request_protocol)
    "content-type",
)
# a gRPC answer's status: in the trailers, or in the headers of a trailers-only answer
# (Envoy's own local replies to gRPC requests)
GRPC_STATUS_HEADERS = ("grpc-status",)
# Envoy buffers entries and sends them when the buffer holds this much or when the
# flush interval (1 s, Envoy's default, which the agent's drain relies on) has passed.
# Envoy's default buffer, 16 KiB, is some 25 entries: under load the agent then takes
# dozens of gRPC messages a second per logger, and each costs it more than the entries
# in it. Measured (docs/architecture.md §7): 64 KiB takes a third off the agent's CPU
# per request; 256 KiB saves no more and holds some 6 MiB more in each process.
BUFFER_SIZE_BYTES = 64 * 1024
BUFFER_FLUSH_INTERVAL = "1s"


def _common(log_name: str, cluster: str) -> Json:
    return {
        "logName": log_name,
        "transportApiVersion": "V3",
        "grpcService": {"envoyGrpc": {"clusterName": cluster}},
        "bufferSizeBytes": BUFFER_SIZE_BYTES,
        "bufferFlushInterval": BUFFER_FLUSH_INTERVAL,
    }


def http_access_log(log_name: str, cluster: str) -> list[Json]:
    """HCM `access_log`; `log_name` tells the agent which listener (and so which
    reporter: outbound is `source`, inbound `destination`) a record comes from."""
    if not cluster:
        return []
    return [
        {
            "name": "envoy.access_loggers.http_grpc",
            "typedConfig": typed(
                HTTP_GRPC_ACCESS_LOG,
                {
                    "commonConfig": _common(log_name, cluster),
                    "additionalRequestHeadersToLog": list(TELEMETRY_REQUEST_HEADERS),
                    "additionalResponseHeadersToLog": list(GRPC_STATUS_HEADERS),
                    "additionalResponseTrailersToLog": list(GRPC_STATUS_HEADERS),
                },
            ),
        }
    ]


def tcp_access_log(log_name: str, cluster: str) -> list[Json]:
    if not cluster:
        return []
    return [
        {
            "name": "envoy.access_loggers.tcp_grpc",
            "typedConfig": typed(TCP_GRPC_ACCESS_LOG, {"commonConfig": _common(log_name, cluster)}),
        }
    ]
