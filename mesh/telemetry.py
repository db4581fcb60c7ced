"""Telemetry on the wire: the documented schema of the `MESH_TELEMETRY` stream, and the
pure aggregation math the sidecar and the telemetry service share.

Every message on `<prefix>.telemetry.<kind>.<namespace>.<service>` is one MessagePack
map (msgspec Structs, docs/architecture.md §7), readable from any language. The key
`type` names the message; `<namespace>.<service>` in the subject are the *reporting* proxy's own.

`MetricBatch` (kind `metrics`), what one proxy counted since its previous batch::

    {"type": "MetricBatch", "reporter": "reviews-v2-0_5f3a9c01", "seq": 42,
     "namespace": "default", "service": "reviews",
     "window_start_ns": 1718000000000000000, "window_end_ns": 1718000001000000000,
     "schema": 1,
     "series": [
       {"type": "CounterDelta", "name": "istio_requests_total",
        "labels": {"reporter": "destination", "response_code": "200", ...}, "value": 3.0},
       {"type": "HistogramDelta", "name": "istio_request_duration_milliseconds",
        "labels": {...}, "bounds": [0.5, 1.0, ...], "counts": [0, 2, 1, ...],
        "sum": 7.25, "count": 3}]}

- `reporter` is unique per proxy *process* (instance id + a boot nonce), `seq` counts
  that reporter's batches from 1. The pair identifies a batch: JetStream drops re-sends
  of the same `Nats-Msg-Id` (`metrics:<reporter>:<seq>`), and the telemetry service
  applies a (reporter, seq) at most once.
- Values are deltas since the previous batch of the same reporter.
- Histogram `counts` are per bucket, *not* cumulative: `counts[i]` is the number of
  observations `v` with `bounds[i-1] < v <= bounds[i]`; the last entry (one more than
  `bounds`) counts `v > bounds[-1]` (Prometheus' `+Inf` bucket).
- Labels are Istio's standard metric labels (`HTTP_LABELS`, `TCP_LABELS`), with
  "unknown" for what a proxy cannot know, and `response_flags` "-" when there are none.

`SpanBatch` (kind `spans`): finished, sampled spans (`Span`), W3C ids in lower-case hex.
`AccessBatch` (kind `access`): one `AccessRecord` per request.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal

import msgspec
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from mesh.messages import Struct

SCHEMA_VERSION = 1
MSG_ID_HEADER = "Nats-Msg-Id"

# Istio's default buckets for request durations (milliseconds)...
DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)  # fmt: skip
# ...and for request/response sizes (bytes): exponential, 1 B to 100 MB.
BYTES_BUCKETS: tuple[float, ...] = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000)

# ---------------------------------------------------------------- metric names (Istio's)

REQUESTS_TOTAL = "istio_requests_total"
REQUEST_DURATION_MS = "istio_request_duration_milliseconds"
REQUEST_BYTES = "istio_request_bytes"
RESPONSE_BYTES = "istio_response_bytes"
TCP_SENT_BYTES = "istio_tcp_sent_bytes_total"
TCP_RECEIVED_BYTES = "istio_tcp_received_bytes_total"
TCP_OPENED = "istio_tcp_connections_opened_total"
TCP_CLOSED = "istio_tcp_connections_closed_total"

METRIC_HELP: dict[str, str] = {
    REQUESTS_TOTAL: "Requests, by source, destination and response code",
    REQUEST_DURATION_MS: "Request duration in milliseconds",
    REQUEST_BYTES: "Request body sizes in bytes",
    RESPONSE_BYTES: "Response body sizes in bytes",
    TCP_SENT_BYTES: "Bytes sent to the peer on TCP connections",
    TCP_RECEIVED_BYTES: "Bytes received from the peer on TCP connections",
    TCP_OPENED: "TCP connections opened",
    TCP_CLOSED: "TCP connections closed",
}

# Istio's CLUSTER_ID default: the value of `source_cluster` / `destination_cluster`
# unless the proxy is given another (`meshctl sidecar --cluster-id`)
DEFAULT_CLUSTER_ID = "Kubernetes"

TCP_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_app",
    "destination_version",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)
HTTP_LABELS: tuple[str, ...] = (*TCP_LABELS, "response_code")

Kind = Literal["metrics", "spans", "access"]
KINDS: tuple[Kind, ...] = ("metrics", "spans", "access")

# ---------------------------------------------------------------- wire schema


class CounterDelta(Struct, kw_only=True):
    """How much one counter series grew (or, in a stored total, its value)."""

    name: str
    labels: dict[str, str]
    value: float


class HistogramDelta(Struct, kw_only=True):
    """Observations added to one histogram series (per-bucket counts, see module doc)."""

    name: str
    labels: dict[str, str]
    bounds: list[float]
    counts: list[int]
    sum: float
    count: int


SeriesDelta = CounterDelta | HistogramDelta


class MetricBatch(Struct, kw_only=True):
    reporter: str
    seq: int
    namespace: str
    service: str
    window_start_ns: int
    window_end_ns: int
    series: list[SeriesDelta] = []
    schema: int = SCHEMA_VERSION


class Span(Struct, kw_only=True):
    """One finished span. A proxy reports a `client` span for each request it sends
    and a `server` span for each request it receives."""

    trace_id: str  # 32 lower-case hex digits
    span_id: str  # 16 lower-case hex digits
    parent_span_id: str = ""  # empty for a root span
    name: str
    kind: Literal["client", "server"]
    service: str
    namespace: str
    instance: str
    start_ns: int  # unix nanoseconds
    end_ns: int
    status_code: int = 0  # HTTP status; 0 when no response was received
    error: bool = False
    attributes: dict[str, str] = {}


class SpanBatch(Struct, kw_only=True):
    reporter: str
    seq: int
    namespace: str
    service: str
    spans: list[Span] = []
    schema: int = SCHEMA_VERSION


class AccessRecord(Struct):
    """One request as the reporting proxy saw it (Envoy's access-log fields).

    The fields without a default come first so that a proxy can build one
    positionally (a third of the cost of keywords, per request); on the wire it is a
    map, where the order of the keys means nothing."""

    time_ns: int  # request start, unix nanoseconds
    reporter: Literal["source", "destination"]
    method: str
    authority: str
    path: str
    status: int  # 0 when no response was received
    duration_ms: float
    protocol: str = "http"
    response_flags: str = "-"
    bytes_received: int = 0  # request body bytes
    bytes_sent: int = 0  # response body bytes
    upstream_host: str = ""
    source_principal: str = "unknown"
    destination_principal: str = "unknown"
    source_workload: str = "unknown"
    source_namespace: str = "unknown"
    destination_workload: str = "unknown"
    destination_namespace: str = "unknown"
    destination_service: str = "unknown"
    request_id: str = ""
    trace_id: str = ""
    # dry-run (`istio.io/dry-run`) AuthorizationPolicies, as Envoy's shadow rules
    # report them (`istio_dry_run_*_shadow_engine_result` / `..._effective_policy_id`):
    # "allowed" or "denied", "" when none applies; the deciding dry-run policy `ns/name`
    # ("" when none decided, e.g. no dry-run ALLOW policy matched). Absent on the wire
    # when empty, so records from older proxies decode unchanged.
    dry_run_result: str = ""
    dry_run_policy: str = ""


class AccessBatch(Struct, kw_only=True):
    reporter: str
    seq: int
    namespace: str
    service: str
    records: list[AccessRecord] = []
    schema: int = SCHEMA_VERSION


TelemetryMessage = MetricBatch | SpanBatch | AccessBatch

_decoder: msgspec.msgpack.Decoder[TelemetryMessage] = msgspec.msgpack.Decoder(TelemetryMessage)


def decode(data: bytes) -> TelemetryMessage:
    """Decode one stream message; raises msgspec.DecodeError/ValidationError."""
    return _decoder.decode(data)


_REPORTER = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_]|\.(?!\.)){0,150}[A-Za-z0-9]")


def valid_reporter(reporter: str) -> bool:
    """A reporter id is a NATS-KV-safe token: letters, digits, '-', '_', single dots."""
    return bool(_REPORTER.fullmatch(reporter))


def new_reporter_id(instance: str, nonce: int) -> str:
    """`<instance>_<8 hex digits>`: unique per proxy process, so batch numbers (which
    restart at 1 with the process) never collide with a previous run's."""
    safe = re.sub(r"[^-A-Za-z0-9_.]", "-", instance).strip("-_.") or "proxy"
    safe = re.sub(r"\.{2,}", ".", safe)[:120].strip("-_.") or "proxy"
    return f"{safe}_{nonce & 0xFFFFFFFF:08x}"


def message_id(kind: Kind, reporter: str, seq: int) -> str:
    """The `Nats-Msg-Id` of a batch: re-sending the same batch is deduplicated."""
    return f"{kind}:{reporter}:{seq}"


def stream_name(prefix: str) -> str:
    """`MESH_TELEMETRY` for the default prefix; one stream per mesh sharing a NATS."""
    return re.sub(r"[^A-Za-z0-9]", "_", prefix).upper() + "_TELEMETRY"


def subject_kind(subject: str, prefix: str) -> Kind | None:
    """`mesh.telemetry.spans.default.reviews` -> "spans"."""
    parts = subject.split(".")
    base = prefix.count(".") + 1
    if len(parts) != base + 4 or parts[base] != "telemetry":
        return None
    kind = parts[base + 1]
    return kind if kind in KINDS else None  # type: ignore[return-value]


# ---------------------------------------------------------------- aggregation math

LabelKey = tuple[tuple[str, str], ...]
SeriesKey = tuple[str, LabelKey]


def series_key(name: str, labels: Mapping[str, str]) -> SeriesKey:
    return name, tuple(sorted(labels.items()))


def bucket_index(bounds: Sequence[float], value: float) -> int:
    """The bucket an observation falls in: first `i` with `value <= bounds[i]`, else
    `len(bounds)` (the +Inf bucket)."""
    return bisect.bisect_left(bounds, value)


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """Prometheus' `histogram_quantile` on per-bucket counts: linear interpolation inside
    the bucket holding the q-th observation; the highest finite bound when it falls in
    +Inf; None without observations."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        if seen + c >= rank:
            if i >= len(bounds):
                return float(bounds[-1]) if bounds else None
            lower = 0.0 if i == 0 else float(bounds[i - 1])
            upper = float(bounds[i])
            return lower + (upper - lower) * max(0.0, rank - seen) / c
        seen += c
    return float(bounds[-1]) if bounds else None


class HistogramValue:
    """A mutable histogram total: per-bucket counts (last is +Inf), sum, count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]):
        # totals copied from totals share one bounds tuple instead of converting again
        self.bounds: tuple[float, ...] = (
            bounds if isinstance(bounds, tuple) else tuple(float(b) for b in bounds)
        )
        self.counts: list[int] = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def add(self, counts: Sequence[int], total: float, count: int, sign: int = 1) -> None:
        mine = self.counts
        for i, c in enumerate(counts):
            mine[i] += sign * c
        self.sum += sign * total
        self.count += sign * count

    def cumulative(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        running = 0
        for bound, c in zip(self.bounds, self.counts, strict=False):
            running += c
            out.append((floatToGoString(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


class MetricTotals:
    """Label-keyed counter and histogram totals: what a batch adds to, what `/metrics`
    renders. A histogram series keeps the bounds it was first seen with; deltas with
    other bounds are refused (counted in `rejected`)."""

    def __init__(self) -> None:
        self.counters: dict[SeriesKey, float] = {}
        self.histograms: dict[SeriesKey, HistogramValue] = {}
        self.rejected = 0

    def __len__(self) -> int:
        return len(self.counters) + len(self.histograms)

    def add(self, delta: SeriesDelta, sign: int = 1) -> bool:
        key = series_key(delta.name, delta.labels)
        if isinstance(delta, CounterDelta):
            self.counters[key] = self.counters.get(key, 0.0) + sign * delta.value
            return True
        if len(delta.counts) != len(delta.bounds) + 1:
            self.rejected += 1
            return False
        hist = self.histograms.get(key)
        if hist is None:
            hist = self.histograms[key] = HistogramValue(delta.bounds)
        elif len(hist.bounds) != len(delta.bounds) or any(
            a != b for a, b in zip(hist.bounds, delta.bounds, strict=True)
        ):
            self.rejected += 1
            return False
        hist.add(delta.counts, delta.sum, delta.count, sign)
        return True

    def add_all(self, deltas: Iterable[SeriesDelta], sign: int = 1) -> None:
        for d in deltas:
            self.add(d, sign)

    def merge(self, other: MetricTotals, sign: int = 1) -> None:
        for key, value in other.counters.items():
            self.counters[key] = self.counters.get(key, 0.0) + sign * value
        for key, h in other.histograms.items():
            mine = self.histograms.get(key)
            if mine is None:
                mine = self.histograms[key] = HistogramValue(h.bounds)
            if mine.bounds == h.bounds:
                mine.add(h.counts, h.sum, h.count, sign)
            else:
                self.rejected += 1

    def copy(self) -> MetricTotals:
        out = MetricTotals()
        out.merge(self)
        return out

    def to_series(self) -> list[SeriesDelta]:
        """The totals as wire series (what a stored aggregate holds)."""
        out: list[SeriesDelta] = []
        for (name, labels), value in sorted(self.counters.items()):
            out.append(CounterDelta(name=name, labels=dict(labels), value=value))
        for (name, labels), h in sorted(self.histograms.items(), key=lambda kv: kv[0]):
            out.append(
                HistogramDelta(
                    name=name,
                    labels=dict(labels),
                    bounds=list(h.bounds),
                    counts=list(h.counts),
                    sum=h.sum,
                    count=h.count,
                )
            )
        return out

    @classmethod
    def from_series(cls, series: Iterable[SeriesDelta]) -> MetricTotals:
        out = cls()
        out.add_all(series)
        return out

    def families(self) -> list[Metric]:
        """prometheus_client metric families, one per metric name (a custom collector's
        `collect()` returns these)."""
        return list(_families(self))


def _label_names(keys: Iterable[LabelKey]) -> list[str]:
    names: dict[str, None] = {}
    for labels in keys:
        for k, _ in labels:
            names.setdefault(k, None)
    return list(names)


def _families(totals: MetricTotals) -> Iterator[Metric]:
    by_name: dict[str, list[LabelKey]] = {}
    for name, labels in totals.counters:
        by_name.setdefault(name, []).append(labels)
    for name in sorted(by_name):
        keys = sorted(by_name[name])
        label_names = _label_names(keys)
        fam = CounterMetricFamily(name, METRIC_HELP.get(name, name), labels=label_names)
        for labels in keys:
            d = dict(labels)
            value = totals.counters[(name, labels)]
            fam.add_metric(
                [d.get(n, "") for n in label_names], value if math.isfinite(value) else 0.0
            )
        yield fam
    hist_by_name: dict[str, list[LabelKey]] = {}
    for name, labels in totals.histograms:
        hist_by_name.setdefault(name, []).append(labels)
    for name in sorted(hist_by_name):
        keys = sorted(hist_by_name[name])
        label_names = _label_names(keys)
        hfam = HistogramMetricFamily(name, METRIC_HELP.get(name, name), labels=label_names)
        for labels in keys:
            d = dict(labels)
            h = totals.histograms[(name, labels)]
            hfam.add_metric([d.get(n, "") for n in label_names], h.cumulative(), h.sum)
        yield hfam
