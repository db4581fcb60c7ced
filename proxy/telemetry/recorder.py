"""`TelemetryRecorder`: the sidecar's in-process aggregation (pure, no I/O).

Called by the data path once per request (`record_request(RequestRecord(...))`) and
per TCP connection (`record_tcp_*`). It aggregates into label-keyed counters and
histograms, kept cumulative for the admin `/stats/prometheus` (register the recorder
in a prometheus_client `CollectorRegistry`) and cut into delta batches for the bus.
Access records and spans wait in bounded buffers; past the bound they are dropped and
counted (`meshwork_telemetry_dropped_total{kind}`). Metric deltas are never dropped
while the bus is down: they keep accumulating and leave in the next batch that gets
through.

A request costs the data path one list append: the records are aggregated in bulk by
`fold()`, which the publisher runs every flush, and which everything reading the
metrics runs first (`metric_deltas`, `totals`, `outgoing`), so no reader ever sees
them late. (Interleaved with TLS, sockets and the HTTP engine, telemetry's code
measured several times what it costs in a tight loop; the fold is such a loop, once a
second.) Access records are converted to the wire Struct (positionally) and encoded only when
their batch is cut.
"""

from __future__ import annotations

import time
from bisect import bisect_left as _bisect
from collections import deque
from collections.abc import Callable, Iterable
from operator import itemgetter

import msgspec
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh import telemetry as wire
from mesh.telemetry import (
    BYTES_BUCKETS,
    DURATION_BUCKETS_MS,
    AccessBatch,
    AccessRecord,
    CounterDelta,
    HistogramDelta,
    Kind,
    MetricBatch,
    MetricTotals,
    SeriesDelta,
    Span,
    SpanBatch,
)

from .records import UNKNOWN, Outgoing, RequestRecord, TcpRecord, Workload, split_service_host


def _v(value: str) -> str:
    return value or UNKNOWN


def _identity_labels(
    reporter: str, src: Workload, dst: Workload, service: str, cluster: str
) -> dict[str, str]:
    name, ns = split_service_host(service)
    return {
        "reporter": reporter,
        "source_workload": _v(src.name),
        "source_workload_namespace": _v(src.namespace),
        "source_principal": _v(src.principal),
        "source_app": _v(src.app),
        "source_version": _v(src.version),
        # one cluster per mesh: a known workload is in it (Istio: its CLUSTER_ID)
        "source_cluster": cluster if _known(src) else UNKNOWN,
        "destination_cluster": cluster if _known(dst) else UNKNOWN,
        "destination_workload": _v(dst.name),
        "destination_workload_namespace": _v(dst.namespace),
        "destination_principal": _v(dst.principal),
        "destination_service": _v(service),
        "destination_service_name": name,
        "destination_service_namespace": ns,
        "destination_app": _v(dst.app),
        "destination_version": _v(dst.version),
    }


def _known(workload: Workload) -> bool:
    return bool(workload.name) and workload.name != UNKNOWN


# ================================================================ in-process aggregation

_DUR = DURATION_BUCKETS_MS
_BYTES = BYTES_BUCKETS
_DUR_LIST = [float(b) for b in _DUR]
_BYTES_LIST = [float(b) for b in _BYTES]


class _Hist:
    """A histogram with what was already sent, so a flush takes the difference. Its
    count is the number of observations in its buckets: its series' request count
    (one observation per request), once Envoy's late histograms (stats mode) are in."""

    __slots__ = ("counts", "sent_counts", "sent_sum", "sum")

    def __init__(self, buckets: int):
        self.counts = [0] * (buckets + 1)
        self.sum = 0.0
        self.sent_counts = [0] * (buckets + 1)
        self.sent_sum = 0.0

    def delta(self, name: str, labels: dict[str, str], bounds: list[float]) -> HistogramDelta:
        counts = [a - b for a, b in zip(self.counts, self.sent_counts, strict=True)]
        d = HistogramDelta(
            name=name,
            labels=labels,
            bounds=bounds,
            counts=counts,
            sum=self.sum - self.sent_sum,
            count=sum(counts),
        )
        self.sent_counts = list(self.counts)
        self.sent_sum = self.sum
        return d


class _HttpSeries:
    __slots__ = (
        "duration",
        "histograms_added",
        "labels",
        "request_size",
        "requests",
        "response_size",
        "sent_requests",
    )

    def __init__(self, labels: dict[str, str]):
        self.labels = labels
        # `record_series` added observations (which may come after their requests)
        self.histograms_added = False
        self.requests = 0
        self.sent_requests = 0
        self.duration = _Hist(len(_DUR))
        self.request_size = _Hist(len(_BYTES))
        self.response_size = _Hist(len(_BYTES))


class _TcpSeries:
    __slots__ = ("labels", "now", "sent")

    def __init__(self, labels: dict[str, str]):
        self.labels = labels
        # opened, closed, sent bytes, received bytes: cumulative, and as last flushed
        self.now = [0, 0, 0, 0]
        self.sent = [0, 0, 0, 0]


# pre-aggregated histogram counts (`record_series`): per bucket (one past the bounds), sum
BucketCounts = tuple[list[int], float]
# what tells a request's series apart, taken in one C call per request
_series_key: Callable[[RequestRecord], tuple[object, ...]] = itemgetter(
    *(
        RequestRecord._fields.index(name)
        for name in (
            "reporter",
            "source",
            "destination",
            "destination_service",
            "status",
            "flags",
            "protocol",
            "security_policy",
            "grpc_status",
        )
    )
)
_TCP_NAMES = (wire.TCP_OPENED, wire.TCP_CLOSED, wire.TCP_SENT_BYTES, wire.TCP_RECEIVED_BYTES)


class TelemetryRecorder(Collector):
    """Aggregates one proxy's telemetry; every method is synchronous and cheap.

    `reporter_id` must be unique per proxy process (`mesh.telemetry.new_reporter_id`).
    """

    def __init__(
        self,
        *,
        reporter_id: str,
        namespace: str,
        service: str,
        instance: str,
        max_series: int = 2_000,
        max_buffered: int = 10_000,
        max_batch_records: int = 1_000,
        max_batch_series: int = 400,
        max_pending: int = 4_096,
        access_log: bool = True,
        clock_ns: Callable[[], int] = time.time_ns,
        cluster: str = wire.DEFAULT_CLUSTER_ID,
    ):
        if not wire.valid_reporter(reporter_id):
            raise ValueError(f"invalid reporter id {reporter_id!r}")
        self.reporter_id = reporter_id
        # `source_cluster` / `destination_cluster` of every series
        self.cluster = cluster or wire.DEFAULT_CLUSTER_ID
        self.namespace = namespace
        self.service = service
        self.instance = instance
        self.max_series = max_series
        self.max_buffered = max_buffered
        self.max_batch_records = max_batch_records
        self.max_batch_series = max_batch_series
        self.max_pending = max_pending  # requests recorded but not yet folded
        self.access_log = access_log
        self._clock_ns = clock_ns
        self._http: dict[tuple[object, ...], _HttpSeries] = {}
        self._tcp: dict[TcpRecord, _TcpSeries] = {}
        # recorded since the last fold; the first `_logged` of them have an access record
        self._requests: list[RequestRecord] = []
        self._logged = 0
        # folded requests whose access record waits for a batch; `_access_room` is what
        # the buffer can still take, counting those pending with an access record
        self._access: deque[RequestRecord] = deque()
        self._access_room = max_buffered if access_log else 0
        self._spans: deque[Span] = deque()
        self._pending: dict[Kind, Outgoing | None] = {
            "metrics": None,
            "spans": None,
            "access": None,
        }
        self._seq: dict[Kind, int] = {"metrics": 0, "spans": 0, "access": 0}
        self._window_start_ns = clock_ns()
        self.dropped: dict[str, int] = {"access": 0, "spans": 0, "series": 0}
        self.published: dict[Kind, int] = {"metrics": 0, "spans": 0, "access": 0}
        self.publish_failures = 0

    # ------------------------------------------------------------ data path (hot)

    def record_request(self, r: RequestRecord) -> None:
        """Count one request (aggregated at the next `fold`). A record without
        `start_ns` started its duration before now."""
        if not r.start_ns:  # the last field
            r = RequestRecord._make((*r[:-1], self._clock_ns() - int(r.duration_ms * 1e6)))
        pending = self._requests
        pending.append(r)
        if self._access_room:
            self._access_room -= 1
            self._logged += 1
        elif self.access_log:
            self.dropped["access"] += 1
        if len(pending) >= self.max_pending:
            self.fold()

    def fold(self) -> None:
        """Aggregate the requests recorded since the last fold into their series, and
        queue their access records."""
        pending = self._requests
        if not pending:
            return
        self._requests = []
        logged, self._logged = self._logged, 0
        http = self._http
        dur, size = _DUR, _BYTES
        for r in pending:
            key = _series_key(r)
            s = http.get(key)
            if s is None:
                s = self._new_http_series(r, key)
                if s is None:
                    continue
            s.requests += 1
            d = r.duration_ms
            h = s.duration
            h.counts[_bisect(dur, d)] += 1
            h.sum += d
            n = r.request_bytes
            h = s.request_size
            h.counts[_bisect(size, n)] += 1
            h.sum += n
            n = r.response_bytes
            h = s.response_size
            h.counts[_bisect(size, n)] += 1
            h.sum += n
        if logged:
            self._access.extend(pending if logged == len(pending) else pending[:logged])

    def record_series(
        self,
        r: RequestRecord,
        requests: int,
        duration: BucketCounts,
        request_size: BucketCounts,
        response_size: BucketCounts,
    ) -> None:
        """Requests counted elsewhere (Envoy's stats access logger, docs/architecture.md
        §7), added to the series `r` names (its labels only: its duration and sizes
        are not read). Each `BucketCounts` is (per-bucket counts in this recorder's
        buckets, the last one past them; their sum). No access record."""
        key = _series_key(r)
        s = self._http.get(key)
        if s is None:
            s = self._new_http_series(r, key)
            if s is None:
                return
        s.requests += requests
        for h, (counts, total) in (
            (s.duration, duration),
            (s.request_size, request_size),
            (s.response_size, response_size),
        ):
            if len(counts) != len(h.counts):
                raise ValueError(f"{len(counts)} bucket counts for {len(h.counts)} buckets")
            h.counts = [a + b for a, b in zip(h.counts, counts, strict=True)]
            h.sum += total
        s.histograms_added = True

    def record_access(self, r: RequestRecord) -> None:
        """The access record of a request whose metrics are counted elsewhere
        (`record_series`): buffered like `record_request`'s, never counted."""
        if not self.access_log:
            return
        if not self._access_room:
            self.dropped["access"] += 1
            return
        if not r.start_ns:  # the last field
            r = RequestRecord._make((*r[:-1], self._clock_ns() - int(r.duration_ms * 1e6)))
        self._access_room -= 1
        self._access.append(r)

    def _new_http_series(self, r: RequestRecord, key: tuple[object, ...]) -> _HttpSeries | None:
        if len(self._http) + len(self._tcp) >= self.max_series:
            self.dropped["series"] += 1
            return None
        labels = _identity_labels(
            r.reporter, r.source, r.destination, r.destination_service, self.cluster
        )
        labels["request_protocol"] = r.protocol or "http"
        labels["response_code"] = str(r.status)
        labels["response_flags"] = r.flags or "-"
        labels["connection_security_policy"] = r.security_policy or UNKNOWN
        if r.protocol == "grpc":
            # Istio: present on gRPC requests only
            labels["grpc_response_status"] = r.grpc_status or UNKNOWN
        s = self._http[key] = _HttpSeries(labels)
        return s

    def _tcp_series(self, c: TcpRecord) -> _TcpSeries | None:
        s = self._tcp.get(c)
        if s is None:
            if len(self._http) + len(self._tcp) >= self.max_series:
                self.dropped["series"] += 1
                return None
            labels = _identity_labels(
                c.reporter, c.source, c.destination, c.destination_service, self.cluster
            )
            labels["request_protocol"] = "tcp"
            labels["response_flags"] = c.flags or "-"
            labels["connection_security_policy"] = c.security_policy or UNKNOWN
            s = self._tcp[c] = _TcpSeries(labels)
        return s

    def record_tcp_opened(self, c: TcpRecord) -> None:
        s = self._tcp_series(c)
        if s is not None:
            s.now[0] += 1

    def record_tcp_bytes(self, c: TcpRecord, sent: int, received: int) -> None:
        """Bytes relayed so far on an open connection (call as often as convenient)."""
        s = self._tcp_series(c)
        if s is not None:
            s.now[2] += sent
            s.now[3] += received

    def record_tcp_closed(self, c: TcpRecord, sent: int = 0, received: int = 0) -> None:
        """The connection ended; `sent`/`received` are bytes not yet reported."""
        s = self._tcp_series(c)
        if s is not None:
            s.now[1] += 1
            s.now[2] += sent
            s.now[3] += received

    def record_span(self, span: Span) -> None:
        if len(self._spans) < self.max_buffered:
            self._spans.append(span)
        else:
            self.dropped["spans"] += 1

    # ------------------------------------------------------------ batches for the bus

    def outgoing(self) -> list[Outgoing]:
        """What to publish now: per kind, the batch not yet acknowledged, else a new
        one cut from what accumulated (nothing when there is nothing new)."""
        out: list[Outgoing] = []
        for kind in wire.KINDS:
            pending = self._pending[kind]
            if pending is None:
                pending = self._pending[kind] = self._cut(kind)
            if pending is not None:
                out.append(pending)
        return out

    def acknowledge(self, kind: Kind) -> None:
        """The stream stored the pending batch of `kind`."""
        if self._pending[kind] is not None:
            self._pending[kind] = None
            self.published[kind] += 1

    def publish_failed(self, kind: Kind) -> None:
        self.publish_failures += 1

    def _cut(self, kind: Kind) -> Outgoing | None:
        if kind == "metrics":
            return self._cut_metrics()
        if kind == "spans":
            return self._cut_spans()
        return self._cut_access()

    def _next(self, kind: Kind) -> int:
        self._seq[kind] += 1
        return self._seq[kind]

    def metric_deltas(self, limit: int = 0) -> list[SeriesDelta]:
        """What was counted since it was last taken, marking it taken. With `limit`,
        at most about that many series (a label set's series stay together); the rest
        wait for the next call, so a batch stays well under the bus's payload limit."""
        self.fold()
        series: list[SeriesDelta] = []
        for s in self._http.values():
            if s.requests == s.sent_requests and not s.histograms_added:
                continue
            if limit and len(series) >= limit:
                return series
            n = s.requests - s.sent_requests
            s.sent_requests = s.requests
            s.histograms_added = False
            if n:
                series.append(CounterDelta(name=wire.REQUESTS_TOTAL, labels=s.labels, value=n))
            series.append(s.duration.delta(wire.REQUEST_DURATION_MS, s.labels, _DUR_LIST))
            series.append(s.request_size.delta(wire.REQUEST_BYTES, s.labels, _BYTES_LIST))
            series.append(s.response_size.delta(wire.RESPONSE_BYTES, s.labels, _BYTES_LIST))
        for t in self._tcp.values():
            if t.now == t.sent:
                continue
            if limit and len(series) >= limit:
                return series
            for i, name in enumerate(_TCP_NAMES):
                if t.now[i] != t.sent[i]:
                    series.append(
                        CounterDelta(name=name, labels=t.labels, value=t.now[i] - t.sent[i])
                    )
                    t.sent[i] = t.now[i]
        return series

    def _cut_metrics(self) -> Outgoing | None:
        series = self.metric_deltas(self.max_batch_series)
        if not series:
            return None
        now = self._clock_ns()
        seq = self._next("metrics")
        batch = MetricBatch(
            reporter=self.reporter_id,
            seq=seq,
            namespace=self.namespace,
            service=self.service,
            window_start_ns=self._window_start_ns,
            window_end_ns=now,
            series=series,
        )
        self._window_start_ns = now
        requests = sum(
            int(d.value)
            for d in series
            if isinstance(d, CounterDelta) and d.name == wire.REQUESTS_TOTAL
        )
        return Outgoing(
            "metrics", wire.message_id("metrics", self.reporter_id, seq), _encode(batch), requests
        )

    def _cut_spans(self) -> Outgoing | None:
        if not self._spans:
            return None
        spans = [
            self._spans.popleft() for _ in range(min(len(self._spans), self.max_batch_records))
        ]
        seq = self._next("spans")
        batch = SpanBatch(
            reporter=self.reporter_id,
            seq=seq,
            namespace=self.namespace,
            service=self.service,
            spans=spans,
        )
        return Outgoing(
            "spans", wire.message_id("spans", self.reporter_id, seq), _encode(batch), len(spans)
        )

    def _cut_access(self) -> Outgoing | None:
        self.fold()
        if not self._access:
            return None
        take = min(len(self._access), self.max_batch_records)
        popleft = self._access.popleft
        records = [_access_record(popleft()) for _ in range(take)]
        self._access_room += take
        seq = self._next("access")
        batch = AccessBatch(
            reporter=self.reporter_id,
            seq=seq,
            namespace=self.namespace,
            service=self.service,
            records=records,
        )
        return Outgoing(
            "access", wire.message_id("access", self.reporter_id, seq), _encode(batch), take
        )

    # ------------------------------------------------------------ /stats/prometheus

    def totals(self) -> MetricTotals:
        """Cumulative totals since the proxy started."""
        self.fold()
        totals = MetricTotals()
        for s in self._http.values():
            totals.add(CounterDelta(name=wire.REQUESTS_TOTAL, labels=s.labels, value=s.requests))
            for name, h, bounds in (
                (wire.REQUEST_DURATION_MS, s.duration, _DUR_LIST),
                (wire.REQUEST_BYTES, s.request_size, _BYTES_LIST),
                (wire.RESPONSE_BYTES, s.response_size, _BYTES_LIST),
            ):
                totals.add(
                    HistogramDelta(
                        name=name,
                        labels=s.labels,
                        bounds=bounds,
                        counts=h.counts,
                        sum=h.sum,
                        count=sum(h.counts),
                    )
                )
        for t in self._tcp.values():
            for i, name in enumerate(_TCP_NAMES):
                totals.add(CounterDelta(name=name, labels=t.labels, value=t.now[i]))
        return totals

    def describe(self) -> Iterable[Metric]:
        # registering must not run collect(); names are fixed and do not collide
        return []

    def collect(self) -> Iterable[Metric]:
        yield from self.totals().families()
        dropped = CounterMetricFamily(
            "meshwork_telemetry_dropped_total",
            "Telemetry dropped in the proxy: buffer full (access, spans) or too many series",
            labels=["kind"],
        )
        for kind, n in self.dropped.items():
            dropped.add_metric([kind], n)
        yield dropped
        published = CounterMetricFamily(
            "meshwork_telemetry_batches_published_total",
            "Telemetry batches stored by the stream",
            labels=["kind"],
        )
        for kind, n in self.published.items():
            published.add_metric([kind], n)
        yield published


_encoder = msgspec.msgpack.Encoder()


def _encode(batch: MetricBatch | SpanBatch | AccessBatch) -> bytes:
    return bytes(_encoder.encode(batch))


def _access_record(r: RequestRecord) -> AccessRecord:
    # positional, in the Struct's field order: a third of the cost of keywords
    src, dst = r.source, r.destination
    return AccessRecord(
        r.start_ns,
        "source" if r.reporter == "source" else "destination",
        r.method,
        r.authority,
        r.path,
        r.status,
        round(r.duration_ms, 3),
        r.protocol or "http",
        r.flags or "-",
        r.request_bytes,
        r.response_bytes,
        r.upstream_host,
        src.principal or UNKNOWN,
        dst.principal or UNKNOWN,
        src.name or UNKNOWN,
        src.namespace or UNKNOWN,
        dst.name or UNKNOWN,
        dst.namespace or UNKNOWN,
        r.destination_service or UNKNOWN,
        r.request_id,
        r.trace_id,
        r.dry_run_result,
        r.dry_run_policy,
    )
