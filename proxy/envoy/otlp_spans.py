"""Envoy's OpenTelemetry spans -> Meshwork's span records (pure, no I/O).

Each HCM's tracer (`proxy.envoy.translate.listeners.tracing`) exports the spans it
sampled over OTLP gRPC to the sidecar's trace receiver (`trace_service`). Envoy opens
one span per request and HCM, named by the listener's traffic direction: a `client`
span on the outbound listener and the gateway, a `server` span on the inbound one; it
sends the span's own context upstream (`traceparent`), so the next hop's span is its
child, as the Python proxy's spans are.

`OtlpSpanConverter` gives each such span the fields and attributes the Python proxy
records (`proxy.telemetry.datapath`): name `<authority>/*`, HTTP status, error for no
response or 5xx, Envoy's response flags, the upstream address, the request id and the
peer's workload (the chosen endpoint's on the client side, the caller's
`x-meshwork-peer` on the server side: the inbound HCM tags the span with the metadata
`peer_metadata_filter` wrote).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal
from urllib.parse import urlsplit

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from mesh.telemetry import Span

from .access_log_convert import PEER_SPAN_TAG, AccessLogConverter, cluster_service

_KINDS: dict[int, Literal["client", "server"]] = {
    trace_pb2.Span.SPAN_KIND_CLIENT: "client",
    trace_pb2.Span.SPAN_KIND_SERVER: "server",
}


class SpanError(ValueError):
    """An exported span that cannot become a span record: the message says why."""


def _value(value: common_pb2.AnyValue) -> str:
    which = value.WhichOneof("value")
    if which == "string_value":
        return str(value.string_value)
    if which == "int_value":
        return str(value.int_value)
    if which == "bool_value":
        return "true" if value.bool_value else "false"
    if which == "double_value":
        return str(value.double_value)
    return ""


# the OTLP messages `xds-protos` brings predate the rename of field 2 of ResourceSpans
# (`instrumentation_library_spans` -> `scope_spans`, same number and layout): Envoy's
# newer messages decode into either
_SCOPE_FIELD = (
    "scope_spans"
    if "scope_spans" in trace_pb2.ResourceSpans.DESCRIPTOR.fields_by_name
    else "instrumentation_library_spans"
)


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> Iterator[trace_pb2.Span]:
    for resource_spans in request.resource_spans:
        for scope_spans in getattr(resource_spans, _SCOPE_FIELD):
            yield from scope_spans.spans


class OtlpSpanConverter:
    """One per sidecar: converts its Envoy's spans, naming the peer the way its access
    logs do (the same `AccessLogConverter`, so the same memoised lookups)."""

    def __init__(self, names: AccessLogConverter):
        self.names = names

    def span(self, otlp: trace_pb2.Span) -> Span:
        kind = _KINDS.get(otlp.kind)
        if kind is None:
            raise SpanError(f"span kind {otlp.kind}: not a client or server span")
        if len(otlp.trace_id) != 16 or len(otlp.span_id) != 8:
            raise SpanError(
                f"trace id of {len(otlp.trace_id)} bytes, span id of {len(otlp.span_id)} "
                "bytes: expected 16 and 8"
            )
        tags = {kv.key: _value(kv.value) for kv in otlp.attributes}
        try:
            status = int(tags.get("http.status_code", "0") or 0)
        except ValueError:
            raise SpanError("http.status_code is not a number") from None
        url = tags.get("http.url", "")
        authority = urlsplit(url).netloc if url else ""
        upstream = tags.get("upstream_address", "")
        if kind == "client":
            service = cluster_service(tags.get("upstream_cluster", ""))
            peer = self.names.destination(service, upstream)
            name = f"{authority or service}/*"
        else:
            peer = self.names.caller(tags.get(PEER_SPAN_TAG, ""), "")
            name = f"{authority or self.names.local.service_host}/*"
        local = self.names.local
        parent = otlp.parent_span_id.hex() if len(otlp.parent_span_id) == 8 else ""
        return Span(
            trace_id=otlp.trace_id.hex(),
            span_id=otlp.span_id.hex(),
            parent_span_id=parent,
            name=name,
            kind=kind,
            service=local.service,
            namespace=local.namespace,
            instance=local.instance,
            start_ns=otlp.start_time_unix_nano,
            end_ns=max(otlp.end_time_unix_nano, otlp.start_time_unix_nano),
            status_code=status,
            error=status == 0 or status >= 500,
            attributes={
                "http.method": tags.get("http.method", ""),
                "http.url": url,
                "http.status_code": str(status),
                "response_flags": tags.get("response_flags", "-") or "-",
                "upstream_host": upstream,
                "request_id": tags.get("guid:x-request-id", ""),
                "peer.workload": peer.name,
            },
        )
