"""The sidecar's telemetry: Istio-named metrics, access records and spans (docs/architecture.md §7).

Pure core, thin I/O shell:

- `records`: the NamedTuples the data path fills (`Workload`, `RequestRecord`,
  `TcpRecord`).
- `recorder`: `TelemetryRecorder` (no I/O) aggregates them in-process, for the admin
  `/stats/prometheus` and as delta batches for the bus.
- `publisher`: `TelemetryPublisher` (I/O) publishes those batches to JetStream every
  second and re-sends what was not acknowledged, under the same `Nats-Msg-Id`.
- `tracing`: W3C trace context and B3, sampling, spans (pure); `TracePropagator`,
  what a proxy runs per request (unsampled requests open no span).
- `peer_metadata`: the header a source proxy sends about its workload.
- `datapath`: `SidecarTelemetry`, what the listeners call per request and connection.
"""

from .datapath import InboundSeen, SidecarTelemetry, caller_workload, own_workload
from .peer_metadata import PEER_METADATA_HEADER, decode_peer_metadata, encode_peer_metadata
from .publisher import TelemetryPublisher
from .recorder import TelemetryRecorder
from .records import (
    UNKNOWN,
    Outgoing,
    RequestRecord,
    TcpRecord,
    Workload,
    split_service_host,
    workload_name,
)
from .tracing import (
    B3,
    DEFAULT_SAMPLER,
    TRACE_HEADERS,
    TRACEPARENT,
    TRACESTATE,
    X_B3_FLAGS,
    X_B3_PARENTSPANID,
    X_B3_SAMPLED,
    X_B3_SPANID,
    X_B3_TRACEID,
    Headers,
    IncomingTrace,
    Sampler,
    SpanContext,
    TracePropagator,
    continue_trace,
    extract_trace,
    finish_span,
    format_traceparent,
    incoming_trace,
    new_span_id,
    new_trace_id,
    parse_b3_single,
    parse_traceparent,
    replace_trace_headers,
    start_span,
    trace_headers,
)

__all__ = [
    "B3",
    "DEFAULT_SAMPLER",
    "PEER_METADATA_HEADER",
    "TRACEPARENT",
    "TRACESTATE",
    "TRACE_HEADERS",
    "UNKNOWN",
    "X_B3_FLAGS",
    "X_B3_PARENTSPANID",
    "X_B3_SAMPLED",
    "X_B3_SPANID",
    "X_B3_TRACEID",
    "Headers",
    "InboundSeen",
    "IncomingTrace",
    "Outgoing",
    "RequestRecord",
    "Sampler",
    "SidecarTelemetry",
    "SpanContext",
    "TcpRecord",
    "TelemetryPublisher",
    "TelemetryRecorder",
    "TracePropagator",
    "Workload",
    "caller_workload",
    "continue_trace",
    "decode_peer_metadata",
    "encode_peer_metadata",
    "extract_trace",
    "finish_span",
    "format_traceparent",
    "incoming_trace",
    "new_span_id",
    "new_trace_id",
    "own_workload",
    "parse_b3_single",
    "parse_traceparent",
    "replace_trace_headers",
    "split_service_host",
    "start_span",
    "trace_headers",
    "workload_name",
]
