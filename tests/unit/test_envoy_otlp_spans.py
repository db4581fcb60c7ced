"""Envoy's OpenTelemetry spans -> our span records, named as the access logs name
the peer; bad spans counted, rejected to Envoy, never raised."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from mesh import telemetry as wire
from mesh.messages import Endpoint, EndpointSet
from proxy.envoy.access_log_convert import PEER_SPAN_TAG, AccessLogConverter, LocalProxy
from proxy.envoy.otlp_spans import _SCOPE_FIELD, OtlpSpanConverter, SpanError
from proxy.envoy.trace_service import SpanIngest
from proxy.telemetry import TelemetryRecorder, Workload, encode_peer_metadata, own_workload

RATINGS = "ratings.default.svc.cluster.local"
TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
SPAN = bytes.fromhex("00f067aa0ba902b7")
PARENT = bytes.fromhex("1111111111111111")
LOCAL = LocalProxy(
    workload=own_workload(
        service="reviews", namespace="default", version="v2", labels={}, identity=""
    ),
    service_host="reviews.default.svc.cluster.local",
    namespace="default",
    service="reviews",
    instance="reviews-v2-abc",
)
RATINGS_SET = EndpointSet(
    namespace="default",
    service="ratings",
    revision=1,
    endpoints=[Endpoint(instance="r1", address="10.0.0.5:15006", version="v1")],
)


def converter() -> OtlpSpanConverter:
    return OtlpSpanConverter(AccessLogConverter(LOCAL, endpoints={RATINGS: RATINGS_SET}.get))


def otlp_span(kind: int, **tags: str) -> trace_pb2.Span:
    span = trace_pb2.Span(
        trace_id=TRACE,
        span_id=SPAN,
        parent_span_id=PARENT,
        name="egress ratings:9080",
        kind=kind,  # type: ignore[arg-type]
        start_time_unix_nano=1_000,
        end_time_unix_nano=13_000_000,
    )
    for key, value in tags.items():
        span.attributes.append(
            common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))
        )
    return span


def test_a_client_span_is_named_and_attributed_as_the_python_proxy_does() -> None:
    span = converter().span(
        otlp_span(
            trace_pb2.Span.SPAN_KIND_CLIENT,
            **{
                "http.url": "http://ratings:9080/ratings/0",
                "http.method": "GET",
                "http.status_code": "503",
                "response_flags": "UF",
                "upstream_cluster": f"outbound|0|v1|{RATINGS}",
                "upstream_address": "10.0.0.5:15006",
                "guid:x-request-id": "req-1",
            },
        )
    )
    assert (span.trace_id, span.span_id, span.parent_span_id) == (
        TRACE.hex(),
        SPAN.hex(),
        PARENT.hex(),
    )
    assert (span.kind, span.name, span.status_code, span.error) == (
        "client",
        "ratings:9080/*",
        503,
        True,
    )
    assert (span.service, span.namespace, span.instance) == ("reviews", "default", "reviews-v2-abc")
    assert (span.start_ns, span.end_ns) == (1_000, 13_000_000)
    assert span.attributes == {
        "http.method": "GET",
        "http.url": "http://ratings:9080/ratings/0",
        "http.status_code": "503",
        "response_flags": "UF",
        "upstream_host": "10.0.0.5:15006",
        "request_id": "req-1",
        "peer.workload": "ratings-v1",
    }


def test_a_server_span_names_the_caller_from_its_peer_metadata_tag() -> None:
    caller = Workload("productpage-v1", "default", "x", "productpage", "v1")
    otlp = otlp_span(
        trace_pb2.Span.SPAN_KIND_SERVER,
        **{"http.status_code": "200", PEER_SPAN_TAG: encode_peer_metadata(caller)},
    )
    otlp.ClearField("parent_span_id")  # a trace this Envoy started
    span = converter().span(otlp)
    assert (span.kind, span.parent_span_id, span.error) == ("server", "", False)
    assert span.name == "reviews.default.svc.cluster.local/*"  # no URL tag: the service
    assert span.attributes["peer.workload"] == "productpage-v1"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: setattr(s, "kind", trace_pb2.Span.SPAN_KIND_INTERNAL), "span kind 1"),
        (lambda s: setattr(s, "trace_id", b"\x01"), "trace id of 1 bytes"),
    ],
)
def test_a_span_that_is_not_one_of_envoys_hops_is_an_error_saying_why(
    mutate: object, message: str
) -> None:
    otlp = otlp_span(trace_pb2.Span.SPAN_KIND_CLIENT)
    mutate(otlp)  # type: ignore[operator]
    with pytest.raises(SpanError, match=message):
        converter().span(otlp)


def test_ingest_records_good_spans_and_counts_bad_ones() -> None:
    recorder = TelemetryRecorder(
        reporter_id="reviews-v2-abc_00000001",
        namespace="default",
        service="reviews",
        instance="reviews-v2-abc",
    )
    ingest = SpanIngest(converter(), recorder)
    request = trace_service_pb2.ExportTraceServiceRequest()
    spans = getattr(request.resource_spans.add(), _SCOPE_FIELD).add().spans
    spans.append(otlp_span(trace_pb2.Span.SPAN_KIND_CLIENT, **{"http.status_code": "200"}))
    spans.append(otlp_span(trace_pb2.Span.SPAN_KIND_SERVER, **{"http.status_code": "x"}))
    # the span of an app's CONNECT tunnel is no request's: left out, not an error
    tunnel = {"http.status_code": "200", "http.method": "CONNECT"}
    spans.append(otlp_span(trace_pb2.Span.SPAN_KIND_CLIENT, **tunnel))
    ingest.on_export(request)
    assert (ingest.counts.spans, ingest.counts.failed) == (1, 1)
    batch = {out.kind: wire.decode(out.payload) for out in recorder.outgoing()}["spans"]
    assert isinstance(batch, wire.SpanBatch) and [s.kind for s in batch.spans] == ["client"]
