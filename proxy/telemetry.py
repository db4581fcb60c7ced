"""The sidecar's telemetry: Istio-named metrics, access records and spans (DESIGN §8).

Pure core, thin I/O shell:

- `TelemetryRecorder` (no I/O) is called by the data path once per request
  (`record_request(RequestRecord(...))`) and per TCP connection (`record_tcp_*`). It
  aggregates in-process into label-keyed counters and histograms, kept cumulative for
  the admin `/stats/prometheus` (register the recorder in a prometheus_client
  `CollectorRegistry`) and cut into delta batches for the bus. Access records and spans
  wait in bounded buffers; past the bound they are dropped and counted
  (`meshwork_telemetry_dropped_total{kind}`). Metric deltas are never dropped while the
  bus is down: they keep accumulating and leave in the next batch that gets through.
- `TelemetryPublisher` (I/O) publishes, every second, what the recorder has cut to the
  JetStream subjects `<prefix>.telemetry.<kind>.<ns>.<svc>`, with `Nats-Msg-Id` set.
  A batch that was not acknowledged is re-sent unchanged with the same id (JetStream
  drops the duplicate; the telemetry service applies a reporter's batch number once),
  so a request is counted exactly once mesh-wide.
- Tracing helpers (pure): W3C `traceparent`/`tracestate`, B3 (multi and single
  header) in, both out; `Sampler` (default 1 %, an incoming decision wins);
  `start_span(headers, kind, ...) -> (SpanContext, headers_to_forward)`,
  `replace_trace_headers`, `finish_span`.

Peer metadata: the data path learns the other side's workload from
`PEER_METADATA_HEADER` (`encode_peer_metadata`/`decode_peer_metadata`); the peer's
*principal* must come from its mTLS certificate, never from that header.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from bisect import bisect_left as _bisect
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import msgspec
import nats.errors
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh import telemetry as wire
from mesh.bus import Bus
from mesh.logs import get_logger
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

log = get_logger("proxy.telemetry")

Headers = list[tuple[str, str]]
UNKNOWN = "unknown"

# ================================================================ records the data path fills


class Workload(NamedTuple):
    """One side of a request. The data path keeps one per peer and reuses it: the
    recorder keys its series by these tuples."""

    name: str = UNKNOWN  # workload, e.g. "reviews-v2"
    namespace: str = UNKNOWN
    principal: str = UNKNOWN  # spiffe://<td>/ns/<ns>/sa/<sa>, from the peer certificate
    app: str = UNKNOWN
    version: str = UNKNOWN


class RequestRecord(NamedTuple):
    """One finished HTTP request, as one proxy saw it.

    `reporter` is "source" in the client's sidecar (outbound) and "destination" in the
    server's (inbound). `status` 0 means no response; `flags` are Envoy response flags
    ("-" for none, e.g. "UH", "UF", "NR"). `security_policy`: "mutual_tls", "none" or
    "unknown" (Istio reports "unknown" on the source side).
    """

    reporter: str
    source: Workload
    destination: Workload
    destination_service: str  # canonical host, e.g. "reviews.default.svc.cluster.local"
    method: str
    authority: str
    path: str
    status: int
    duration_ms: float
    request_bytes: int = 0
    response_bytes: int = 0
    flags: str = "-"
    upstream_host: str = ""
    request_id: str = ""
    trace_id: str = ""
    protocol: str = "http"
    security_policy: str = UNKNOWN
    start_ns: int = 0  # unix ns; 0 = now minus the duration


class TcpRecord(NamedTuple):
    """The identity of one relayed TCP connection (bytes are passed separately)."""

    reporter: str
    source: Workload
    destination: Workload
    destination_service: str
    security_policy: str = UNKNOWN
    flags: str = "-"


class Outgoing(NamedTuple):
    """One encoded batch ready to publish; re-sent unchanged until acknowledged."""

    kind: Kind
    msg_id: str
    payload: bytes
    records: int


def workload_name(service: str, version: str = "") -> str:
    """Istio's `*_workload` for a Meshwork instance: `reviews-v2` (a Deployment's name
    there), or the bare service without a version. Both sides of a request must name
    a workload alike: the destination names itself, the source names the endpoint."""
    return f"{service}-{version}" if version else service


def split_service_host(host: str) -> tuple[str, str]:
    """`reviews.default.svc.cluster.local` -> ("reviews", "default"); other hosts (a
    ServiceEntry's `api.example.com`) have no service namespace."""
    if not host:
        return UNKNOWN, UNKNOWN
    parts = host.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        return parts[0], parts[1]
    return host, UNKNOWN


def _v(value: str) -> str:
    return value or UNKNOWN


def _identity_labels(reporter: str, src: Workload, dst: Workload, service: str) -> dict[str, str]:
    name, ns = split_service_host(service)
    return {
        "reporter": reporter,
        "source_workload": _v(src.name),
        "source_workload_namespace": _v(src.namespace),
        "source_principal": _v(src.principal),
        "source_app": _v(src.app),
        "source_version": _v(src.version),
        "destination_workload": _v(dst.name),
        "destination_workload_namespace": _v(dst.namespace),
        "destination_principal": _v(dst.principal),
        "destination_service": _v(service),
        "destination_service_name": name,
        "destination_service_namespace": ns,
        "destination_app": _v(dst.app),
        "destination_version": _v(dst.version),
    }


# ================================================================ in-process aggregation

_DUR = DURATION_BUCKETS_MS
_BYTES = BYTES_BUCKETS
_DUR_LIST = [float(b) for b in _DUR]
_BYTES_LIST = [float(b) for b in _BYTES]


class _Hist:
    """A histogram with what was already sent, so a flush takes the difference."""

    __slots__ = ("count", "counts", "sent_count", "sent_counts", "sent_sum", "sum")

    def __init__(self, buckets: int):
        self.counts = [0] * (buckets + 1)
        self.sum = 0.0
        self.count = 0
        self.sent_counts = [0] * (buckets + 1)
        self.sent_sum = 0.0
        self.sent_count = 0

    def delta(self, name: str, labels: dict[str, str], bounds: list[float]) -> HistogramDelta:
        d = HistogramDelta(
            name=name,
            labels=labels,
            bounds=bounds,
            counts=[a - b for a, b in zip(self.counts, self.sent_counts, strict=True)],
            sum=self.sum - self.sent_sum,
            count=self.count - self.sent_count,
        )
        self.sent_counts = list(self.counts)
        self.sent_sum = self.sum
        self.sent_count = self.count
        return d


class _HttpSeries:
    __slots__ = ("duration", "labels", "request_size", "requests", "response_size", "sent_requests")

    def __init__(self, labels: dict[str, str]):
        self.labels = labels
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
        access_log: bool = True,
        clock_ns: Callable[[], int] = time.time_ns,
    ):
        if not wire.valid_reporter(reporter_id):
            raise ValueError(f"invalid reporter id {reporter_id!r}")
        self.reporter_id = reporter_id
        self.namespace = namespace
        self.service = service
        self.instance = instance
        self.max_series = max_series
        self.max_buffered = max_buffered
        self.max_batch_records = max_batch_records
        self.max_batch_series = max_batch_series
        self.access_log = access_log
        self._clock_ns = clock_ns
        self._http: dict[tuple[object, ...], _HttpSeries] = {}
        self._tcp: dict[TcpRecord, _TcpSeries] = {}
        self._access: deque[tuple[RequestRecord, int]] = deque()
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
        key = (
            r.reporter,
            r.source,
            r.destination,
            r.destination_service,
            r.status,
            r.flags,
            r.protocol,
            r.security_policy,
        )
        s = self._http.get(key)
        if s is None:
            s = self._new_http_series(r, key)
        if s is not None:
            s.requests += 1
            d = r.duration_ms
            h = s.duration
            h.counts[_bisect(_DUR, d)] += 1
            h.sum += d
            h.count += 1
            n = r.request_bytes
            h = s.request_size
            h.counts[_bisect(_BYTES, n)] += 1
            h.sum += n
            h.count += 1
            n = r.response_bytes
            h = s.response_size
            h.counts[_bisect(_BYTES, n)] += 1
            h.sum += n
            h.count += 1
        if self.access_log:
            if len(self._access) < self.max_buffered:
                self._access.append((r, r.start_ns or self._clock_ns() - int(r.duration_ms * 1e6)))
            else:
                self.dropped["access"] += 1

    def _new_http_series(self, r: RequestRecord, key: tuple[object, ...]) -> _HttpSeries | None:
        if len(self._http) + len(self._tcp) >= self.max_series:
            self.dropped["series"] += 1
            return None
        labels = _identity_labels(r.reporter, r.source, r.destination, r.destination_service)
        labels["request_protocol"] = r.protocol or "http"
        labels["response_code"] = str(r.status)
        labels["response_flags"] = r.flags or "-"
        labels["connection_security_policy"] = r.security_policy or UNKNOWN
        s = self._http[key] = _HttpSeries(labels)
        return s

    def _tcp_series(self, c: TcpRecord) -> _TcpSeries | None:
        s = self._tcp.get(c)
        if s is None:
            if len(self._http) + len(self._tcp) >= self.max_series:
                self.dropped["series"] += 1
                return None
            labels = _identity_labels(c.reporter, c.source, c.destination, c.destination_service)
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
        series: list[SeriesDelta] = []
        for s in self._http.values():
            if s.requests == s.sent_requests:
                continue
            if limit and len(series) >= limit:
                return series
            series.append(
                CounterDelta(
                    name=wire.REQUESTS_TOTAL, labels=s.labels, value=s.requests - s.sent_requests
                )
            )
            s.sent_requests = s.requests
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
        if not self._access:
            return None
        take = min(len(self._access), self.max_batch_records)
        records = [_access_record(*self._access.popleft()) for _ in range(take)]
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
                        count=h.count,
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


def _access_record(r: RequestRecord, start_ns: int) -> AccessRecord:
    return AccessRecord(
        time_ns=start_ns,
        reporter="source" if r.reporter == "source" else "destination",
        method=r.method,
        authority=r.authority,
        path=r.path,
        protocol=r.protocol or "http",
        status=r.status,
        response_flags=r.flags or "-",
        duration_ms=round(r.duration_ms, 3),
        bytes_received=r.request_bytes,
        bytes_sent=r.response_bytes,
        upstream_host=r.upstream_host,
        source_principal=_v(r.source.principal),
        destination_principal=_v(r.destination.principal),
        source_workload=_v(r.source.name),
        source_namespace=_v(r.source.namespace),
        destination_workload=_v(r.destination.name),
        destination_namespace=_v(r.destination.namespace),
        destination_service=_v(r.destination_service),
        request_id=r.request_id,
        trace_id=r.trace_id,
    )


# ================================================================ publisher (I/O)


class TelemetryPublisher:
    """Publishes a recorder's batches every `interval` seconds; never raises into the
    data path and never holds a request: the recorder only buffers."""

    MAX_ROUNDS = 8  # batches per kind per flush, when a backlog drains after an outage

    def __init__(
        self,
        recorder: TelemetryRecorder,
        bus: Bus,
        *,
        interval: float = 1.0,
        publish_timeout: float = 2.0,
    ):
        self.recorder = recorder
        self.bus = bus
        self.interval = interval
        self.publish_timeout = publish_timeout
        self._stream = wire.stream_name(bus.subjects.prefix)
        self._subjects = {
            kind: bus.subjects.telemetry(kind, recorder.namespace, recorder.service)
            for kind in wire.KINDS
        }
        self._unavailable_logged = False

    async def run(self) -> None:
        """Flush every `interval` until cancelled; then one last flush, bounded."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                await self.flush()
        except asyncio.CancelledError:
            try:
                await asyncio.wait_for(self.flush(), self.publish_timeout)
            except (TimeoutError, asyncio.CancelledError):
                pass
            raise

    async def flush(self) -> int:
        """Publish what is ready; returns the number of batches stored. Stops at the
        first failure (the bus or the stream is unavailable) and retries next time."""
        if not self.bus.connected:
            return 0
        js = self.bus.nc.jetstream()
        stored = 0
        for _ in range(self.MAX_ROUNDS):
            batch = self.recorder.outgoing()
            if not batch:
                break
            for out in batch:
                try:
                    await js.publish(
                        self._subjects[out.kind],
                        out.payload,
                        timeout=self.publish_timeout,
                        stream=self._stream,
                        headers={wire.MSG_ID_HEADER: out.msg_id},
                    )
                except (nats.errors.Error, TimeoutError, OSError) as e:
                    self.recorder.publish_failed(out.kind)
                    if not self._unavailable_logged:
                        log.warning(
                            "telemetry.publish_failed",
                            kind=out.kind,
                            msg_id=out.msg_id,
                            error=repr(e),
                        )
                        self._unavailable_logged = True
                    return stored
                self.recorder.acknowledge(out.kind)
                stored += 1
            if self._unavailable_logged:
                log.info("telemetry.publish_resumed", reporter=self.recorder.reporter_id)
                self._unavailable_logged = False
        return stored


# ================================================================ tracing (pure)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
B3 = "b3"
X_B3_TRACEID = "x-b3-traceid"
X_B3_SPANID = "x-b3-spanid"
X_B3_PARENTSPANID = "x-b3-parentspanid"
X_B3_SAMPLED = "x-b3-sampled"
X_B3_FLAGS = "x-b3-flags"
# every header `replace_trace_headers` removes before adding the forwarded ones
TRACE_HEADERS: frozenset[str] = frozenset(
    {
        TRACEPARENT,
        TRACESTATE,
        B3,
        X_B3_TRACEID,
        X_B3_SPANID,
        X_B3_PARENTSPANID,
        X_B3_SAMPLED,
        X_B3_FLAGS,
    }
)
PEER_METADATA_HEADER = "x-meshwork-peer"

_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_ZERO16 = "0" * 16
_ZERO32 = "0" * 32


class IncomingTrace(NamedTuple):
    """The trace context a request arrived with. Empty `trace_id`: none (or invalid).
    `sampled` None: the sender left the decision to us."""

    trace_id: str = ""
    span_id: str = ""
    sampled: bool | None = None
    tracestate: str = ""
    b3_single: bool = False


class SpanContext(NamedTuple):
    trace_id: str
    span_id: str
    parent_span_id: str
    sampled: bool
    kind: str  # "client" | "server"
    name: str
    service: str
    namespace: str
    instance: str
    start_ns: int
    tracestate: str = ""


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """(trace_id, parent_id, sampled) from a W3C `traceparent`, None when invalid."""
    m = _TRACEPARENT_RE.fullmatch(value.strip())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == _ZERO32 or span_id == _ZERO16:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def format_traceparent(trace_id: str, span_id: str, sampled: bool) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def _b3_trace_id(value: str) -> str:
    v = value.strip().lower()
    if _HEX16.fullmatch(v):
        v = _ZERO16 + v  # 64-bit B3 ids are the low half of a W3C id
    if not _HEX32.fullmatch(v) or v == _ZERO32:
        return ""
    return v


def _b3_sampled(value: str) -> bool | None:
    v = value.strip().lower()
    if v in ("1", "true", "d"):
        return True
    if v in ("0", "false"):
        return False
    return None


def parse_b3_single(value: str) -> IncomingTrace | None:
    """`b3: {trace}-{span}[-{1|0|d}[-{parent}]]`, or just `b3: {1|0|d}`."""
    parts = value.strip().lower().split("-")
    if len(parts) == 1:
        sampled = _b3_sampled(parts[0])
        return None if sampled is None else IncomingTrace(sampled=sampled, b3_single=True)
    trace_id = _b3_trace_id(parts[0])
    span_id = parts[1]
    if not trace_id or not _HEX16.fullmatch(span_id) or span_id == _ZERO16:
        return None
    sampled = _b3_sampled(parts[2]) if len(parts) > 2 else None
    return IncomingTrace(trace_id, span_id, sampled, "", True)


def extract_trace(headers: Iterable[tuple[str, str]]) -> IncomingTrace:
    """The incoming context: W3C first, then B3 multi-header, then B3 single-header.
    `b3_single` records whether the sender used the single `b3` header, so it is
    propagated in that form too."""
    found: dict[str, str] = {}
    for name, value in headers:
        n = name.lower()
        if n in TRACE_HEADERS and n not in found:
            found[n] = value
    if not found:
        return IncomingTrace()
    return _pick_context(found)._replace(b3_single=B3 in found)


def _pick_context(found: dict[str, str]) -> IncomingTrace:
    tp = found.get(TRACEPARENT)
    if tp is not None:
        parsed = parse_traceparent(tp)
        if parsed is not None:
            return IncomingTrace(parsed[0], parsed[1], parsed[2], found.get(TRACESTATE, "").strip())
    b3_sampled = _b3_sampled(found.get(X_B3_SAMPLED, ""))
    if found.get(X_B3_FLAGS, "").strip() == "1":
        b3_sampled = True
    tid, sid = found.get(X_B3_TRACEID), found.get(X_B3_SPANID)
    if tid is not None and sid is not None:
        trace_id = _b3_trace_id(tid)
        span_id = sid.strip().lower()
        if trace_id and _HEX16.fullmatch(span_id) and span_id != _ZERO16:
            return IncomingTrace(trace_id, span_id, b3_sampled)
    single = found.get(B3)
    if single is not None:
        parsed_single = parse_b3_single(single)
        if parsed_single is not None:
            return parsed_single
    # ids missing or invalid: a sampling decision alone still binds us
    return IncomingTrace(sampled=b3_sampled)


class Sampler:
    """Samples a `rate` fraction of new traces, decided on the trace id so every proxy
    that has to decide about the same trace decides alike."""

    def __init__(self, rate: float = 0.01):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"sampling rate must be within [0, 1], got {rate}")
        self.rate = rate
        self._threshold = int(rate * (1 << 64))

    def decide(self, trace_id: str) -> bool:
        return int(trace_id[16:32], 16) < self._threshold


DEFAULT_SAMPLER = Sampler(0.01)
_rng = random.Random()


def new_trace_id(rng: random.Random | None = None) -> str:
    return f"{(rng or _rng).getrandbits(128) or 1:032x}"


def new_span_id(rng: random.Random | None = None) -> str:
    return f"{(rng or _rng).getrandbits(64) or 1:016x}"


def start_span(
    headers: Iterable[tuple[str, str]],
    kind: str,
    *,
    name: str,
    service: str,
    namespace: str,
    instance: str,
    sampler: Sampler = DEFAULT_SAMPLER,
    now_ns: int | None = None,
    rng: random.Random | None = None,
) -> tuple[SpanContext, Headers]:
    """Open a span for a request carrying `headers`: a child of the incoming context,
    or the root of a new trace. Returns the context and the trace headers to send on
    (`replace_trace_headers` swaps them in): `traceparent` (+ `tracestate`), the B3
    headers, and `b3` when the request came with the single-header form."""
    incoming = extract_trace(headers)
    trace_id = incoming.trace_id or new_trace_id(rng)
    sampled = incoming.sampled if incoming.sampled is not None else sampler.decide(trace_id)
    ctx = SpanContext(
        trace_id=trace_id,
        span_id=new_span_id(rng),
        parent_span_id=incoming.span_id if incoming.trace_id else "",
        sampled=sampled,
        kind=kind,
        name=name,
        service=service,
        namespace=namespace,
        instance=instance,
        start_ns=time.time_ns() if now_ns is None else now_ns,
        tracestate=incoming.tracestate if incoming.trace_id else "",
    )
    return ctx, trace_headers(ctx, b3_single=incoming.b3_single)


def trace_headers(ctx: SpanContext, *, b3_single: bool = False) -> Headers:
    flag = "1" if ctx.sampled else "0"
    out: Headers = [(TRACEPARENT, format_traceparent(ctx.trace_id, ctx.span_id, ctx.sampled))]
    if ctx.tracestate:
        out.append((TRACESTATE, ctx.tracestate))
    out.append((X_B3_TRACEID, ctx.trace_id))
    out.append((X_B3_SPANID, ctx.span_id))
    if ctx.parent_span_id:
        out.append((X_B3_PARENTSPANID, ctx.parent_span_id))
    out.append((X_B3_SAMPLED, flag))
    if b3_single:
        parent = f"-{ctx.parent_span_id}" if ctx.parent_span_id else ""
        out.append((B3, f"{ctx.trace_id}-{ctx.span_id}-{flag}{parent}"))
    return out


def replace_trace_headers(
    headers: Iterable[tuple[str, str]], forward: Sequence[tuple[str, str]]
) -> Headers:
    """`headers` without any incoming trace header, plus `forward`."""
    return [(n, v) for n, v in headers if n.lower() not in TRACE_HEADERS] + list(forward)


def finish_span(
    ctx: SpanContext,
    *,
    status_code: int,
    end_ns: int | None = None,
    error: bool | None = None,
    attributes: dict[str, str] | None = None,
) -> Span | None:
    """The finished span to `record_span`, or None when the trace is not sampled."""
    if not ctx.sampled:
        return None
    return Span(
        trace_id=ctx.trace_id,
        span_id=ctx.span_id,
        parent_span_id=ctx.parent_span_id,
        name=ctx.name,
        kind="server" if ctx.kind == "server" else "client",
        service=ctx.service,
        namespace=ctx.namespace,
        instance=ctx.instance,
        start_ns=ctx.start_ns,
        end_ns=time.time_ns() if end_ns is None else end_ns,
        status_code=status_code,
        error=(status_code == 0 or status_code >= 500) if error is None else error,
        attributes=attributes or {},
    )


# ================================================================ peer metadata


def encode_peer_metadata(w: Workload) -> str:
    """The value of `PEER_METADATA_HEADER` a proxy sends about its own workload."""
    return f"workload={w.name};namespace={w.namespace};app={w.app};version={w.version}"


def decode_peer_metadata(value: str | None, principal: str = UNKNOWN) -> Workload:
    """The peer's workload from its metadata header; `principal` comes from its
    certificate (the header is informational only, never an identity)."""
    fields: dict[str, str] = {}
    for part in (value or "").split(";"):
        k, sep, v = part.partition("=")
        if sep and v.strip():
            fields[k.strip()] = v.strip()[:253]
    return Workload(
        name=fields.get("workload", UNKNOWN),
        namespace=fields.get("namespace", UNKNOWN),
        principal=principal or UNKNOWN,
        app=fields.get("app", UNKNOWN),
        version=fields.get("version", UNKNOWN),
    )
