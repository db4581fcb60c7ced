"""Envoy's request counters and histograms -> the recorder's series (pure, no I/O).

With `--envoy-telemetry stats` (docs/architecture.md §7) every HCM has Envoy's stats
access logger (`proxy.envoy.translate.access_log.stats_access_log`): per listener
(`meshwork.<log name>.`) a counter `requests` and histograms `duration` (ms),
`request_bytes` and `response_bytes`, all tagged with what `AccessLogConverter` reads
from a gRPC access-log entry (`STATS_TAGS`). Once a second the agent reads them from
Envoy's admin (`/stats?format=prometheus&usedonly&filter=^meshwork\\.`), and:

- `parse_request_stats` turns the text into one `SeriesSnapshot` per tag set:
  cumulative request count and cumulative histograms;
- `RequestStatsDeltas.update` takes the difference from the previous read (a counter
  that went down means Envoy restarted: its whole value is new);
- `StatsIngest` names each series as the gRPC access-log path would (reporter, both
  workloads, destination service, response code and flags, gRPC status, protocol,
  security policy) and adds the deltas to the `TelemetryRecorder`, which publishes
  the same Istio series as in the default mode.

What differs from the access-log mode: Envoy's histograms are approximate (log-linear
bins of two significant digits: a value within about 1 % of a bucket bound may land in
the next bucket, and `_sum` is the sum of bin midpoints); `%DURATION%` is whole
milliseconds; and Envoy merges histograms just after the admin read that flushes them
(`stats_flush_on_admin`), so bucket counts arrive one read (a second) after their
requests are counted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from mesh.hosts import strip_port
from mesh.telemetry import BYTES_BUCKETS, DURATION_BUCKETS_MS
from proxy.envoy.access_log_convert import (
    HTTP_LOG_REPORTERS,
    RBAC_FLAG,
    AccessLogConverter,
    AccessLogError,
    cluster_service,
    one_spiffe_id,
)
from proxy.envoy.resources import PASSTHROUGH_CLUSTER
from proxy.envoy.translate.access_log import (
    DURATION_STAT,
    REQUEST_BYTES_STAT,
    REQUESTS_STAT,
    RESPONSE_BYTES_STAT,
    STATS_PREFIX,
)
from proxy.telemetry.recorder import BucketCounts, TelemetryRecorder
from proxy.telemetry.records import UNKNOWN, RequestRecord

# the admin path the agent reads (Prometheus text: tags as labels, escaped values)
ADMIN_STATS_PATH = f"/stats?format=prometheus&usedonly&filter=%5E{STATS_PREFIX}%5C."

HISTOGRAMS = (DURATION_STAT, REQUEST_BYTES_STAT, RESPONSE_BYTES_STAT)
_BOUNDS: Mapping[str, tuple[float, ...]] = {
    DURATION_STAT: DURATION_BUCKETS_MS,
    REQUEST_BYTES_STAT: BYTES_BUCKETS,
    RESPONSE_BYTES_STAT: BYTES_BUCKETS,
}
_METRICS = "|".join(
    [REQUESTS_STAT, *(f"{h}_{part}" for h in HISTOGRAMS for part in ("bucket", "sum", "count"))]
)
_NAME = re.compile(rf"^envoy_{STATS_PREFIX}_([a-z0-9]+)_({_METRICS})$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = re.compile(r"\\(.)")
_RBAC_DENIED = "rbac_access_denied"


class StatsError(ValueError):
    """Envoy's stats text is not what the stats access logger produces (the message
    says which line, never its values)."""


class SeriesKey(NamedTuple):
    log_name: str  # outbound, inbound, gateway
    tags: tuple[tuple[str, str], ...]  # as Envoy lists them


@dataclass
class Histogram:
    """Cumulative: counts at each `le` bound (the last one +Inf), their sum."""

    bounds: list[float] = field(default_factory=list)
    cumulative: list[int] = field(default_factory=list)
    sum: float = 0.0


@dataclass
class SeriesSnapshot:
    requests: int = 0
    histograms: dict[str, Histogram] = field(default_factory=dict)


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return _UNESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


_METRIC_NAMES: dict[str, tuple[str, str] | None] = {}
_LABEL_SETS: dict[str, tuple[tuple[str, str], ...]] = {}
_MAX_MEMO = 65_536


def _metric(name: str) -> tuple[str, str] | None:
    """`envoy_meshwork_<log>_<metric>` -> (log name, metric); None for another stat."""
    found = _METRIC_NAMES.get(name, ())
    if found == ():
        m = _NAME.match(name)
        found = (m.group(1), m.group(2)) if m else None
        if len(_METRIC_NAMES) < _MAX_MEMO:
            _METRIC_NAMES[name] = found
    return found  # type: ignore[return-value]


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    """`k="v",...` -> ((k, v), ...); memoised: the same label sets come every read."""
    found = _LABEL_SETS.get(text)
    if found is None:
        found = tuple((k, _unescape(v)) for k, v in _LABEL.findall(text))
        if len(_LABEL_SETS) >= _MAX_MEMO:
            _LABEL_SETS.clear()
        _LABEL_SETS[text] = found
    return found


def parse_request_stats(text: str) -> dict[SeriesKey, SeriesSnapshot]:
    """The stats access logger's series in Envoy's Prometheus text, keyed by listener
    and tags; other lines (comments, other stats) are skipped. Costs a few string
    splits and dict lookups per line (the label sets and names are memoised)."""
    found: dict[SeriesKey, SeriesSnapshot] = {}
    prefix = f"envoy_{STATS_PREFIX}_"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith(prefix):
            continue
        name, brace, rest = line.partition("{")
        labels, close, raw = rest.rpartition("} ")
        parsed = _metric(name) if brace and close else None
        if parsed is None:
            continue
        log_name, metric = parsed
        try:
            value = float(raw)
        except ValueError:
            raise StatsError(f"line {number}: {metric} value is not a number") from None
        le = ""
        if metric.endswith("_bucket"):
            # Envoy puts `le` last: the series' tags are the label text before it
            tags, sep, le_text = labels.rpartition(',le="')
            if not sep and labels.startswith('le="'):
                tags, sep, le_text = "", 'le="', labels[4:]
            if not sep or not le_text.endswith('"'):
                raise StatsError(f"line {number}: {metric} without an le label")
            le = le_text[:-1]
            pairs = _labels(tags)
        else:
            pairs = _labels(labels)
        series = found.get((log_name, pairs))  # type: ignore[call-overload]
        if series is None:
            series = found[SeriesKey(log_name, pairs)] = SeriesSnapshot()
        if metric == REQUESTS_STAT:
            series.requests = int(value)
            continue
        hist, _, part = metric.rpartition("_")
        h = series.histograms.get(hist)
        if h is None:
            h = series.histograms[hist] = Histogram()
        if part == "bucket":
            try:
                h.bounds.append(math.inf if le == "+Inf" else float(le))
            except ValueError:
                raise StatsError(f"line {number}: {metric} le is not a number") from None
            h.cumulative.append(int(value))
        elif part == "sum":
            h.sum = value
    return found


def _empty(histogram: str) -> BucketCounts:
    return [0] * (len(_BOUNDS[histogram]) + 1), 0.0


class SeriesDelta(NamedTuple):
    key: SeriesKey
    requests: int
    # histogram name -> (per-bucket counts in the recorder's buckets, sum)
    histograms: Mapping[str, BucketCounts]


def rebucket(h: Histogram, bounds: tuple[float, ...]) -> list[int]:
    """Cumulative counts at `h.bounds` -> per-bucket counts at `bounds` (plus one past
    them). Exact when Envoy uses the same bounds (the bootstrap's `stats_config`);
    otherwise each bound takes the count at the largest of Envoy's bounds below it."""
    if not h.cumulative:
        return [0] * (len(bounds) + 1)
    at: list[int] = []
    j = -1
    for b in bounds:
        while j + 1 < len(h.bounds) and h.bounds[j + 1] <= b:
            j += 1
        at.append(h.cumulative[j] if j >= 0 else 0)
    at.append(h.cumulative[-1])
    return [at[0], *(at[i] - at[i - 1] for i in range(1, len(at)))]


def _minus(now: Histogram, before: Histogram | None) -> Histogram:
    if before is None or before.bounds != now.bounds:
        return now
    diff = [a - b for a, b in zip(now.cumulative, before.cumulative, strict=True)]
    if any(d < 0 for d in diff):  # Envoy restarted: all of it is new
        return now
    return Histogram(now.bounds, diff, now.sum - before.sum)


class RequestStatsDeltas:
    """What each read of Envoy's stats adds to the previous one."""

    def __init__(self) -> None:
        self._last: dict[SeriesKey, SeriesSnapshot] = {}

    def update(self, snapshot: dict[SeriesKey, SeriesSnapshot]) -> list[SeriesDelta]:
        out: list[SeriesDelta] = []
        last = self._last
        for key, now in snapshot.items():
            before = last.get(key)
            requests = now.requests - (before.requests if before else 0)
            if requests < 0:  # a counter went down: Envoy restarted
                requests = now.requests
            histograms: dict[str, BucketCounts] = {}
            for name, h in now.histograms.items():
                d = _minus(h, before.histograms.get(name) if before else None)
                counts = rebucket(d, _BOUNDS[name])
                if any(counts):
                    histograms[name] = (counts, max(0.0, d.sum))
            if requests or histograms:
                out.append(SeriesDelta(key, requests, histograms))
        self._last = snapshot
        return out


def series_record(converter: AccessLogConverter, key: SeriesKey) -> RequestRecord:
    """The `RequestRecord` naming a series, as `AccessLogConverter.http` names an entry
    with the same fields (its timing and sizes are zero: they come as histograms)."""
    reporter = HTTP_LOG_REPORTERS.get(key.log_name)
    if reporter is None:
        raise AccessLogError(
            f"request stats of {key.log_name!r}: not one of {sorted(HTTP_LOG_REPORTERS)}"
        )
    tags = dict(key.tags)
    authority = tags.get("authority", "")
    if reporter == "source":
        cluster = tags.get("upstream_cluster", "")
        service = cluster_service(cluster) or converter.service_of(authority)
        if cluster == PASSTHROUGH_CLUSTER:
            service = strip_port(authority).lower()
        source = converter.local.workload
        destination = converter.destination(service, tags.get("upstream_host", ""))
        policy = UNKNOWN
    else:
        service = converter.local.service_host
        spiffe = _one_spiffe_id(tags.get("peer_san", ""))
        source = converter.caller(tags.get("peer", ""), spiffe)
        destination = converter.local.workload
        policy = "mutual_tls" if spiffe else "none"
    flags = tags.get("response_flags", "") or "-"
    if tags.get("details", "").startswith(_RBAC_DENIED):
        flags = RBAC_FLAG if flags == "-" else f"{flags},{RBAC_FLAG}"
    grpc_status = tags.get("grpc_status", "")
    grpc = grpc_status or tags.get("content_type", "").startswith("application/grpc")
    code = tags.get("response_code", "0")
    return RequestRecord(
        reporter=reporter,
        source=source,
        destination=destination,
        destination_service=service or UNKNOWN,
        method="-",
        authority=authority,
        path="",
        status=int(code) if code.isdigit() else 0,
        duration_ms=0.0,
        flags=flags,
        upstream_host=tags.get("upstream_host", ""),
        protocol="grpc" if grpc else "http",
        security_policy=policy,
        grpc_status=grpc_status,
    )


def _one_spiffe_id(sans: str) -> str:
    """`%DOWNSTREAM_PEER_URI_SAN%` (comma-joined URI SANs) -> the peer's SPIFFE ID, as
    `access_log_convert.peer_spiffe_id` reads a logged certificate."""
    return one_spiffe_id([u for u in sans.split(",") if u])


@dataclass
class StatsCounts:
    reads: int = 0
    unchanged: int = 0  # reads whose text was the previous read's (not parsed)
    series: int = 0  # series deltas added to the recorder
    failed: int = 0  # series that could not be named (an unknown listener)


class StatsIngest:
    """Feeds each read of Envoy's request stats to the recorder (no I/O)."""

    def __init__(self, converter: AccessLogConverter, recorder: TelemetryRecorder):
        self.converter = converter
        self.recorder = recorder
        self.deltas = RequestStatsDeltas()
        self.counts = StatsCounts()
        self._last_text = ""

    def on_stats(self, text: str) -> list[SeriesDelta]:
        """Add what changed since the previous read; returns it (for tests and logs).
        A text equal to the previous read's (an idle sidecar's every second) adds
        nothing and is not parsed again."""
        self.counts.reads += 1
        if text == self._last_text:
            self.counts.unchanged += 1
            return []
        deltas = self.deltas.update(parse_request_stats(text))
        self._last_text = text
        for d in deltas:
            # named again each time (the converter memoises): an endpoint registered
            # since the last read names the destination from now on
            try:
                record = series_record(self.converter, d.key)
            except AccessLogError:
                self.counts.failed += 1
                continue
            h = d.histograms
            self.recorder.record_series(
                record,
                d.requests,
                h.get(DURATION_STAT) or _empty(DURATION_STAT),
                h.get(REQUEST_BYTES_STAT) or _empty(REQUEST_BYTES_STAT),
                h.get(RESPONSE_BYTES_STAT) or _empty(RESPONSE_BYTES_STAT),
            )
            self.counts.series += 1
        return deltas
