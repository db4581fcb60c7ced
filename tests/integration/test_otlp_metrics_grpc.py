"""OTLP export of the request metrics, and OTLP over gRPC and HTTP/JSON, against real
local receivers that decode what arrives:

- an aiohttp OTLP/HTTP receiver: the istio_* counters and the duration histogram of
  requests sent through real sidecars arrive as cumulative OTLP metrics, from the
  leader only although two telemetry replicas run;
- a grpcio OTLP/gRPC receiver (generic handlers, no generated service code): a trace
  through three services arrives whole with its parent links after the collector
  answered UNAVAILABLE twice, the metrics arrive too, the auth header as metadata;
- the transports' answers to a collector's statuses (retry or give up), OTLP/JSON's
  body as a collector reads it.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from mesh.telemetry import REQUEST_DURATION_MS, REQUESTS_TOTAL, CounterDelta, MetricTotals, Span
from services.telemetry import TelemetryService
from services.telemetry.otlp import export_request, request_spans
from services.telemetry.otlp_metrics import metrics_request, request_metrics
from services.telemetry.otlp_transport import GrpcTransport, HttpTransport, Outcome
from tests.support import eventually, running, service_config
from tests.support_dashboard import small_mesh

pytestmark = pytest.mark.asyncio


def attrs(kvs: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in kvs}


def request_counts(requests: list[ExportMetricsServiceRequest]) -> dict[str, float]:
    """istio_requests_total productpage -> reviews (200) in the newest export, by reporter."""
    out: dict[str, float] = {}
    if not requests:
        return out
    for _, metric in request_metrics(requests[-1]):
        if metric.name != REQUESTS_TOTAL:
            continue
        for p in metric.sum.data_points:
            a = attrs(p.attributes)
            if (a["source_workload"], a["destination_service_name"], a["response_code"]) == (
                "productpage-v1", "reviews", "200",
            ):  # fmt: skip
                out[a["reporter"]] = out.get(a["reporter"], 0) + p.as_double
    return out


class HttpReceiver:
    """POST /v1/metrics and /v1/traces, protobuf or JSON; answers `statuses` first."""

    def __init__(self, statuses: tuple[int, ...] = ()):
        self.statuses = list(statuses)
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.json_bodies: list[dict[str, Any]] = []
        self.content_types: set[str] = set()
        self.auth: set[str] = set()
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.content_types.add(request.headers["Content-Type"])
        self.auth.add(request.headers.get("authorization", ""))
        body = await request.read()
        if self.statuses:
            return web.Response(status=self.statuses.pop(0))
        if request.headers["Content-Type"] == "application/json":
            self.json_bodies.append(json.loads(body))
            return web.json_response({})
        if request.path == "/v1/metrics":
            self.metrics.append(ExportMetricsServiceRequest.FromString(body))
            answer = ExportMetricsServiceResponse().SerializeToString()
        else:
            ExportTraceServiceRequest.FromString(body)
            answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[HttpReceiver]:
        app = web.Application()
        app.router.add_post("/v1/metrics", self.handle)
        app.router.add_post("/v1/traces", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield self
        finally:
            await runner.cleanup()


class GrpcReceiver:
    """The OTLP collector services over grpcio's generic handlers, in its own threads.
    The first `fail_traces` trace exports are answered UNAVAILABLE; `abort_with`
    answers every call with that code."""

    def __init__(self, fail_traces: int = 0, abort_with: grpc.StatusCode | None = None):
        self.fail_traces = fail_traces
        self.abort_with = abort_with
        self.failed = 0
        self.spans: list[tuple[dict[str, str], Any]] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.metadata: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self.port = 0

    def _traces(self, request: ExportTraceServiceRequest, context: Any) -> Any:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
        with self._lock:
            failing = self.failed < self.fail_traces
            self.failed += failing
        if self.abort_with is not None:
            context.abort(self.abort_with, "refused")
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "starting up")
        with self._lock:
            self.spans += [(attrs(r.attributes), s) for r, s in request_spans(request)]
        return ExportTraceServiceResponse()

    def _metrics(self, request: ExportMetricsServiceRequest, context: Any) -> Any:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
        if self.abort_with is not None:
            context.abort(self.abort_with, "refused")
        with self._lock:
            self.metrics.append(request)
        return ExportMetricsServiceResponse()

    @contextlib.contextmanager
    def serving(self) -> Iterator[GrpcReceiver]:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "opentelemetry.proto.collector.trace.v1.TraceService",
                    {
                        "Export": grpc.unary_unary_rpc_method_handler(
                            self._traces,
                            request_deserializer=ExportTraceServiceRequest.FromString,
                            response_serializer=ExportTraceServiceResponse.SerializeToString,
                        )
                    },
                ),
                grpc.method_handlers_generic_handler(
                    "opentelemetry.proto.collector.metrics.v1.MetricsService",
                    {
                        "Export": grpc.unary_unary_rpc_method_handler(
                            self._metrics,
                            request_deserializer=ExportMetricsServiceRequest.FromString,
                            response_serializer=ExportMetricsServiceResponse.SerializeToString,
                        )
                    },
                ),
            )
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            yield self
        finally:
            server.stop(grace=None)

    def trace(self, trace_id: str) -> list[tuple[dict[str, str], Any]]:
        with self._lock:
            return [(r, s) for r, s in self.spans if s.trace_id.hex() == trace_id]


async def test_request_metrics_arrive_over_otlp_http_from_the_leader_only(
    nats_server: Any, etcd_server: Any, prefix: str
) -> None:
    async with HttpReceiver().serving() as receiver:
        options = {
            "otlp-endpoint": f"http://127.0.0.1:{receiver.port}",
            "otlp-headers": "authorization=Bearer metrics-token",
            "otlp-metrics-interval-s": "0.3",
        }
        async with (
            small_mesh(nats_server.url, etcd_server.url, prefix, **options) as m,
            running(
                TelemetryService(
                    service_config(
                        nats_server.url, etcd_server.url, prefix, replica="tel-1", **options
                    )
                )
            ),
        ):
            assert await m.send(5) == [200] * 5
            await eventually(
                lambda: request_counts(receiver.metrics) == {"source": 5.0, "destination": 5.0},
                timeout=30,
            )
            assert await m.send(2) == [200] * 2
            await eventually(
                lambda: request_counts(receiver.metrics) == {"source": 7.0, "destination": 7.0},
                timeout=30,
            )
            exports = list(receiver.metrics)

        assert receiver.auth == {"Bearer metrics-token"}
        assert receiver.content_types == {"application/x-protobuf"}
        last = exports[-1]
        by_service: dict[str, set[str]] = {}
        for resource, metric in request_metrics(last):
            by_service.setdefault(attrs(resource.attributes)["service.name"], set()).add(
                metric.name
            )
        # the caller's and the callee's proxies, each with its counters and histograms
        assert {REQUESTS_TOTAL, REQUEST_DURATION_MS} <= by_service["productpage"]
        assert {REQUESTS_TOTAL, REQUEST_DURATION_MS} <= by_service["reviews"]
        durations = [
            p
            for r, metric in request_metrics(last)
            if metric.name == REQUEST_DURATION_MS
            and attrs(r.attributes)["service.name"] == "reviews"
            for p in metric.histogram.data_points
            if attrs(p.attributes)["response_code"] == "200"
        ]
        assert sum(p.count for p in durations) == 7
        assert all(sum(p.bucket_counts) == p.count for p in durations)
        # one writer: every data point of every export carries the leader's start time
        # (a second replica exporting too would bring its own)
        starts = {
            p.start_time_unix_nano
            for req in exports
            for _, metric in request_metrics(req)
            for p in (*metric.sum.data_points, *metric.histogram.data_points)
        }
        assert len(starts) == 1


async def test_traces_and_metrics_over_otlp_grpc_after_unavailable(
    nats_server: Any, etcd_server: Any, prefix: str
) -> None:
    with GrpcReceiver(fail_traces=2).serving() as receiver:
        options = {
            "otlp-endpoint": f"http://127.0.0.1:{receiver.port}",
            "otlp-protocol": "grpc",
            "otlp-headers": "Authorization=Bearer grpc-token",
            "otlp-backoff-cap-s": "0.5",
            "otlp-metrics-interval-s": "0.3",
        }
        async with small_mesh(nats_server.url, etcd_server.url, prefix, **options) as m:
            trace_id = await m.traced_chain()
            await eventually(lambda: len(receiver.trace(trace_id)) >= 4, timeout=30)
            assert await m.send(3) == [200] * 3
            await eventually(
                lambda: request_counts(receiver.metrics) == {"source": 3.0, "destination": 3.0},
                timeout=30,
            )

        assert receiver.failed >= 2
        spans = receiver.trace(trace_id)
        assert len(spans) == 4  # once each, although the first exports failed
        by_id = {s.span_id: s for _, s in spans}
        roots = [s for _, s in spans if not s.parent_span_id]
        assert len(roots) == 1
        assert all(s.parent_span_id in by_id for _, s in spans if s.parent_span_id)
        assert {r["service.name"] for r, _ in spans} == {"svc-a", "svc-b", "svc-c"}
        # headers go as gRPC metadata, lower-cased
        assert {md.get("authorization") for md in receiver.metadata} == {"Bearer grpc-token"}


async def test_grpc_transport_retries_what_otlp_says_to_and_gives_up_on_the_rest() -> None:
    request = metrics_request(
        MetricTotals.from_series(
            [CounterDelta(name=REQUESTS_TOTAL, labels={"reporter": "source"}, value=1)]
        ),
        1,
        2,
    )
    for code, outcome in [
        (grpc.StatusCode.UNAVAILABLE, Outcome.RETRY),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Outcome.RETRY),
        (grpc.StatusCode.INVALID_ARGUMENT, Outcome.REJECTED),
        (grpc.StatusCode.UNAUTHENTICATED, Outcome.REJECTED),
    ]:
        with GrpcReceiver(abort_with=code).serving() as receiver:
            transport = GrpcTransport(f"http://127.0.0.1:{receiver.port}", (), timeout_s=5)
            result = await transport.send("metrics", request)
            await transport.close()
        assert (result.outcome, result.detail) == (outcome, code.name)
    with GrpcReceiver().serving() as receiver:
        port = receiver.port
    transport = GrpcTransport(f"http://127.0.0.1:{port}", (), timeout_s=2)
    result = await transport.send("traces", ExportTraceServiceRequest())
    await transport.close()
    assert result.outcome is Outcome.RETRY  # nobody listening: the collector is down


async def test_http_json_bodies_are_what_a_collector_reads_and_statuses_map_to_retries() -> None:
    span = Span(
        trace_id="0af7651916cd43dd8448eb211c80319c", span_id="b7ad6b7169203331",
        parent_span_id="", name="reviews:9080/*", kind="server", service="reviews",
        namespace="default", instance="reviews-v2-h-1-ab", start_ns=1_000, end_ns=2_000,
        status_code=200,
    )  # fmt: skip
    async with HttpReceiver(statuses=(503, 400)).serving() as receiver:
        transport = HttpTransport(f"http://127.0.0.1:{receiver.port}", (), json_encoding=True)
        try:
            results = [await transport.send("traces", export_request([span])) for _ in range(3)]
            metrics = metrics_request(
                MetricTotals.from_series(
                    [CounterDelta(name=REQUESTS_TOTAL, labels={"reporter": "source"}, value=4)]
                ),
                1,
                2,
            )
            assert (await transport.send("metrics", metrics)).outcome is Outcome.OK
        finally:
            await transport.close()
    assert [(r.outcome, r.detail) for r in results] == [
        (Outcome.RETRY, "HTTP 503"), (Outcome.REJECTED, "HTTP 400"), (Outcome.OK, ""),
    ]  # fmt: skip
    assert receiver.content_types == {"application/json"}
    traces, metrics_doc = receiver.json_bodies
    [out] = traces["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert (out["traceId"], out["spanId"]) == (
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
    )
    [metric] = metrics_doc["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]
    assert metric["name"] == REQUESTS_TOTAL and metric["sum"]["dataPoints"][0]["asDouble"] == 4
