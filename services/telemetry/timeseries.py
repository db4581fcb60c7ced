"""Time series for the dashboard's charts, computed without I/O.

The telemetry service samples its mesh-wide totals (cumulative counters and histograms)
once a second; `SeriesRing.observe` turns each sample into the increase since the
previous one and adds it to the current 10-second bucket, per *detail key* (one edge,
one reporter, one response code, one response flag). The ring keeps a bounded number of
buckets (an hour by default), so memory is bounded by `buckets x series`.

`SeriesRing.query` answers a chart: for one workload or service, inbound or outbound,
per bucket: requests/s, success rate, p50/p90/p99 ms, and totals by response code and
by response flag (a 503 `UO` and a 503 `UH` are different rows); TCP bytes per bucket.
An edge both proxies report is counted as its client side saw it (that includes
faults injected by the client's proxy and failures to connect) unless only the server
side reported it, as the service graph does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from mesh.telemetry import (
    DURATION_BUCKETS_MS,
    REQUEST_DURATION_MS,
    REQUESTS_TOTAL,
    TCP_RECEIVED_BYTES,
    TCP_SENT_BYTES,
    MetricTotals,
    histogram_quantile,
)
from services.telemetry.views import is_error

BUCKET_S = 10.0
_BOUNDS = tuple(float(b) for b in DURATION_BUCKETS_MS)

Direction = Literal["inbound", "outbound"]
NodeKind = Literal["workload", "service"]


class DetailKey(NamedTuple):
    reporter: str
    source: str  # source workload
    source_namespace: str
    source_app: str
    destination: str  # destination workload, else the service name
    destination_namespace: str
    destination_service: str  # the service's name (not the host)
    response_code: str  # "" for TCP series
    response_flags: str


class Cumulative:
    """Cumulative counts of one detail key, as the totals hold them."""

    __slots__ = ("duration", "requests", "tcp_received", "tcp_sent")

    def __init__(self) -> None:
        self.requests = 0.0
        self.duration = [0] * (len(_BOUNDS) + 1)
        self.tcp_sent = 0.0
        self.tcp_received = 0.0


def _detail_key(labels: Mapping[str, str], with_code: bool) -> DetailKey:
    dest = labels.get("destination_workload", "unknown")
    dest_ns = labels.get("destination_workload_namespace", "unknown")
    service = labels.get("destination_service_name", "unknown")
    if dest == "unknown":
        dest = service
        dest_ns = labels.get("destination_service_namespace", "unknown")
    return DetailKey(
        labels.get("reporter", "unknown"),
        labels.get("source_workload", "unknown"),
        labels.get("source_workload_namespace", "unknown"),
        labels.get("source_app", "unknown"),
        dest,
        dest_ns,
        service,
        labels.get("response_code", "") if with_code else "",
        labels.get("response_flags", "-") or "-",
    )


def detail_snapshot(total: MetricTotals) -> dict[DetailKey, Cumulative]:
    """The totals' request, duration and TCP byte counts per detail key."""
    out: dict[DetailKey, Cumulative] = {}
    for (name, labels), value in total.counters.items():
        if name == REQUESTS_TOTAL:
            out.setdefault(_detail_key(dict(labels), True), Cumulative()).requests += value
        elif name in (TCP_SENT_BYTES, TCP_RECEIVED_BYTES):
            c = out.setdefault(_detail_key(dict(labels), False), Cumulative())
            if name == TCP_SENT_BYTES:
                c.tcp_sent += value
            else:
                c.tcp_received += value
    for (name, labels), h in total.histograms.items():
        if name != REQUEST_DURATION_MS or h.bounds != _BOUNDS:
            continue
        c = out.setdefault(_detail_key(dict(labels), True), Cumulative())
        for i, n in enumerate(h.counts):
            c.duration[i] += n
    return out


@dataclass
class BucketCounts:
    """What one detail key added during one bucket."""

    requests: float = 0.0
    duration: list[int] = field(default_factory=lambda: [0] * (len(_BOUNDS) + 1))
    tcp_sent: float = 0.0
    tcp_received: float = 0.0


@dataclass
class Bucket:
    start: float  # seconds, on the clock the samples carry
    counts: dict[DetailKey, BucketCounts] = field(default_factory=dict)


class SeriesRing:
    """Per-detail-key increases in `bucket_s` buckets, the newest `max_buckets` kept."""

    def __init__(self, max_buckets: int = 360, bucket_s: float = BUCKET_S):
        if max_buckets < 1 or bucket_s <= 0:
            raise ValueError("a series ring needs at least one bucket of positive length")
        self.max_buckets = max_buckets
        self.bucket_s = bucket_s
        self.buckets: deque[Bucket] = deque(maxlen=max_buckets)
        self._last: dict[DetailKey, Cumulative] | None = None

    @property
    def max_window_s(self) -> float:
        return self.max_buckets * self.bucket_s

    def observe(self, t: float, snapshot: dict[DetailKey, Cumulative]) -> None:
        """Add the increase since the previous snapshot to the bucket holding `t`. The
        first snapshot is only a baseline (its counts happened before we looked); a
        count that went down (totals re-folded) adds nothing."""
        last, self._last = self._last, snapshot
        if last is None:
            return
        start = (t // self.bucket_s) * self.bucket_s
        if not self.buckets or self.buckets[-1].start < start:
            self.buckets.append(Bucket(start))
        bucket = self.buckets[-1]
        for key, now in snapshot.items():
            before = last.get(key)
            requests = now.requests - (before.requests if before else 0.0)
            sent = now.tcp_sent - (before.tcp_sent if before else 0.0)
            received = now.tcp_received - (before.tcp_received if before else 0.0)
            duration = [
                n - (before.duration[i] if before else 0) for i, n in enumerate(now.duration)
            ]
            if requests <= 0 and sent <= 0 and received <= 0:
                continue
            b = bucket.counts.get(key)
            if b is None:
                b = bucket.counts[key] = BucketCounts()
            b.requests += max(requests, 0.0)
            b.tcp_sent += max(sent, 0.0)
            b.tcp_received += max(received, 0.0)
            for i, n in enumerate(duration):
                if n > 0:
                    b.duration[i] += n

    def query(
        self,
        kind: NodeKind,
        name: str,
        namespace: str,
        direction: Direction,
        window_s: float,
        now: float,
    ) -> dict[str, Any]:
        """The chart data of one node over the buckets ending at `now`."""
        first = ((now - window_s) // self.bucket_s + 1) * self.bucket_s
        buckets = [b for b in self.buckets if b.start >= first]
        chosen = _chosen_reporters(buckets, kind, name, namespace, direction)
        points: list[dict[str, Any]] = []
        by_code: dict[str, float] = {}
        by_flag: dict[str, float] = {}
        by_code_flag: dict[tuple[str, str], float] = {}
        peers: dict[str, dict[str, Any]] = {}
        total_requests = total_errors = 0.0
        total_duration = [0] * (len(_BOUNDS) + 1)
        for b in buckets:
            requests = errors = sent = received = 0.0
            duration = [0] * (len(_BOUNDS) + 1)
            codes: dict[str, float] = {}
            for key, c in b.counts.items():
                edge = _edge_of(key)
                if chosen.get(edge) != key.reporter:
                    continue
                sent += c.tcp_sent
                received += c.tcp_received
                if key.response_code == "":
                    continue
                requests += c.requests
                if is_error(key.response_code):
                    errors += c.requests
                codes[key.response_code] = codes.get(key.response_code, 0.0) + c.requests
                by_code[key.response_code] = by_code.get(key.response_code, 0.0) + c.requests
                by_flag[key.response_flags] = by_flag.get(key.response_flags, 0.0) + c.requests
                pair = (key.response_code, key.response_flags)
                by_code_flag[pair] = by_code_flag.get(pair, 0.0) + c.requests
                for i, n in enumerate(c.duration):
                    duration[i] += n
                peer_id = _peer_of(key, direction)
                p = peers.setdefault(peer_id, {"peer": peer_id, "requests": 0.0, "errors": 0.0})
                p["requests"] += c.requests
                if is_error(key.response_code):
                    p["errors"] += c.requests
            total_requests += requests
            total_errors += errors
            for i, n in enumerate(duration):
                total_duration[i] += n
            q = {p: histogram_quantile(p, _BOUNDS, duration) for p in (0.5, 0.9, 0.99)}
            points.append(
                {
                    "t": b.start,
                    "rps": round(requests / self.bucket_s, 3),
                    "success_rate": round(1 - errors / requests, 4) if requests else None,
                    "p50_ms": _ms(q[0.5]),
                    "p90_ms": _ms(q[0.9]),
                    "p99_ms": _ms(q[0.99]),
                    "codes": {k: int(v) for k, v in sorted(codes.items())},
                    "tcp_sent_bytes": int(sent),
                    "tcp_received_bytes": int(received),
                }
            )
        q = {p: histogram_quantile(p, _BOUNDS, total_duration) for p in (0.5, 0.9, 0.99)}
        return {
            "kind": kind,
            "name": name,
            "namespace": namespace,
            "direction": direction,
            "window_s": window_s,
            "bucket_s": self.bucket_s,
            "points": points,
            "summary": {
                "requests": int(total_requests),
                "success_rate": (
                    round(1 - total_errors / total_requests, 4) if total_requests else None
                ),
                "p50_ms": _ms(q[0.5]),
                "p90_ms": _ms(q[0.9]),
                "p99_ms": _ms(q[0.99]),
            },
            "by_code": {k: int(v) for k, v in sorted(by_code.items())},
            "by_flag": {k: int(v) for k, v in sorted(by_flag.items())},
            "by_code_flag": [
                {"code": c, "flag": f, "requests": int(v)}
                for (c, f), v in sorted(by_code_flag.items())
            ],
            "peers": sorted(
                (
                    {
                        "peer": p["peer"],
                        "requests": int(p["requests"]),
                        "success_rate": round(1 - p["errors"] / p["requests"], 4),
                    }
                    for p in peers.values()
                    if p["requests"] > 0
                ),
                key=lambda p: (-p["requests"], p["peer"]),
            ),
        }


def _edge_of(key: DetailKey) -> tuple[str, str, str, str]:
    return (key.source, key.source_namespace, key.destination, key.destination_namespace)


def _peer_of(key: DetailKey, direction: Direction) -> str:
    if direction == "inbound":
        return f"{key.source}.{key.source_namespace}"
    return f"{key.destination}.{key.destination_namespace}"


def _matches(key: DetailKey, kind: NodeKind, name: str, ns: str, direction: Direction) -> bool:
    if direction == "inbound":
        if kind == "workload":
            return key.destination == name and key.destination_namespace == ns
        return key.destination_service == name and key.destination_namespace == ns
    if kind == "workload":
        return key.source == name and key.source_namespace == ns
    # a service's calls: by its app label, or by its unversioned workload, which is
    # named after the service (a gateway's app label is Istio's, `istio-ingressgateway`
    # for the `ingressgateway` service)
    return (key.source_app == name or key.source == name) and key.source_namespace == ns


def _chosen_reporters(
    buckets: list[Bucket], kind: NodeKind, name: str, ns: str, direction: Direction
) -> dict[tuple[str, str, str, str], str]:
    """Per edge of the node, the reporter whose view counts: the client's when it
    reported the edge in the window, else the server's."""
    chosen: dict[tuple[str, str, str, str], str] = {}
    for b in buckets:
        for key in b.counts:
            if not _matches(key, kind, name, ns, direction):
                continue
            edge = _edge_of(key)
            if chosen.get(edge) != "source":
                chosen[edge] = key.reporter
    return chosen


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v, 3)
