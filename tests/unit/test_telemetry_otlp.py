"""OTLP export, the pure part: spans as OpenTelemetry protobuf, the bounded queue."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1 import trace_pb2

from mesh.errors import BadRequest
from mesh.telemetry import Span
from services.telemetry.otlp import ExportQueue, export_request, request_spans, workload_of
from services.telemetry.settings import TelemetrySettings

TRACE = "0af7651916cd43dd8448eb211c80319c"


def span(span_id: str = "b7ad6b7169203331", parent: str = "", kind: str = "client",
         status: int = 200, error: bool = False, service: str = "productpage",
         instance: str = "productpage-v1-host-42-ab12") -> Span:  # fmt: skip
    return Span(
        trace_id=TRACE, span_id=span_id, parent_span_id=parent, name="reviews:9080/*",
        kind=kind, service=service, namespace="default", instance=instance,  # type: ignore[arg-type]
        start_ns=1_000, end_ns=2_500, status_code=status, error=error,
        attributes={
            "http.method": "GET", "http.url": "http://reviews:9080/reviews/1?x=1",
            "http.status_code": str(status), "response_flags": "FI",
            "upstream_host": "10.0.0.7:9080", "request_id": "r-1", "peer.workload": "reviews-v2",
        },
    )  # fmt: skip


def attrs(kvs) -> dict[str, object]:
    out = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = v.int_value if v.HasField("int_value") else v.string_value
    return out


def test_spans_become_otlp_with_resources_and_http_semantic_conventions() -> None:
    client = span(status=500, error=True)
    server = span("00f067aa0ba902b7", parent="b7ad6b7169203331", kind="server",
                  service="reviews", instance="reviews-v2-host-43-cd34")  # fmt: skip
    wire = export_request([client, server]).SerializeToString()
    # ExportTraceServiceRequest.resource_spans is field 1 (length-delimited)
    assert wire[0] == 0x0A
    req = ExportTraceServiceRequest.FromString(wire)
    assert len(req.resource_spans) == 2
    by_service = {
        attrs(resource.attributes)["service.name"]: (resource, s)
        for resource, s in request_spans(req)
    }
    resource, s = by_service["reviews"]
    assert attrs(resource.attributes) == {
        "service.name": "reviews",
        "service.namespace": "default",
        "service.instance.id": "reviews-v2-host-43-cd34",
        "k8s.namespace.name": "default",
        "k8s.pod.name": "reviews-v2-host-43-cd34",
        "k8s.deployment.name": "reviews-v2",
    }
    assert s.trace_id == bytes.fromhex(TRACE) and s.parent_span_id == bytes.fromhex(
        "b7ad6b7169203331"
    )
    assert s.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert (s.start_time_unix_nano, s.end_time_unix_nano) == (1_000, 2_500)
    a = attrs(s.attributes)
    assert a["http.request.method"] == "GET" and a["http.response.status_code"] == 200
    assert a["url.path"] == "/reviews/1" and a["url.query"] == "x=1" and a["url.scheme"] == "http"
    assert a["server.address"] == "reviews" and a["server.port"] == 9080
    assert a["meshwork.response_flags"] == "FI" and a["meshwork.peer.workload"] == "reviews-v2"
    assert "http.method" not in a and "http.url" not in a
    assert s.status.code == trace_pb2.Status.STATUS_CODE_UNSET

    _, c = by_service["productpage"]
    assert c.kind == trace_pb2.Span.SPAN_KIND_CLIENT and c.parent_span_id == b""
    assert attrs(c.attributes)["url.full"] == "http://reviews:9080/reviews/1?x=1"
    assert c.status.code == trace_pb2.Status.STATUS_CODE_ERROR


@pytest.mark.parametrize(
    ("service", "instance", "workload"),
    [
        ("reviews", "reviews-v2-host-43-cd34", "reviews-v2"),
        ("reviews", "reviews-x-host-43-cd34", "reviews-x"),
        ("reviews", "pod-7", "reviews"),  # not a Meshwork id: the service
        ("reviews", "reviews-v2", "reviews"),
    ],
)
def test_workload_from_instance_ids(service: str, instance: str, workload: str) -> None:
    assert workload_of(service, instance) == workload


def test_full_buffer_drops_and_counts() -> None:
    q = ExportQueue(capacity=3, batch_spans=2)
    assert q.offer([span(f"{i:016x}") for i in range(5)]) == 2
    assert len(q) == 3 and q.stats.dropped_full == 2
    assert q.offer([span("zz")]) == 0 and q.stats.dropped_invalid == 1


def test_batches_in_order_one_in_flight_and_success_frees_room() -> None:
    q = ExportQueue(capacity=10, batch_spans=2)
    q.offer([span(f"{i:016x}") for i in range(3)])
    first = q.next_batch(0.0)
    assert first is not None and [s.span_id for s in first.spans] == [f"{i:016x}" for i in (0, 1)]
    assert q.next_batch(0.0) is first  # still in flight: the same batch
    q.succeeded(first)
    second = q.next_batch(0.0)
    assert second is not None and len(second.spans) == 1
    q.succeeded(second)
    assert q.next_batch(0.0) is None and q.wait_s(0.0) is None
    assert q.stats.exported == 3


def test_retries_back_off_capped_then_drop_counted() -> None:
    q = ExportQueue(batch_spans=5, max_attempts=5, backoff_base_s=1.0, backoff_cap_s=3.0)
    q.offer([span()])
    now = 100.0
    delays = []
    batch = q.next_batch(now)
    while batch is not None:
        delay = q.failed(batch, now)
        if delay is None:
            break
        delays.append(delay)
        assert q.next_batch(now + delay - 0.01) is None  # still backing off
        assert q.wait_s(now) == pytest.approx(delay)
        now += delay
        batch = q.next_batch(now)
        assert batch is not None and len(batch.spans) == 1  # the same span again
    assert delays == [1.0, 2.0, 3.0, 3.0]
    assert q.stats.dropped_retries == 1 and q.stats.failures == 5 and len(q) == 0


def test_a_rejected_batch_is_dropped_without_retry() -> None:
    q = ExportQueue()
    q.offer([span()])
    batch = q.next_batch(0.0)
    assert batch is not None
    q.rejected(batch)
    assert q.stats.dropped_rejected == 1 and q.next_batch(0.0) is None


def test_otlp_settings_validated_without_echoing_secrets() -> None:
    s = TelemetrySettings.from_options(
        {
            "otlp-endpoint": "http://collector:4318",
            "otlp-headers": "authorization=Bearer s3cret,x-tenant=a",
        }
    )
    assert s.otlp_url == "http://collector:4318/v1/traces"
    assert s.otlp_header_pairs == (("authorization", "Bearer s3cret"), ("x-tenant", "a"))
    assert TelemetrySettings.from_options({"otlp-endpoint": "https://c/otlp/traces"}).otlp_url == (
        "https://c/otlp/traces"
    )
    with pytest.raises(BadRequest) as e:
        TelemetrySettings.from_options({"otlp-headers": "authorization: s3cret"})
    assert "s3cret" not in str(e.value) and "entry 1" in str(e.value)
    with pytest.raises(BadRequest) as e:
        TelemetrySettings.from_options({"otlp-endpoint": "ftp://user:s3cret@c"})
    assert "s3cret" not in str(e.value) and "otlp-endpoint" in str(e.value)
