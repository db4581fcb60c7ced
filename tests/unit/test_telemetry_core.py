"""Telemetry without sockets: the recorder's aggregation and batches, histogram math,
Prometheus exposition, the exactly-once ledger, trace context and sampling, views."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh import telemetry as wire
from mesh.errors import BadRequest
from mesh.hosts import ServiceRef
from mesh.messages import Endpoint
from mesh.telemetry import (
    DURATION_BUCKETS_MS,
    CounterDelta,
    HistogramDelta,
    MetricBatch,
    MetricTotals,
    Span,
    bucket_index,
    histogram_quantile,
)
from meshctl import telemetry_cmds
from meshctl.common import CLIError
from proxy.forward import Outcome
from proxy.http import BodyStream, Request
from proxy.telemetry import (
    RequestRecord,
    Sampler,
    SidecarTelemetry,
    TcpRecord,
    TelemetryRecorder,
    TracePropagator,
    Workload,
    decode_peer_metadata,
    encode_peer_metadata,
    extract_trace,
    finish_span,
    own_workload,
    parse_b3_single,
    parse_traceparent,
    replace_trace_headers,
    split_service_host,
    start_span,
    trace_headers,
    workload_name,
)
from services.telemetry.ledger import (
    MeshMirror,
    ReporterState,
    add_applied,
    apply_batches,
    archive_key,
    fold,
    fresh_state,
    is_applied,
    prune_tombstones,
    reporter_key,
)
from services.telemetry.settings import TelemetrySettings
from services.telemetry.views import GraphWindow, TraceIndex, assemble, edge_snapshot
from services.telemetry.watch import BucketUpdate, bucket_update

PRODUCTPAGE = Workload(
    "productpage-v1",
    "default",
    "spiffe://cluster.local/ns/default/sa/productpage",
    "productpage",
    "v1",
)
REVIEWS = Workload(
    "reviews-v2", "default", "spiffe://cluster.local/ns/default/sa/reviews", "reviews", "v2"
)
REVIEWS_HOST = "reviews.default.svc.cluster.local"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def request(
    status: int = 200, duration: float = 3.0, reporter: str = "source", **kw: object
) -> RequestRecord:
    fields: dict[str, object] = {
        "reporter": reporter, "source": PRODUCTPAGE, "destination": REVIEWS, "destination_service": REVIEWS_HOST,
        "method": "GET", "authority": "reviews:9080", "path": "/reviews/1", "status": status,
        "duration_ms": duration, "request_bytes": 0, "response_bytes": 120,
    }  # fmt: skip
    fields.update(kw)
    return RequestRecord(**fields)  # type: ignore[arg-type]


def recorder(**kw: object) -> TelemetryRecorder:
    clock = iter(range(10**9, 10**12, 10**6))
    args: dict[str, object] = {
        "reporter_id": "productpage-v1-0_0000abcd", "namespace": "default", "service": "productpage",
        "instance": "productpage-v1-0", "clock_ns": lambda: next(clock),
    }  # fmt: skip
    args.update(kw)
    return TelemetryRecorder(**args)  # type: ignore[arg-type]


def decode_batch(payload: bytes) -> wire.TelemetryMessage:
    return wire.decode(payload)


# ---------------------------------------------------------------- histogram math


@pytest.mark.parametrize(
    ("value", "index"),
    [(0.0, 0), (0.5, 0), (0.51, 1), (1.0, 1), (4.9, 2), (5.0, 2), (3_600_000, 18), (3_600_001, 19)],
)
def test_bucket_index_is_prometheus_le(value: float, index: int) -> None:
    assert bucket_index(DURATION_BUCKETS_MS, value) == index


@pytest.mark.parametrize(
    ("q", "counts", "expected"),
    [
        (0.5, [0, 10, 0], 1.5),  # all in (1, 2]: median interpolates to the middle
        (0.5, [10, 0, 0], 0.5),  # first bucket interpolates from 0
        (0.99, [0, 0, 10], 2.0),  # +Inf bucket: highest finite bound
        (0.5, [5, 5, 0], 1.0),
        (0.9, [5, 5, 0], 1.8),
    ],
)
def test_histogram_quantile(q: float, counts: list[int], expected: float) -> None:
    assert histogram_quantile(q, [1.0, 2.0], counts) == pytest.approx(expected)


def test_histogram_quantile_without_observations() -> None:
    assert histogram_quantile(0.5, [1.0], [0, 0]) is None


def test_metric_totals_merge_subtract_and_round_trip() -> None:
    t = MetricTotals()
    t.add(CounterDelta(name="c_total", labels={"a": "1"}, value=2))
    t.add(
        HistogramDelta(name="h", labels={"a": "1"}, bounds=[1.0], counts=[1, 2], sum=5.0, count=3)
    )
    again = MetricTotals.from_series(t.to_series())
    assert again.counters == t.counters
    assert again.histograms[("h", (("a", "1"),))].counts == [1, 2]
    t.merge(again)
    t.merge(again, -1)
    assert t.counters[("c_total", (("a", "1"),))] == 2
    # mismatched bounds or bucket count are refused, not mis-added
    assert not t.add(
        HistogramDelta(name="h", labels={"a": "1"}, bounds=[2.0], counts=[1, 0], sum=1, count=1)
    )
    assert not t.add(
        HistogramDelta(name="h", labels={"a": "1"}, bounds=[1.0], counts=[1], sum=1, count=1)
    )
    assert t.rejected == 2


# ---------------------------------------------------------------- recorder: aggregation and batches


def test_requests_aggregate_into_istio_series() -> None:
    rec = recorder()
    for d in (0.3, 0.5, 0.7, 3.0, 10_000_000.0):
        rec.record_request(request(duration=d))
    rec.record_request(request(status=503, flags="UH"))
    totals = rec.totals()
    ok_labels = dict(
        next(lbl for (n, lbl) in totals.counters if dict(lbl)["response_code"] == "200")
    )
    assert ok_labels == {
        "reporter": "source",
        "source_workload": "productpage-v1",
        "source_workload_namespace": "default",
        "source_principal": "spiffe://cluster.local/ns/default/sa/productpage",
        "source_app": "productpage",
        "source_version": "v1",
        "source_cluster": "Kubernetes",
        "destination_cluster": "Kubernetes",
        "destination_workload": "reviews-v2",
        "destination_workload_namespace": "default",
        "destination_principal": "spiffe://cluster.local/ns/default/sa/reviews",
        "destination_service": REVIEWS_HOST,
        "destination_service_name": "reviews",
        "destination_service_namespace": "default",
        "destination_app": "reviews",
        "destination_version": "v2",
        "request_protocol": "http",
        "response_code": "200",
        "response_flags": "-",
        "connection_security_policy": "unknown",
    }
    assert set(ok_labels) == set(wire.HTTP_LABELS)
    key = wire.series_key(wire.REQUESTS_TOTAL, ok_labels)
    assert totals.counters[key] == 5
    hist = totals.histograms[wire.series_key(wire.REQUEST_DURATION_MS, ok_labels)]
    assert hist.counts[:3] == [2, 1, 1] and hist.counts[-1] == 1 and hist.count == 5
    assert hist.sum == pytest.approx(0.3 + 0.5 + 0.7 + 3.0 + 10_000_000.0)
    resp = totals.histograms[wire.series_key(wire.RESPONSE_BYTES, ok_labels)]
    assert resp.counts[bucket_index(wire.BYTES_BUCKETS, 120)] == 5 and resp.sum == 600


def test_deltas_cover_each_request_once() -> None:
    rec = recorder()
    for _ in range(3):
        rec.record_request(request())
    first = rec.metric_deltas()
    assert [d.value for d in first if isinstance(d, CounterDelta)] == [3]
    rec.record_request(request())
    rec.record_request(request(duration=700.0))
    second = rec.metric_deltas()
    counter = next(d for d in second if isinstance(d, CounterDelta))
    hist = next(
        d for d in second if isinstance(d, HistogramDelta) and d.name == wire.REQUEST_DURATION_MS
    )
    assert counter.value == 2
    assert (
        hist.count == 2
        and sum(hist.counts) == 2
        and hist.counts[bucket_index(DURATION_BUCKETS_MS, 700)] == 1
    )
    assert rec.metric_deltas() == []
    # cumulative view is unaffected by flushing
    assert sum(rec.totals().counters.values()) == 5


def test_pending_batch_is_resent_unchanged_until_acknowledged() -> None:
    rec = recorder()
    rec.record_request(request())
    first = next(o for o in rec.outgoing() if o.kind == "metrics")
    rec.record_request(request())  # arrives while the batch is in flight
    again = next(o for o in rec.outgoing() if o.kind == "metrics")
    assert again == first  # same msg id, same bytes: the stream deduplicates a re-send
    batch = decode_batch(first.payload)
    assert isinstance(batch, MetricBatch) and batch.seq == 1 and first.records == 1
    assert first.msg_id == f"metrics:{rec.reporter_id}:1"
    rec.acknowledge("metrics")
    nxt = next(o for o in rec.outgoing() if o.kind == "metrics")
    batch2 = decode_batch(nxt.payload)
    assert isinstance(batch2, MetricBatch) and batch2.seq == 2 and nxt.records == 1
    assert batch2.window_start_ns == batch.window_end_ns
    rec.acknowledge("metrics")
    assert [o for o in rec.outgoing() if o.kind == "metrics"] == []
    assert rec.published["metrics"] == 2


def test_access_records_and_spans_are_batched_and_bounded() -> None:
    rec = recorder(max_buffered=5, max_batch_records=3)
    for i in range(8):
        rec.record_request(request(request_id=f"r{i}", trace_id=TRACE))
    assert rec.dropped["access"] == 3
    out = {o.kind: o for o in rec.outgoing()}
    access = decode_batch(out["access"].payload)
    assert isinstance(access, wire.AccessBatch)
    assert [r.request_id for r in access.records] == ["r0", "r1", "r2"]
    r0 = access.records[0]
    assert (r0.status, r0.source_workload, r0.destination_service, r0.trace_id) == (200, "productpage-v1",
                                                                                   REVIEWS_HOST, TRACE)  # fmt: skip
    rec.acknowledge("access")
    out = {o.kind: o for o in rec.outgoing()}
    access2 = decode_batch(out["access"].payload)
    assert isinstance(access2, wire.AccessBatch) and [r.request_id for r in access2.records] == [
        "r3",
        "r4",
    ]
    # the metrics counted all 8 requests: only the access log dropped
    assert sum(rec.totals().counters.values()) == 8
    span = Span(trace_id=TRACE, span_id=PARENT, name="x", kind="client", service="s", namespace="n", instance="i",
                start_ns=1, end_ns=2)  # fmt: skip
    for _ in range(7):
        rec.record_span(span)
    assert rec.dropped["spans"] == 2


def test_recorded_requests_reach_every_reader_and_stay_bounded() -> None:
    rec = recorder(max_pending=10)
    for _ in range(25):
        rec.record_request(request())
    assert len(rec._requests) < 10  # folded as they accumulate, not only when read
    assert sum(rec.totals().counters.values()) == 25  # a reader folds what is pending
    rec.record_request(request())
    assert [d.value for d in rec.metric_deltas() if isinstance(d, CounterDelta)] == [26]
    rec.record_request(request(request_id="last"))
    out = {o.kind: o for o in rec.outgoing()}
    assert out["metrics"].records == 1 and out["access"].records == 27


def test_access_records_carry_every_field_and_leave_defaults_out() -> None:
    rec = recorder()
    rec.record_request(
        request(status=503, duration=2.34567, flags="UF", upstream_host="10.0.0.1:80",
                request_id="rid", trace_id=TRACE, request_bytes=7, start_ns=1234,
                security_policy="mutual_tls", reporter="destination")
    )  # fmt: skip
    rec.record_request(
        request(reporter="source", source=Workload(), destination=Workload(), response_bytes=0,
                destination_service="", start_ns=99)
    )  # fmt: skip
    payload = next(o for o in rec.outgoing() if o.kind == "access").payload
    full, bare = msgspec.msgpack.decode(payload)["records"]
    assert full == {
        "type": "AccessRecord", "time_ns": 1234, "reporter": "destination", "method": "GET",
        "authority": "reviews:9080", "path": "/reviews/1", "status": 503, "duration_ms": 2.346,
        "response_flags": "UF", "bytes_received": 7, "bytes_sent": 120,
        "upstream_host": "10.0.0.1:80", "source_principal": PRODUCTPAGE.principal,
        "destination_principal": REVIEWS.principal, "source_workload": "productpage-v1",
        "source_namespace": "default", "destination_workload": "reviews-v2",
        "destination_namespace": "default", "destination_service": REVIEWS_HOST,
        "request_id": "rid", "trace_id": TRACE,
    }  # fmt: skip
    assert bare == {
        "type": "AccessRecord", "time_ns": 99, "reporter": "source", "method": "GET",
        "authority": "reviews:9080", "path": "/reviews/1", "status": 200, "duration_ms": 3.0,
    }  # fmt: skip


def test_large_deltas_are_split_across_batches() -> None:
    rec = recorder(max_batch_series=8)
    for code in range(200, 205):
        rec.record_request(request(status=code))
    seen: list[int] = []
    while out := [o for o in rec.outgoing() if o.kind == "metrics"]:
        batch = decode_batch(out[0].payload)
        assert isinstance(batch, MetricBatch) and len(batch.series) <= 8
        seen.append(out[0].records)
        rec.acknowledge("metrics")
    assert seen == [2, 2, 1]  # 4 series per label set; every request exactly once


def test_series_cardinality_is_bounded() -> None:
    rec = recorder(max_series=2)
    for code in (200, 201, 202, 203):
        rec.record_request(request(status=code))
    assert len(rec.totals().counters) == 2 and rec.dropped["series"] == 2


def test_tcp_counters() -> None:
    rec = recorder()
    conn = TcpRecord("source", PRODUCTPAGE, REVIEWS, REVIEWS_HOST, "mutual_tls")
    rec.record_tcp_opened(conn)
    rec.record_tcp_bytes(conn, 100, 40)
    rec.record_tcp_closed(conn, 5, 1)
    values = {d.name: d.value for d in rec.metric_deltas() if isinstance(d, CounterDelta)}
    assert values == {
        wire.TCP_OPENED: 1,
        wire.TCP_CLOSED: 1,
        wire.TCP_SENT_BYTES: 105,
        wire.TCP_RECEIVED_BYTES: 41,
    }
    labels = next(iter(rec.totals().counters))[1]
    assert dict(labels)["request_protocol"] == "tcp" and "response_code" not in dict(labels)


def test_exposition_parses_with_prometheus_parser() -> None:
    rec = recorder()
    rec.record_request(request(duration=3.0))
    rec.record_request(request(duration=30.0, reporter="destination", security_policy="mutual_tls"))
    registry = CollectorRegistry()
    registry.register(rec)
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["istio_requests"]
    assert requests.type == "counter"
    by_reporter = {
        s.labels["reporter"]: s for s in requests.samples if s.name == "istio_requests_total"
    }
    assert by_reporter["destination"].labels["connection_security_policy"] == "mutual_tls"
    assert by_reporter["source"].value == 1
    duration = families["istio_request_duration_milliseconds"]
    assert duration.type == "histogram"
    buckets = {
        s.labels["le"]: s.value
        for s in duration.samples
        if s.name.endswith("_bucket") and s.labels["reporter"] == "destination"
    }
    assert buckets["10.0"] == 0 and buckets["50.0"] == 1 and buckets["+Inf"] == 1
    assert "meshwork_telemetry_dropped" in families


# ---------------------------------------------------------------- the ledger


@pytest.mark.parametrize(
    ("ranges", "seq", "expected"),
    [
        ([], 1, [(1, 1)]),
        ([(1, 3)], 4, [(1, 4)]),
        ([(1, 3)], 6, [(1, 3), (6, 6)]),
        ([(1, 3), (5, 7)], 4, [(1, 7)]),
        ([(2, 3)], 1, [(1, 3)]),
        ([(5, 6)], 1, [(1, 1), (5, 6)]),
        ([(1, 3)], 2, [(1, 3)]),
    ],
)
def test_applied_ranges(
    ranges: list[tuple[int, int]], seq: int, expected: list[tuple[int, int]]
) -> None:
    merged = add_applied(ranges, seq)
    assert merged == expected
    assert is_applied(merged, seq)


def batch(seq: int, requests: int = 1, reporter: str = "p-1_00000001") -> MetricBatch:
    labels = {"reporter": "source", "response_code": "200"}
    return MetricBatch(
        reporter=reporter, seq=seq, namespace="default", service="productpage",
        window_start_ns=seq, window_end_ns=seq + 1,
        series=[CounterDelta(name=wire.REQUESTS_TOTAL, labels=labels, value=requests)],
    )  # fmt: skip


def total_requests(t: MetricTotals) -> float:
    return sum(v for (name, _), v in t.counters.items() if name == wire.REQUESTS_TOTAL)


def test_apply_batches_counts_each_batch_once() -> None:
    base = fresh_state("p-1_00000001", "default", "productpage", [])
    first = apply_batches(base, [batch(1, 3), batch(2, 4), batch(2, 4)], now_ns=10)
    assert first.state is not None and first.applied == [1, 2] and first.duplicates == [2]
    assert total_requests(first.state.totals) == 7 and first.requests == 7
    assert total_requests(base.totals) == 0  # the base is never modified
    redelivered = apply_batches(first.state, [batch(1, 3), batch(2, 4)], now_ns=11)
    assert redelivered.state is None and redelivered.duplicates == [1, 2]
    out_of_order = apply_batches(first.state, [batch(4, 1), batch(3, 1)], now_ns=12)
    assert out_of_order.state is not None and out_of_order.state.applied == [(1, 4)]
    # the stored form round-trips
    again = ReporterState.decode(out_of_order.state.encode())
    assert again.applied == [(1, 4)] and total_requests(again.totals) == 9


def test_mirror_is_exact_through_updates_and_retirement() -> None:
    mirror = MeshMirror()
    a = apply_batches(
        fresh_state("p-1_00000001", "default", "productpage", []), [batch(1, 5)], 1
    ).state
    b = apply_batches(
        fresh_state("p-2_00000002", "default", "productpage", []), [batch(1, 7, "p-2_00000002")], 1
    )
    assert a is not None and b.state is not None
    ka, kb, karch = (
        reporter_key(a.reporter),
        reporter_key(b.state.reporter),
        archive_key("default", "productpage"),
    )
    mirror.apply(ka, 1, a.encode())
    mirror.apply(kb, 2, b.state.encode())
    assert total_requests(mirror.total) == 12
    a2 = apply_batches(a, [batch(2, 1)], 2).state
    assert a2 is not None
    mirror.apply(ka, 3, a2.encode())
    assert total_requests(mirror.total) == 13
    # retire a: flag (rev 4), fold into the archive (rev 5), delete (rev 6)
    flagged = ReporterState.decode(a2.encode())
    flagged.retired = True
    mirror.apply(ka, 4, flagged.encode())
    assert total_requests(mirror.total) == 13
    archive = fold(None, flagged, 4, now_ns=100)
    assert archive is not None and fold(archive, flagged, 4, now_ns=101) is None  # idempotent
    mirror.apply(karch, 5, archive.encode())
    assert total_requests(mirror.total) == 13
    mirror.apply(ka, 6, None)
    assert total_requests(mirror.total) == 13 and mirror.counted_reporters() == 1
    # the reporter comes back: its tombstone floor keeps old batches out
    floor = archive.retired[a.reporter].high_seq
    assert floor == 2
    revived = apply_batches(
        fresh_state(a.reporter, "default", "productpage", [(1, floor)]), [batch(2), batch(3, 2)], 7
    )
    assert revived.applied == [3] and revived.duplicates == [2] and revived.state is not None
    mirror.apply(ka, 7, revived.state.encode())
    assert total_requests(mirror.total) == 15
    # tombstones of live reporters stay; old ones of gone reporters go
    assert prune_tombstones(archive, {a.reporter}, before_ns=10**12) is None
    pruned = prune_tombstones(archive, set(), before_ns=10**12)
    assert pruned is not None and pruned.retired == {}


def test_mirror_ignores_stale_updates() -> None:
    mirror = MeshMirror()
    s1 = apply_batches(
        fresh_state("p-1_00000001", "default", "productpage", []), [batch(1, 5)], 1
    ).state
    assert s1 is not None
    s2 = apply_batches(s1, [batch(2, 5)], 2).state
    assert s2 is not None
    mirror.apply("r.p-1_00000001", 9, s2.encode())
    mirror.apply("r.p-1_00000001", 8, s1.encode())
    assert total_requests(mirror.total) == 10


@pytest.mark.parametrize(
    ("subject", "headers", "expected"),
    [
        ("$KV.B.r.p-1_00000001", None, BucketUpdate("r.p-1_00000001", 42, b"state")),
        ("$KV.B.a.default.reviews", {"KV-Operation": "DEL"}, BucketUpdate("a.default.reviews", 42, None)),
        ("$KV.B.r.x", {"KV-Operation": "PURGE"}, BucketUpdate("r.x", 42, None)),
        ("$KV.B.r.x", {"Nats-Marker-Reason": "MaxAge"}, BucketUpdate("r.x", 42, None)),
        ("$KV.B.r.x", {"Nats-Marker-Reason": "SomethingNew"}, None),  # not understood: skipped
        ("$KV.OTHER.r.x", None, None),
    ],
)  # fmt: skip
def test_bucket_updates_from_stream_messages(
    subject: str, headers: dict[str, str] | None, expected: BucketUpdate | None
) -> None:
    # the ack subject carries the stream sequence, i.e. the KV revision (42)
    reply = "$JS.ACK.KV_B.consumer.1.42.7.1700000000000000000.0"
    msg = Msg(None, subject=subject, reply=reply, data=b"state", headers=headers)  # type: ignore[arg-type]
    assert bucket_update(msg, "$KV.B.") == expected


# ---------------------------------------------------------------- trace context


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{TRACE}-{PARENT}-01", (TRACE, PARENT, True)),
        (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, False)),
        (
            f"01-{TRACE}-{PARENT}-03-future",
            (TRACE, PARENT, True),
        ),  # later versions: read what we know
        (f"00-{TRACE}-{PARENT}-01-extra", None),  # version 00 is exactly 55 characters
        (f"ff-{TRACE}-{PARENT}-01", None),
        (f"00-{'0' * 32}-{PARENT}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE.upper()}-{PARENT}-01", None),
        ("garbage", None),
    ],
)
def test_parse_traceparent(header: str, expected: tuple[str, str, bool] | None) -> None:
    assert parse_traceparent(header) == expected


def test_b3_multi_header_with_64_bit_id() -> None:
    got = extract_trace(
        [("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", PARENT), ("x-b3-sampled", "1")]
    )
    assert (
        got.trace_id == "0" * 16 + "a3ce929d0e0e4736"
        and got.span_id == PARENT
        and got.sampled is True
    )


@pytest.mark.parametrize(
    ("value", "trace_id", "span_id", "sampled"),
    [
        (f"{TRACE}-{PARENT}-1", TRACE, PARENT, True),
        (f"{TRACE}-{PARENT}-d-e457b5a2e4d86bd1", TRACE, PARENT, True),
        (f"{TRACE}-{PARENT}", TRACE, PARENT, None),
        (f"{TRACE}-{PARENT}-0", TRACE, PARENT, False),
        ("0", "", "", False),
    ],
)
def test_b3_single_header(value: str, trace_id: str, span_id: str, sampled: bool | None) -> None:
    got = parse_b3_single(value)
    assert got is not None and (got.trace_id, got.span_id, got.sampled) == (
        trace_id,
        span_id,
        sampled,
    )


def test_w3c_wins_over_b3_and_tracestate_follows_it() -> None:
    got = extract_trace(
        [
            ("traceparent", f"00-{TRACE}-{PARENT}-01"),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("x-b3-traceid", "1" * 32),
            ("x-b3-spanid", "2" * 16),
        ]
    )
    assert (got.trace_id, got.span_id, got.tracestate) == (TRACE, PARENT, "congo=t61rcWkgMzE")
    # an invalid traceparent falls back to B3, and its tracestate is discarded
    got = extract_trace(
        [
            ("traceparent", "bogus"),
            ("tracestate", "x=y"),
            ("x-b3-traceid", "1" * 32),
            ("x-b3-spanid", "2" * 16),
        ]
    )
    assert (got.trace_id, got.tracestate) == ("1" * 32, "")


def span_args() -> dict[str, Any]:
    return {
        "name": "reviews:9080/*",
        "service": "productpage",
        "namespace": "default",
        "instance": "pp-0",
    }


def test_start_span_continues_incoming_trace_and_forwards_both_formats() -> None:
    incoming = [
        ("traceparent", f"00-{TRACE}-{PARENT}-01"),
        ("tracestate", "a=b"),
        ("b3", f"{TRACE}-{PARENT}-1"),
    ]
    ctx, fwd = start_span(
        incoming, "client", sampler=Sampler(0.0), rng=random.Random(1), **span_args()
    )
    assert (
        ctx.trace_id == TRACE and ctx.parent_span_id == PARENT and ctx.sampled
    )  # incoming decision wins
    headers = dict(fwd)
    assert headers["traceparent"] == f"00-{TRACE}-{ctx.span_id}-01"
    assert headers["tracestate"] == "a=b"
    assert (headers["x-b3-traceid"], headers["x-b3-spanid"]) == (TRACE, ctx.span_id)
    assert headers["x-b3-parentspanid"] == PARENT and headers["x-b3-sampled"] == "1"
    assert headers["b3"] == f"{TRACE}-{ctx.span_id}-1-{PARENT}"
    out = replace_trace_headers(
        [("host", "reviews"), ("Traceparent", "old"), ("x-b3-flags", "1")], fwd
    )
    assert [n for n, _ in out].count("traceparent") == 1 and ("Traceparent", "old") not in out
    assert ("host", "reviews") in out and all(n != "x-b3-flags" for n, _ in out)


def test_start_span_honours_unsampled_and_starts_new_roots() -> None:
    ctx, fwd = start_span(
        [("traceparent", f"00-{TRACE}-{PARENT}-00")], "server", sampler=Sampler(1.0), **span_args()
    )
    assert not ctx.sampled and dict(fwd)["x-b3-sampled"] == "0"
    assert finish_span(ctx, status_code=200) is None
    root, fwd = start_span([], "client", sampler=Sampler(1.0), **span_args())
    assert root.sampled and root.parent_span_id == "" and "x-b3-parentspanid" not in dict(fwd)
    assert "b3" not in dict(fwd)
    span = finish_span(root, status_code=503, end_ns=root.start_ns + 2_000_000)
    assert (
        span is not None and span.error and span.kind == "client" and span.trace_id == root.trace_id
    )


def propagator(rate: float) -> TracePropagator:
    args = span_args()
    return TracePropagator(
        service=args["service"], namespace=args["namespace"], instance=args["instance"],
        sampler=Sampler(rate), rng=random.Random(3),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("found", "b3", "forwarded"),
    [
        # the caller decided "not sampled": its context goes on as it came, no span
        ({"traceparent": f"00-{TRACE}-{PARENT}-00"}, False, [("traceparent", f"00-{TRACE}-{PARENT}-00")]),
        ({"traceparent": f"00-{TRACE}-{PARENT}-00"}, True, [
            ("traceparent", f"00-{TRACE}-{PARENT}-00"), ("x-b3-traceid", TRACE),
            ("x-b3-spanid", PARENT), ("x-b3-sampled", "0"),
        ]),
        # a later version is passed on as version 00
        ({"traceparent": f"01-{TRACE}-{PARENT}-00-future"}, False, [("traceparent", f"00-{TRACE}-{PARENT}-00")]),
        # B3 in (multi and single header), tracestate: the general path, same rule
        ({"x-b3-traceid": TRACE, "x-b3-spanid": PARENT, "x-b3-sampled": "0"}, False,
         [("traceparent", f"00-{TRACE}-{PARENT}-00")]),
        ({"b3": f"{TRACE}-{PARENT}-0"}, True, [
            ("traceparent", f"00-{TRACE}-{PARENT}-00"), ("x-b3-traceid", TRACE),
            ("x-b3-spanid", PARENT), ("x-b3-sampled", "0"), ("b3", f"{TRACE}-{PARENT}-0"),
        ]),
        ({"traceparent": f"00-{TRACE}-{PARENT}-00", "tracestate": "a=b"}, False,
         [("traceparent", f"00-{TRACE}-{PARENT}-00"), ("tracestate", "a=b")]),
    ],
)  # fmt: skip
def test_an_unsampled_request_opens_no_span_and_passes_its_context_on(
    found: dict[str, str], b3: bool, forwarded: list[tuple[str, str]]
) -> None:
    ctx, fwd = propagator(1.0).step(found, "server", b3=b3)  # the caller's decision wins
    assert (ctx.trace_id, ctx.span_id, ctx.sampled, ctx.start_ns) == (TRACE, PARENT, False, 0)
    assert fwd == forwarded
    assert finish_span(ctx, status_code=200) is None


def test_a_new_unsampled_root_still_propagates_its_decision() -> None:
    tracer = propagator(0.0)
    ctx, fwd = tracer.step(None, "client", b3=True)
    assert not ctx.sampled and ctx.parent_span_id == "" and ctx.start_ns == 0
    assert parse_traceparent(dict(fwd)["traceparent"]) == (ctx.trace_id, ctx.span_id, False)
    assert fwd == trace_headers(ctx)  # what the general path would send for it
    # the next hop follows: still not sampled, same trace, nothing drawn or recorded
    nxt, _ = propagator(1.0).step({"traceparent": dict(fwd)["traceparent"]}, "server")
    assert (nxt.trace_id, nxt.sampled) == (ctx.trace_id, False)
    ids = {tracer.step(None, "client")[0].trace_id for _ in range(100)}
    assert len(ids) == 100


def test_sampled_requests_open_spans_on_every_path() -> None:
    tracer = propagator(1.0)
    root, fwd = tracer.step(None, "client", b3=False, now_ns=5)
    assert root.sampled and root.parent_span_id == "" and root.start_ns == 5
    assert fwd == [("traceparent", f"00-{root.trace_id}-{root.span_id}-01")]
    child, fwd = tracer.step({"traceparent": fwd[0][1]}, "server")
    assert (child.trace_id, child.parent_span_id, child.sampled) == (
        root.trace_id, root.span_id, True,
    )  # fmt: skip
    assert child.span_id != root.span_id and child.service == "productpage"
    assert dict(fwd)["x-b3-parentspanid"] == root.span_id
    # a sampled B3 caller takes the general path: same result
    b3_child, _ = tracer.step({"b3": f"{TRACE}-{PARENT}-1"}, "server")
    assert (b3_child.trace_id, b3_child.parent_span_id, b3_child.sampled) == (TRACE, PARENT, True)


def test_sampler_rate() -> None:
    rng = random.Random(7)
    ids = [f"{rng.getrandbits(128):032x}" for _ in range(20_000)]
    assert not any(Sampler(0.0).decide(t) for t in ids)
    assert all(Sampler(1.0).decide(t) for t in ids)
    share = sum(Sampler(0.01).decide(t) for t in ids) / len(ids)
    assert 0.005 < share < 0.015
    with pytest.raises(ValueError):
        Sampler(1.5)


def test_peer_metadata_never_carries_identity() -> None:
    value = encode_peer_metadata(REVIEWS)
    got = decode_peer_metadata(value, principal="spiffe://cluster.local/ns/default/sa/reviews")
    assert got == REVIEWS
    assert decode_peer_metadata(None).name == "unknown"


def test_workload_names() -> None:
    assert workload_name("reviews", "v2") == "reviews-v2" == REVIEWS.name
    assert workload_name("ratings") == "ratings"


def test_service_host_split() -> None:
    assert split_service_host(REVIEWS_HOST) == ("reviews", "default")
    assert split_service_host("api.example.com") == ("api.example.com", "unknown")


def test_reporter_ids() -> None:
    rid = wire.new_reporter_id("reviews-v2.pod..x", 0xABC)
    assert rid == "reviews-v2.pod.x_00000abc" and wire.valid_reporter(rid)
    assert (
        not wire.valid_reporter("a..b")
        and not wire.valid_reporter("a b")
        and not wire.valid_reporter("")
    )


def test_stream_name_and_subject_kind() -> None:
    assert wire.stream_name("mesh") == "MESH_TELEMETRY"
    assert wire.stream_name("t1.x") == "T1_X_TELEMETRY"
    assert wire.subject_kind("mesh.telemetry.spans.default.reviews", "mesh") == "spans"
    assert wire.subject_kind("mesh.config.route.default.reviews", "mesh") is None


# ---------------------------------------------------------------- the data path's glue


class FakeExchange:
    """What `SidecarTelemetry` reads of an Exchange once the response is out."""

    def __init__(self, request_bytes: int = 0, response_bytes: int = 0) -> None:
        self.started_at = 100.0
        self.finished_at: float | None = 100.004
        self.request_bytes = request_bytes
        self.response_bytes = response_bytes


def http_request(headers: list[tuple[str, str]], ssl_object: Any = None) -> Request:
    return Request(
        method="POST", target="/reviews/1", absolute_form=False, scheme="http",
        authority="reviews:9080", path="/reviews/1", headers=headers, http_version="1.1",
        keep_alive=True, upgrade=None, peer=("127.0.0.1", 5000), local=("127.0.0.1", 80),
        ssl_object=ssl_object, content_length=None, chunked=False, body=BodyStream.empty(),
    )  # fmt: skip


def sidecar_telemetry(rate: float = 1.0, **kw: Any) -> SidecarTelemetry:
    return SidecarTelemetry(
        recorder(**kw), workload=PRODUCTPAGE, service_host="productpage.default.svc.cluster.local",
        sampler=Sampler(rate),
    )  # fmt: skip


def test_own_workload_is_named_as_peers_name_it() -> None:
    mine = own_workload(
        service="reviews", namespace="default", version="v2",
        labels={"app": "reviews", "version": "v2"}, identity=REVIEWS.principal,
    )  # fmt: skip
    assert mine == REVIEWS
    endpoint = Endpoint(
        instance="reviews-v2-0", address="10.0.0.1:80", labels={"app": "reviews"},
        identity=REVIEWS.principal, version="v2",
    )  # fmt: skip
    t = sidecar_telemetry()
    seen = t.destination_of(ServiceRef("default", "reviews"), endpoint)
    assert seen == mine
    assert t.destination_of(ServiceRef("default", "reviews"), endpoint) is seen  # memoised
    bare = own_workload(service="gw", namespace="ns", version="", labels={}, identity="")
    assert bare == Workload("gw", "ns", "unknown", "gw", "unknown")


def test_outbound_swaps_trace_and_peer_headers_and_records_the_source_side() -> None:
    t = sidecar_telemetry(rate=1.0)
    incoming = f"00-{TRACE}-{PARENT}-01"
    req = http_request([("host", "reviews:9080"), ("traceparent", incoming)])
    routed = [
        ("host", "reviews:9080"), ("traceparent", incoming), ("x-b3-traceid", "1" * 32),
        ("x-meshwork-peer", "workload=spoofed"), ("x-request-id", "rid-1"),
    ]  # fmt: skip
    outcome = Outcome(0, "DC", "", REVIEWS_HOST, REVIEWS)
    sent = t.client_headers(routed, outcome)
    span = outcome.trace
    assert span is not None and outcome.request_id == "rid-1"
    assert span.trace_id == TRACE and span.parent_span_id == PARENT and span.kind == "client"
    # between sidecars: W3C only, and this proxy's metadata instead of the app's claim
    assert sent == [
        ("host", "reviews:9080"), ("x-request-id", "rid-1"),
        ("traceparent", f"00-{TRACE}-{span.span_id}-01"),
        ("x-meshwork-peer", encode_peer_metadata(PRODUCTPAGE)),
    ]  # fmt: skip
    outcome.status, outcome.flags, outcome.upstream = 200, "", "10.0.0.1:80"
    t.outbound_done(req, FakeExchange(100, 250), outcome)  # type: ignore[arg-type]
    t.recorder.fold()
    (series,) = t.recorder._http.values()
    assert series.requests == 1 and series.request_size.sum == 100
    assert series.labels["reporter"] == "source"
    assert series.labels["destination_workload"] == "reviews-v2"
    assert series.labels["connection_security_policy"] == "unknown"
    (access,) = t.recorder._access
    assert access.duration_ms == pytest.approx(4.0)
    assert (access.upstream_host, access.request_id, access.trace_id) == (
        "10.0.0.1:80", "rid-1", TRACE,
    )  # fmt: skip
    (recorded,) = t.recorder._spans
    assert recorded.name == "reviews:9080/*" and recorded.attributes["request_id"] == "rid-1"


def test_local_reply_is_recorded_with_its_flags_and_trace() -> None:
    t = sidecar_telemetry(rate=0.0)
    req = http_request([("host", "reviews"), ("traceparent", f"00-{TRACE}-{PARENT}-01")])
    t.outbound_done(req, FakeExchange(), Outcome(503, "UH"))  # type: ignore[arg-type]
    t.recorder.fold()
    (series,) = t.recorder._http.values()
    assert series.labels["response_flags"] == "UH"
    assert series.labels["destination_workload"] == "unknown"
    (access,) = t.recorder._access
    assert access.trace_id == TRACE and access.request_id  # one made up for the log
    (span,) = t.recorder._spans  # the incoming decision: sampled
    assert span.parent_span_id == PARENT and span.status_code == 503 and span.error
    unsampled = sidecar_telemetry(rate=0.0)
    unsampled.outbound_done(http_request([]), FakeExchange(), Outcome(404, "NR"))  # type: ignore[arg-type]
    unsampled.recorder.fold()
    assert not unsampled.recorder._spans and len(unsampled.recorder._access) == 1


async def test_inbound_wrapper_records_the_destination_side() -> None:
    t = sidecar_telemetry(rate=0.0)
    seen_by_app: list[list[tuple[str, str]]] = []

    async def app(req: Request, ex: Any) -> Outcome:
        seen_by_app.append(req.headers)
        if req.path == "/fail":
            raise ConnectionResetError("client left")
        return Outcome(200, "", "127.0.0.1:9080")

    handle = t.inbound(app)
    metadata = encode_peer_metadata(REVIEWS)
    req = http_request([("x-meshwork-peer", metadata), ("traceparent", f"00-{TRACE}-{PARENT}-01")])
    assert (await handle(req, FakeExchange(0, 10))).status == 200  # type: ignore[arg-type]
    headers = dict(seen_by_app[0])
    assert "x-meshwork-peer" not in headers and headers["traceparent"].startswith(f"00-{TRACE}-")
    assert headers["x-b3-traceid"] == TRACE and headers["x-b3-sampled"] == "1"  # apps get both
    t.recorder.fold()
    (series,) = t.recorder._http.values()
    labels = series.labels
    assert labels["reporter"] == "destination" and labels["source_workload"] == "reviews-v2"
    # plaintext: no certificate, so no principal and no namespace, whatever the header says
    assert labels["source_principal"] == "unknown" and labels["source_workload_namespace"] == (
        "unknown"
    )
    assert labels["connection_security_policy"] == "none"
    assert labels["destination_workload"] == "productpage-v1"
    (span,) = t.recorder._spans  # sampled upstream: the incoming decision wins
    assert span.kind == "server" and span.parent_span_id == PARENT
    failing = http_request([])
    failing.path = "/fail"
    with pytest.raises(ConnectionResetError):
        await handle(failing, FakeExchange())  # type: ignore[arg-type]
    t.recorder.fold()
    dc = [s for s in t.recorder._http.values() if s.labels["response_flags"] == "DC"]
    assert len(dc) == 1 and dc[0].labels["response_code"] == "0"


async def test_an_unsampled_request_keeps_its_trace_context_from_app_to_app() -> None:
    client, server = sidecar_telemetry(rate=1.0), sidecar_telemetry(rate=1.0)
    unsampled = f"00-{TRACE}-{PARENT}-00"
    outcome = Outcome(0, "DC", "", REVIEWS_HOST, REVIEWS)
    sent = client.client_headers([("host", "reviews"), ("traceparent", unsampled)], outcome)
    assert ("traceparent", unsampled) in sent and outcome.trace is not None
    seen_by_app: list[list[tuple[str, str]]] = []

    async def app(req: Request, ex: Any) -> Outcome:
        seen_by_app.append(req.headers)
        return Outcome(200)

    await server.inbound(app)(http_request(sent), FakeExchange())  # type: ignore[arg-type]
    headers = dict(seen_by_app[0])
    assert headers["traceparent"] == unsampled
    assert (headers["x-b3-traceid"], headers["x-b3-spanid"], headers["x-b3-sampled"]) == (
        TRACE, PARENT, "0",
    )  # fmt: skip
    client.outbound_done(http_request([]), FakeExchange(), outcome)  # type: ignore[arg-type]
    for t in (client, server):
        t.recorder.fold()
        assert not t.recorder._spans and [a.trace_id for a in t.recorder._access] == [TRACE]


def test_tcp_records() -> None:
    t = sidecar_telemetry()
    inbound = t.tcp_inbound(None)
    assert inbound.reporter == "destination" and inbound.security_policy == "none"
    assert inbound.destination == PRODUCTPAGE and inbound.source.name == "unknown"
    failed = t.tcp_outbound(ServiceRef("default", "reviews"), None, "UF")
    assert failed.destination_service == REVIEWS_HOST and failed.flags == "UF"
    t.recorder.record_tcp_opened(failed)
    t.recorder.record_tcp_closed(failed, sent=10, received=20)
    totals = t.recorder.totals().counters
    assert sum(v for (name, _), v in totals.items() if name == wire.TCP_SENT_BYTES) == 10


# ---------------------------------------------------------------- views


def test_graph_window_rates_and_percentiles() -> None:
    window = GraphWindow(max_window_s=60)
    totals = MetricTotals()
    rec = recorder()
    window.sample(0.0, edge_snapshot(totals))
    for i in range(100):
        rec.record_request(
            request(duration=3.0 if i < 90 else 800.0, status=200 if i < 98 else 503)
        )
        rec.record_request(request(reporter="destination", duration=2.0))
    totals.add_all(rec.metric_deltas())
    window.sample(10.0, edge_snapshot(totals))
    graph = window.graph(60)
    assert len(graph["edges"]) == 1  # both reporters, one edge: the client's view
    edge = graph["edges"][0]
    assert edge["reporter"] == "source" and edge["requests"] == 100 and edge["rps"] == 10.0
    assert edge["success_rate"] == 0.98 and edge["error_rate"] == 0.02
    assert 1.0 < edge["p50_ms"] <= 5.0 and 500 < edge["p99_ms"] <= 1000
    assert {n["id"] for n in graph["nodes"]} == {"productpage-v1.default", "reviews-v2.default"}
    # an idle window shows no edges
    window.sample(20.0, edge_snapshot(totals))
    assert window.edges(5) == []


def test_graph_edges_count_grpc_requests_by_status_name() -> None:
    window = GraphWindow(max_window_s=60)
    totals = MetricTotals()
    rec = recorder()
    # before the window: only the increase over the window is shown
    rec.record_request(request(protocol="grpc", grpc_status="14"))
    totals.add_all(rec.metric_deltas())
    window.sample(0.0, edge_snapshot(totals))
    for status in ["0"] * 6 + ["14"] * 3 + ["99"]:
        rec.record_request(request(protocol="grpc", grpc_status=status))
    rec.record_request(request(protocol="grpc"))  # no grpc-status at all
    rec.record_request(request(status=503))  # plain HTTP on the same edge
    totals.add_all(rec.metric_deltas())
    window.sample(10.0, edge_snapshot(totals))
    (edge,) = window.edges(60)
    assert edge["grpc_statuses"] == {"OK": 6, "UNAVAILABLE": 3, "99": 1, "unknown": 1}
    assert list(edge["grpc_statuses"]) == ["OK", "UNAVAILABLE", "99", "unknown"]
    assert edge["requests"] == 12
    # an edge without gRPC traffic has none
    window.sample(20.0, edge_snapshot(totals))
    rec.record_request(request())
    totals.add_all(rec.metric_deltas())
    window.sample(30.0, edge_snapshot(totals))
    (edge,) = window.edges(5)
    assert edge["grpc_statuses"] == {}


def make_span(span_id: str, parent: str, service: str, kind: str, start: int, end: int) -> Span:
    return Span(trace_id=TRACE, span_id=span_id, parent_span_id=parent, name=f"{service}-{kind}",
                kind=kind, service=service, namespace="default", instance=f"{service}-0",  # type: ignore[arg-type]
                start_ns=start, end_ns=end, status_code=200)  # fmt: skip


def test_trace_assembles_as_a_tree() -> None:
    spans = [
        make_span("c" * 16, "b" * 16, "b", "client", 30, 80),
        make_span("a" * 16, "", "a", "client", 0, 100),
        make_span("b" * 16, "a" * 16, "b", "server", 10, 90),
        make_span("d" * 16, "c" * 16, "c", "server", 40, 70),
        make_span("e" * 16, "f" * 16, "x", "server", 50, 60),  # parent never arrived
    ]
    roots = assemble(spans)
    assert [r["span_id"] for r in roots] == ["a" * 16, "e" * 16] and roots[1]["orphan"]
    chain = [roots[0]]
    while chain[-1]["children"]:
        chain.append(chain[-1]["children"][0])
    assert [n["service"] + ":" + n["kind"] for n in chain] == [
        "a:client",
        "b:server",
        "b:client",
        "c:server",
    ]
    index = TraceIndex(max_traces=1)
    for s in spans + spans:
        index.add(s)
    tree = index.tree(TRACE)
    assert tree is not None and tree["spans"] == 5 and tree["duration_ms"] == 0.0
    index.add(msgspec.structs.replace(spans[0], trace_id="1" * 32))
    assert index.tree(TRACE) is None  # evicted: only the newest trace is kept


def test_settings_are_validated() -> None:
    s = TelemetrySettings.from_options({"stream-replicas": "3", "history-s": "60"})
    assert s.stream_replicas == 3 and s.history_s == 60.0
    assert s.effective_retire_after_s >= s.stream_max_age_s
    with pytest.raises(BadRequest):
        TelemetrySettings.from_options({"no-such": "1"})
    with pytest.raises(BadRequest):
        TelemetrySettings.from_options({"fetch-batch": "many"})


# ---------------------------------------------------------------- meshctl


def test_meshctl_finds_the_telemetry_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESH_TELEMETRY", raising=False)
    args = argparse.Namespace(telemetry=None, state_dir=str(tmp_path))
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps({"telemetry": {"metrics": "http://127.0.0.1:9104/metrics"}}))
    assert telemetry_cmds.telemetry_url(args) == "http://127.0.0.1:9104"
    cluster.write_text(
        json.dumps({"services": {"telemetry": [{"pid": 1, "http": "http://127.0.0.1:9105/"}]}})
    )
    assert telemetry_cmds.telemetry_url(args) == "http://127.0.0.1:9105"
    cluster.write_text(json.dumps({"services": {}}))
    with pytest.raises(CLIError):
        telemetry_cmds.telemetry_url(args)
    monkeypatch.setenv("MESH_TELEMETRY", "http://env:1/")
    assert telemetry_cmds.telemetry_url(args) == "http://env:1"
    args.telemetry = "http://flag:2"
    assert telemetry_cmds.telemetry_url(args) == "http://flag:2"


@pytest.mark.parametrize(
    ("statuses", "cell"),
    [
        ({}, "-"),
        ({"OK": 19, "UNAVAILABLE": 1}, "OK 95.0% UNAVAILABLE 5.0%"),
        # most frequent first; beyond three, a count of the rest
        (
            {"OK": 1, "INTERNAL": 2, "UNAVAILABLE": 4, "NOT_FOUND": 2, "unknown": 1},
            "UNAVAILABLE 40.0% INTERNAL 20.0% NOT_FOUND 20.0% +2 more",
        ),
    ],
)
def test_meshctl_top_shows_the_grpc_status_shares(statuses: dict[str, int], cell: str) -> None:
    edge = {
        "source": "productpage-v1", "source_namespace": "default", "destination": "reviews-v2",
        "destination_namespace": "default", "rps": 2.0, "success_rate": 1.0, "p50_ms": 1.0,
        "p90_ms": 2.0, "p99_ms": None, "grpc_statuses": statuses,
    }  # fmt: skip
    (row,) = telemetry_cmds.edge_rows([edge])
    assert dict(zip(telemetry_cmds.EDGE_HEADERS, row, strict=True))["GRPC"] == cell


def test_access_records_carry_the_dry_run_shadow_result() -> None:
    rec = recorder()
    rec.record_request(
        request(reporter="destination", dry_run_result="denied",
                dry_run_policy="default/deny-all", start_ns=5)
    )  # fmt: skip
    rec.record_request(request(reporter="destination", start_ns=6))
    payload = next(o for o in rec.outgoing() if o.kind == "access").payload
    shadowed, plain = msgspec.msgpack.decode(payload)["records"]
    assert (shadowed["dry_run_result"], shadowed["dry_run_policy"]) == (
        "denied",
        "default/deny-all",
    )
    assert "dry_run_result" not in plain and "dry_run_policy" not in plain
    # a record from a proxy without the fields decodes with empty defaults
    batch = wire.decode(payload)
    assert isinstance(batch, wire.AccessBatch)
    assert (batch.records[1].dry_run_result, batch.records[1].dry_run_policy) == ("", "")
    assert batch.records[0].dry_run_policy == "default/deny-all"
