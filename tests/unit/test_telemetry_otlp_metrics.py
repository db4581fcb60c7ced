"""OTLP export of the request metrics and the OTLP/JSON and gRPC transports' pure
parts: Istio's counters and histograms as cumulative OTLP metrics with one resource
per reporting workload; OTLP/JSON's hex ids and current key names; the URL and target
per signal; the metrics exporter superseding a failed export with the next one."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from google.protobuf.message import Message
from opentelemetry.proto.metrics.v1 import metrics_pb2

from mesh.errors import BadRequest
from mesh.telemetry import (
    DURATION_BUCKETS_MS,
    REQUEST_DURATION_MS,
    REQUESTS_TOTAL,
    TCP_SENT_BYTES,
    CounterDelta,
    HistogramDelta,
    MetricTotals,
    Span,
)
from services.telemetry.exporter import MetricsExporter
from services.telemetry.otlp import export_request
from services.telemetry.otlp_json import to_otlp_json
from services.telemetry.otlp_metrics import metrics_request, reporting_workload, request_metrics
from services.telemetry.otlp_transport import (
    Outcome,
    SendResult,
    Signal,
    grpc_target,
    signal_url,
)
from services.telemetry.settings import TelemetrySettings

CUMULATIVE = metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


def labels(reporter: str, code: str = "200") -> dict[str, str]:
    return {
        "reporter": reporter,
        "source_workload": "productpage-v1",
        "source_workload_namespace": "default",
        "source_app": "productpage",
        "destination_workload": "reviews-v2",
        "destination_workload_namespace": "default",
        "destination_app": "reviews",
        "destination_service_name": "reviews",
        "response_code": code,
        "response_flags": "-",
    }


def totals() -> MetricTotals:
    t = MetricTotals()
    for reporter in ("source", "destination"):
        t.add(CounterDelta(name=REQUESTS_TOTAL, labels=labels(reporter), value=7))
        t.add(CounterDelta(name=REQUESTS_TOTAL, labels=labels(reporter, "503"), value=2))
        counts = [0] * (len(DURATION_BUCKETS_MS) + 1)
        counts[3], counts[5] = 6, 3
        t.add(
            HistogramDelta(
                name=REQUEST_DURATION_MS,
                labels=labels(reporter),
                bounds=list(DURATION_BUCKETS_MS),
                counts=counts,
                sum=120.5,
                count=9,
            )
        )
    tcp = {k: v for k, v in labels("source").items() if k != "response_code"}
    t.add(CounterDelta(name=TCP_SENT_BYTES, labels=tcp, value=4096))
    return t


def resource_attrs(resource: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in resource.attributes}


def point_attrs(point: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in point.attributes}


def test_counters_and_histograms_become_cumulative_metrics_per_reporting_workload() -> None:
    req = metrics_request(totals(), start_ns=1_000, now_ns=5_000)
    by_resource: dict[str, dict[str, Any]] = {}
    for resource, metric in request_metrics(req):
        by_resource.setdefault(resource_attrs(resource)["service.name"], {})[metric.name] = metric
    # the caller's proxy counted reporter=source, the callee's reporter=destination
    assert set(by_resource) == {"productpage", "reviews"}
    caller = by_resource["productpage"]
    assert set(caller) == {REQUESTS_TOTAL, REQUEST_DURATION_MS, TCP_SENT_BYTES}

    requests = caller[REQUESTS_TOTAL]
    assert requests.sum.is_monotonic and requests.sum.aggregation_temporality == CUMULATIVE
    assert requests.unit == "1" and requests.description
    by_code = {point_attrs(p)["response_code"]: p for p in requests.sum.data_points}
    assert {c: p.as_double for c, p in by_code.items()} == {"200": 7.0, "503": 2.0}
    point = by_code["200"]
    assert (point.start_time_unix_nano, point.time_unix_nano) == (1_000, 5_000)
    # every Istio label stays an attribute, under its own name
    assert point_attrs(point) == labels("source")

    duration = caller[REQUEST_DURATION_MS]
    assert duration.unit == "ms"
    assert duration.histogram.aggregation_temporality == CUMULATIVE
    [h] = duration.histogram.data_points
    assert list(h.explicit_bounds) == list(DURATION_BUCKETS_MS)
    assert len(h.bucket_counts) == len(DURATION_BUCKETS_MS) + 1
    assert (h.bucket_counts[3], h.bucket_counts[5], sum(h.bucket_counts)) == (6, 3, 9)
    assert (h.count, h.sum) == (9, 120.5)

    callee = [r for r, m in request_metrics(req) if resource_attrs(r)["service.name"] == "reviews"]
    assert resource_attrs(callee[0]) == {
        "service.name": "reviews",
        "service.namespace": "default",
        "k8s.namespace.name": "default",
        "k8s.deployment.name": "reviews-v2",
    }


def test_the_same_totals_give_the_same_bytes() -> None:
    a = metrics_request(totals(), 1, 2).SerializeToString()
    assert a == metrics_request(totals(), 1, 2).SerializeToString()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"reporter": "source", "source_workload": "a-v1", "source_app": "a"}, ("a", "", "a-v1")),
        (
            {"reporter": "destination", "destination_workload": "b-v2",
             "destination_workload_namespace": "ns", "destination_app": "unknown"},
            ("b-v2", "ns", "b-v2"),
        ),
        ({}, ("unknown", "", "unknown")),
    ],
)  # fmt: skip
def test_reporting_workload(given: dict[str, str], expected: tuple[str, str, str]) -> None:
    assert reporting_workload(tuple(sorted(given.items()))) == expected


def test_otlp_json_has_hex_ids_integer_enums_and_current_key_names() -> None:
    span = Span(
        trace_id="0af7651916cd43dd8448eb211c80319c", span_id="b7ad6b7169203331",
        parent_span_id="00f067aa0ba902b7", name="reviews:9080/*", kind="client",
        service="productpage", namespace="default", instance="productpage-v1-h-1-ab",
        start_ns=1_000, end_ns=2_500, status_code=200,
    )  # fmt: skip
    doc = json.loads(to_otlp_json(export_request([span])))
    [scope] = doc["resourceSpans"][0]["scopeSpans"]
    [out] = scope["spans"]
    assert out["traceId"] == "0af7651916cd43dd8448eb211c80319c"
    assert out["spanId"] == "b7ad6b7169203331"
    assert out["parentSpanId"] == "00f067aa0ba902b7"
    assert out["kind"] == 3  # SPAN_KIND_CLIENT, an integer
    assert scope["scope"]["name"] == "meshwork.proxy"
    assert "instrumentationLibrarySpans" not in json.dumps(doc)

    metrics = json.loads(to_otlp_json(metrics_request(totals(), 1, 2)))
    rm = metrics["resourceMetrics"][0]
    sums = [m for m in rm["scopeMetrics"][0]["metrics"] if "sum" in m]
    assert sums[0]["sum"]["aggregationTemporality"] == 2 and sums[0]["sum"]["isMonotonic"]


@pytest.mark.parametrize(
    ("endpoint", "signal", "url"),
    [
        ("http://c:4318", "metrics", "http://c:4318/v1/metrics"),
        ("http://c:4318/", "traces", "http://c:4318/v1/traces"),
        ("https://c/v1/traces", "metrics", "https://c/v1/metrics"),
        ("https://c/otlp/traces", "traces", "https://c/otlp/traces"),
        ("https://c/otlp/traces", "metrics", "https://c/otlp/metrics"),
        ("https://gateway/otlp", "metrics", "https://gateway/otlp/v1/metrics"),
    ],
)
def test_signal_urls(endpoint: str, signal: Signal, url: str) -> None:
    assert signal_url(endpoint, signal) == url


def test_grpc_targets() -> None:
    assert grpc_target("http://collector:4317") == ("collector:4317", False)
    assert grpc_target("https://collector") == ("collector:4317", True)
    assert grpc_target("http://[::1]:5555") == ("[::1]:5555", False)


def test_protocol_and_interval_settings() -> None:
    s = TelemetrySettings.from_options(
        {"otlp-endpoint": "http://c:4317", "otlp-protocol": "grpc", "otlp-metrics-interval-s": "5"}
    )
    assert (s.otlp_protocol, s.otlp_metrics_interval_s) == ("grpc", 5.0)
    assert TelemetrySettings().otlp_protocol == "http/protobuf"
    with pytest.raises(BadRequest, match="otlp-protocol: expected one of http/protobuf"):
        TelemetrySettings.from_options({"otlp-protocol": "thrift"})
    with pytest.raises(BadRequest, match="must be positive"):
        TelemetrySettings.from_options({"otlp-metrics-interval-s": "0"})


class FakeTransport:
    """Records what the exporter sends; answers from a script of results."""

    def __init__(self, *results: SendResult):
        self.results = list(results)
        self.sent: list[tuple[Signal, Message]] = []
        self.closed = 0

    async def send(self, signal: Signal, request: Message) -> SendResult:
        self.sent.append((signal, request))
        return self.results.pop(0) if self.results else SendResult(Outcome.OK)

    async def close(self) -> None:
        self.closed += 1


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    error = info = warning


def test_a_failed_metrics_export_is_counted_and_superseded_by_the_next() -> None:
    current = totals()
    transport = FakeTransport(SendResult(Outcome.RETRY, "HTTP 503"))
    log = Log()
    clock = iter(range(100, 10_000, 100))
    exporter = MetricsExporter(
        transport, lambda: current, interval_s=60, log=log, clock_ns=lambda: next(clock)
    )
    exporter.start_ns = 50

    asyncio.run(exporter.export_once())
    assert exporter.stats.failures == 1 and exporter.stats.exports == 0
    assert log.events == [("otlp.metrics_export_failed", {"error": "HTTP 503", "outcome": "retry"})]
    current.add(CounterDelta(name=REQUESTS_TOTAL, labels=labels("source"), value=1))
    asyncio.run(exporter.export_once())
    assert exporter.stats.exports == 1 and exporter.stats.data_points == len(current)
    # the second export carries everything, the failed one's counts included
    [(signal, req)] = transport.sent[1:]
    assert signal == "metrics"
    values = {
        (m.name, point_attrs(p)["reporter"], point_attrs(p).get("response_code")): p.as_double
        for _, m in request_metrics(req)  # type: ignore[arg-type]
        if m.HasField("sum")
        for p in m.sum.data_points
    }
    assert values[(REQUESTS_TOTAL, "source", "200")] == 8.0
    points = [
        p
        for _, m in request_metrics(req)
        if m.HasField("sum")
        for p in m.sum.data_points  # type: ignore[arg-type]
    ]
    assert {p.start_time_unix_nano for p in points} == {50}


def test_no_series_no_export() -> None:
    transport = FakeTransport()
    exporter = MetricsExporter(transport, MetricTotals, interval_s=60, log=Log())
    asyncio.run(exporter.export_once())
    assert transport.sent == []


def test_serve_refuses_an_unknown_otlp_protocol_from_the_environment_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from meshctl.main import main

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")
    code = main(
        ["serve", "telemetry", "--nats", "nats://127.0.0.1:1", "--etcd", "http://127.0.0.1:1",
         "--http-port", "0", "--otlp-endpoint", "http://127.0.0.1:4318"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "otlp-protocol: expected one of http/protobuf, http/json, grpc, got 'thrift'" in err
    assert "Traceback" not in err
