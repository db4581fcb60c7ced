"""Access logs to the sidecar agent's gRPC access-log service, which turns them into
Meshwork's telemetry records; in the `stats` telemetry mode (docs/architecture.md §7)
Envoy counts every HTTP request itself with its stats access logger, and the gRPC
log carries only the requests an access record is kept for."""

from __future__ import annotations

from typing import Literal

from .protos import HTTP_GRPC_ACCESS_LOG, STATS_ACCESS_LOG, TCP_GRPC_ACCESS_LOG, Json, typed

# `--envoy-telemetry`: `access-log` (every request is a gRPC access-log entry the agent
# converts and counts) or `stats` (Envoy counts; the agent reads the counters)
TelemetryMode = Literal["access-log", "stats"]
TELEMETRY_MODES: tuple[TelemetryMode, ...] = ("access-log", "stats")

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


# ---------------------------------------------------------------- stats mode
# Envoy's stat names: `meshwork.<log name>.<metric>` with the tags below; the agent
# reads them from Envoy's admin (`proxy.envoy.stats_convert`)
STATS_PREFIX = "meshwork"
REQUESTS_STAT = "requests"
DURATION_STAT = "duration"  # ms (%DURATION%: whole milliseconds)
REQUEST_BYTES_STAT = "request_bytes"  # body bytes, as the gRPC log's
RESPONSE_BYTES_STAT = "response_bytes"
# tag name -> Envoy's format: what `AccessLogConverter` reads from a gRPC entry
STATS_TAGS: tuple[tuple[str, str], ...] = (
    ("upstream_cluster", "%UPSTREAM_CLUSTER%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("peer", "%DYNAMIC_METADATA(meshwork:peer)%"),
    ("peer_san", "%DOWNSTREAM_PEER_URI_SAN%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("details", "%RESPONSE_CODE_DETAILS%"),
    ("content_type", "%REQ(content-type)%"),
    ("grpc_status", "%GRPC_STATUS_NUMBER%"),
)
# In stats mode the gRPC log keeps, as an Istio user filtering access logs on
# `response.code >= 400` would: every request answered 4xx/5xx or with a response
# flag (no response, upstream failure, ...), and this percentage of the others
# (Envoy runtime key `meshwork.access_log.sample_percent`, adjustable at run time)
ACCESS_SAMPLE_PERCENT = 1
ACCESS_SAMPLE_RUNTIME_KEY = "meshwork.access_log.sample_percent"
ACCESS_ERROR_STATUS = 400
ACCESS_ERROR_RUNTIME_KEY = "meshwork.access_log.error_status"


def stat_name(log_name: str, metric: str) -> str:
    return f"{STATS_PREFIX}.{log_name}.{metric}"


def _stat(metric: str) -> Json:
    return {
        "name": metric,
        "tags": [{"name": name, "valueFormat": fmt} for name, fmt in STATS_TAGS],
    }


def stats_access_log(log_name: str) -> Json:
    """Envoy's stats access logger: one counter and three histograms per listener,
    tagged with everything the agent names a request's series from."""
    return {
        "name": "envoy.access_loggers.stats",
        "typedConfig": typed(
            STATS_ACCESS_LOG,
            {
                # deprecated in Envoy 1.40 for `stats_scope`, which the API protos we
                # pack with (the envoy-api wheel) do not have yet: Envoy warns once
                "statPrefix": f"{STATS_PREFIX}.{log_name}",
                "counters": [{"stat": _stat(REQUESTS_STAT), "valueFixed": 1}],
                "histograms": [
                    {
                        "stat": _stat(DURATION_STAT),
                        "unit": "Milliseconds",
                        "valueFormat": "%DURATION%",
                    },
                    {
                        "stat": _stat(REQUEST_BYTES_STAT),
                        "unit": "Bytes",
                        "valueFormat": "%BYTES_RECEIVED%",
                    },
                    {
                        "stat": _stat(RESPONSE_BYTES_STAT),
                        "unit": "Bytes",
                        "valueFormat": "%BYTES_SENT%",
                    },
                ],
            },
        ),
    }


def sampled_or_failed_filter() -> Json:
    """The gRPC log's filter in stats mode: errors, flagged requests, and a sample."""
    return {
        "orFilter": {
            "filters": [
                {
                    "statusCodeFilter": {
                        "comparison": {
                            "op": "GE",
                            "value": {
                                "defaultValue": ACCESS_ERROR_STATUS,
                                "runtimeKey": ACCESS_ERROR_RUNTIME_KEY,
                            },
                        }
                    }
                },
                {"responseFlagFilter": {}},
                {
                    "runtimeFilter": {
                        "runtimeKey": ACCESS_SAMPLE_RUNTIME_KEY,
                        "percentSampled": {
                            "numerator": ACCESS_SAMPLE_PERCENT,
                            "denominator": "HUNDRED",
                        },
                        "useIndependentRandomness": True,
                    }
                },
            ]
        }
    }


def http_access_log(log_name: str, cluster: str, mode: TelemetryMode = "access-log") -> list[Json]:
    """HCM `access_log`; `log_name` tells the agent which listener (and so which
    reporter: outbound is `source`, inbound `destination`) a record comes from. In
    `stats` mode Envoy counts every request (`stats_access_log`) and the gRPC log
    carries only the requests `sampled_or_failed_filter` keeps."""
    if not cluster:
        return []
    grpc: Json = {
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
    if mode == "access-log":
        return [grpc]
    grpc["filter"] = sampled_or_failed_filter()
    return [stats_access_log(log_name), grpc]


def tcp_access_log(log_name: str, cluster: str) -> list[Json]:
    if not cluster:
        return []
    return [
        {
            "name": "envoy.access_loggers.tcp_grpc",
            "typedConfig": typed(TCP_GRPC_ACCESS_LOG, {"commonConfig": _common(log_name, cluster)}),
        }
    ]
