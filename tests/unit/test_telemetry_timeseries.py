"""The dashboard's time series: per-edge, per-10 s buckets from samples of the totals."""

from __future__ import annotations

import pytest

from mesh.telemetry import (
    DURATION_BUCKETS_MS,
    REQUEST_DURATION_MS,
    REQUESTS_TOTAL,
    TCP_SENT_BYTES,
    CounterDelta,
    HistogramDelta,
    MetricTotals,
)
from services.telemetry.timeseries import SeriesRing, detail_snapshot

BOUNDS = [float(b) for b in DURATION_BUCKETS_MS]


def labels(reporter: str, code: str = "200", flags: str = "-", **kw: str) -> dict[str, str]:
    out = {
        "reporter": reporter,
        "source_workload": "productpage-v1",
        "source_workload_namespace": "default",
        "source_app": "productpage",
        "destination_workload": "reviews-v2",
        "destination_workload_namespace": "default",
        "destination_service_name": "reviews",
        "destination_service_namespace": "default",
        "response_code": code,
        "response_flags": flags,
    }
    out.update(kw)
    return out


def add_requests(
    totals: MetricTotals, n: float, reporter: str, code: str = "200", flags: str = "-",
    ms_bucket: int = 3,
) -> None:  # fmt: skip
    lab = labels(reporter, code, flags)
    totals.add(CounterDelta(name=REQUESTS_TOTAL, labels=lab, value=n))
    counts = [0] * (len(BOUNDS) + 1)
    counts[ms_bucket] = int(n)
    totals.add(
        HistogramDelta(
            name=REQUEST_DURATION_MS, labels=lab, bounds=BOUNDS, counts=counts, sum=0.0,
            count=int(n),
        )
    )  # fmt: skip


def test_increases_land_in_ten_second_buckets_and_the_first_sample_is_a_baseline() -> None:
    ring = SeriesRing(max_buckets=10)
    totals = MetricTotals()
    add_requests(totals, 100, "source")  # before we looked: not in any bucket
    ring.observe(1000.0, detail_snapshot(totals))
    add_requests(totals, 20, "source")
    ring.observe(1001.0, detail_snapshot(totals))
    add_requests(totals, 10, "source")
    ring.observe(1005.0, detail_snapshot(totals))
    add_requests(totals, 30, "source", code="500", flags="FI", ms_bucket=0)
    ring.observe(1012.0, detail_snapshot(totals))

    out = ring.query("workload", "reviews-v2", "default", "inbound", 60, now=1015.0)
    assert [p["t"] for p in out["points"]] == [1000.0, 1010.0]
    first, second = out["points"]
    assert first["rps"] == 3.0 and first["success_rate"] == 1.0 and first["codes"] == {"200": 30}
    assert second["success_rate"] == 0.0 and second["codes"] == {"500": 30}
    assert first["p50_ms"] is not None and 5 < first["p50_ms"] <= 10
    assert second["p99_ms"] is not None and second["p99_ms"] <= 0.5
    assert out["by_code"] == {"200": 30, "500": 30}
    assert out["by_flag"] == {"-": 30, "FI": 30}
    assert {"code": "500", "flag": "FI", "requests": 30} in out["by_code_flag"]
    assert out["summary"]["requests"] == 60 and out["summary"]["success_rate"] == 0.5
    assert out["peers"] == [{"peer": "productpage-v1.default", "requests": 60, "success_rate": 0.5}]


def test_client_side_view_wins_and_server_only_edges_still_count() -> None:
    ring = SeriesRing()
    totals = MetricTotals()
    ring.observe(0.0, detail_snapshot(totals))
    # the client's proxy injected 5 aborts that never reached the server
    add_requests(totals, 10, "source")
    add_requests(totals, 5, "source", code="500", flags="FI")
    add_requests(totals, 10, "destination")
    ring.observe(1.0, detail_snapshot(totals))
    out = ring.query("service", "reviews", "default", "inbound", 300, now=5.0)
    assert out["summary"]["requests"] == 15
    assert out["by_flag"] == {"-": 10, "FI": 5}

    server_only = MetricTotals()
    ring2 = SeriesRing()
    ring2.observe(0.0, detail_snapshot(server_only))
    add_requests(server_only, 7, "destination")
    ring2.observe(1.0, detail_snapshot(server_only))
    assert (
        ring2.query("workload", "reviews-v2", "default", "inbound", 300, 5.0)["summary"]["requests"]
        == 7
    )
    # the other direction of the same node is empty; the caller's outbound has it
    assert (
        ring2.query("workload", "reviews-v2", "default", "outbound", 300, 5.0)["points"][0]["rps"]
        == 0
    )
    out = ring2.query("workload", "productpage-v1", "default", "outbound", 300, 5.0)
    assert out["summary"]["requests"] == 7 and out["peers"][0]["peer"] == "reviews-v2.default"
    out = ring2.query("service", "productpage", "default", "outbound", 300, 5.0)
    assert out["summary"]["requests"] == 7


def test_ring_is_bounded_and_the_window_selects_recent_buckets() -> None:
    ring = SeriesRing(max_buckets=3)
    totals = MetricTotals()
    ring.observe(0.0, detail_snapshot(totals))
    for i in range(10):
        add_requests(totals, 1, "source")
        ring.observe(i * 10.0 + 1, detail_snapshot(totals))
    assert len(ring.buckets) == 3 and ring.max_window_s == 30.0
    out = ring.query("workload", "reviews-v2", "default", "inbound", 20, now=95.0)
    assert [p["t"] for p in out["points"]] == [80.0, 90.0]


def test_tcp_bytes_and_decreasing_totals() -> None:
    ring = SeriesRing()
    totals = MetricTotals()
    tcp = labels("destination", code="")
    del tcp["response_code"]
    ring.observe(0.0, detail_snapshot(totals))
    totals.add(CounterDelta(name=TCP_SENT_BYTES, labels=tcp, value=4096))
    ring.observe(1.0, detail_snapshot(totals))
    # totals re-folded lower (an archive replaced a ledger): nothing negative is added
    totals.add(CounterDelta(name=TCP_SENT_BYTES, labels=tcp, value=-4000))
    ring.observe(2.0, detail_snapshot(totals))
    out = ring.query("workload", "reviews-v2", "default", "inbound", 60, now=5.0)
    assert out["points"][0]["tcp_sent_bytes"] == 4096
    assert out["points"][0]["success_rate"] is None and out["summary"]["requests"] == 0


def test_a_ring_needs_a_bucket() -> None:
    with pytest.raises(ValueError, match="at least one bucket"):
        SeriesRing(max_buckets=0)


def test_a_gateway_services_calls_are_found_though_its_app_label_is_istios() -> None:
    ring = SeriesRing()
    totals = MetricTotals()
    ring.observe(0.0, detail_snapshot(totals))
    gateway = labels("source", source_workload="ingressgateway", source_app="istio-ingressgateway")
    totals.add(CounterDelta(name=REQUESTS_TOTAL, labels=gateway, value=4))
    ring.observe(1.0, detail_snapshot(totals))
    out = ring.query("service", "ingressgateway", "default", "outbound", 300, 5.0)
    assert out["summary"]["requests"] == 4
