"""What the telemetry API shows, computed without I/O: the service graph over a time
window (from periodic samples of the mesh-wide totals), traces assembled as trees,
and the recent access records."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any, NamedTuple

import msgspec

from mesh.grpc_status import grpc_status_label
from mesh.telemetry import (
    DURATION_BUCKETS_MS,
    REQUEST_DURATION_MS,
    REQUESTS_TOTAL,
    AccessRecord,
    MetricTotals,
    Span,
    histogram_quantile,
)

_BOUNDS = tuple(float(b) for b in DURATION_BUCKETS_MS)

# ---------------------------------------------------------------- service graph


class EdgeKey(NamedTuple):
    reporter: str
    source: str  # source workload ("unknown" for callers outside the mesh)
    source_namespace: str
    destination: str  # destination workload, else the service name
    destination_namespace: str
    destination_service: str


class EdgeCounts:
    """Cumulative counts of one edge as seen by one reporter."""

    __slots__ = ("duration", "errors", "grpc", "mtls", "requests")

    def __init__(self) -> None:
        self.requests = 0.0
        self.errors = 0.0
        self.mtls = 0.0  # requests over a mutual-TLS connection (the server side knows)
        self.duration = [0] * (len(_BOUNDS) + 1)
        # gRPC requests by `grpc_response_status` ("14", "unknown" when none was seen)
        self.grpc: dict[str, float] = {}


def is_error(response_code: str) -> bool:
    """Linkerd's and Kiali's notion: 5xx, or no response at all."""
    return response_code.startswith("5") or response_code in ("0", "")


def _edge_key(labels: dict[str, str]) -> EdgeKey:
    dest = labels.get("destination_workload", "unknown")
    dest_ns = labels.get("destination_workload_namespace", "unknown")
    if dest == "unknown":
        dest = labels.get("destination_service_name", "unknown")
        dest_ns = labels.get("destination_service_namespace", "unknown")
    return EdgeKey(
        labels.get("reporter", "unknown"),
        labels.get("source_workload", "unknown"),
        labels.get("source_workload_namespace", "unknown"),
        dest,
        dest_ns,
        labels.get("destination_service", "unknown"),
    )


def edge_snapshot(total: MetricTotals) -> dict[EdgeKey, EdgeCounts]:
    """Per-edge cumulative request, error and duration-bucket counts."""
    edges: dict[EdgeKey, EdgeCounts] = {}
    for (name, labels), value in total.counters.items():
        if name != REQUESTS_TOTAL:
            continue
        d = dict(labels)
        e = edges.setdefault(_edge_key(d), EdgeCounts())
        e.requests += value
        if is_error(d.get("response_code", "")):
            e.errors += value
        if d.get("connection_security_policy") == "mutual_tls":
            e.mtls += value
        if d.get("request_protocol") == "grpc":
            status = d.get("grpc_response_status", "unknown")
            e.grpc[status] = e.grpc.get(status, 0.0) + value
    for (name, labels), h in total.histograms.items():
        if name != REQUEST_DURATION_MS or h.bounds != _BOUNDS:
            continue
        e = edges.setdefault(_edge_key(dict(labels)), EdgeCounts())
        for i, c in enumerate(h.counts):
            e.duration[i] += c
    return edges


class GraphWindow:
    """Samples of the per-edge totals, one a second, kept for `max_window_s`."""

    def __init__(self, max_window_s: float = 600.0):
        self.max_window_s = max_window_s
        self._samples: deque[tuple[float, dict[EdgeKey, EdgeCounts]]] = deque()

    def sample(self, t: float, snapshot: dict[EdgeKey, EdgeCounts]) -> None:
        self._samples.append((t, snapshot))
        # keep one sample older than the longest window, as its baseline
        while len(self._samples) > 2 and self._samples[1][0] <= t - self.max_window_s:
            self._samples.popleft()

    def _baseline(self, window_s: float) -> tuple[float, dict[EdgeKey, EdgeCounts]] | None:
        if len(self._samples) < 2:
            return None
        latest_t = self._samples[-1][0]
        base = self._samples[0]
        for sample in self._samples:
            if sample[0] <= latest_t - window_s:
                base = sample
            else:
                break
        return base

    def edges(self, window_s: float) -> list[dict[str, Any]]:
        """Edge statistics over the last `window_s` seconds (as much as was sampled):
        requests/s, success and error rates, p50/p90/p99 in ms, gRPC requests by
        status (`grpc_statuses`; success stays the HTTP notion of `is_error`). An edge
        both proxies report is shown as its client side saw it (that includes failures
        to connect), or as its server side saw it when the client is not in the mesh."""
        base = self._baseline(window_s)
        if base is None:
            return []
        t0, old = base
        t1, new = self._samples[-1]
        elapsed = max(t1 - t0, 1e-9)
        chosen: dict[tuple[str, str, str, str, str], dict[str, Any]] = {}
        # the share of the edge's requests over mTLS, as its server side saw them
        mtls: dict[tuple[str, str, str, str, str], float] = {}
        for key, now in new.items():
            before = old.get(key)
            requests = now.requests - (before.requests if before else 0.0)
            if requests <= 0:
                continue
            errors = now.errors - (before.errors if before else 0.0)
            buckets = [
                a - (before.duration[i] if before else 0) for i, a in enumerate(now.duration)
            ]
            edge_id = (
                key.source,
                key.source_namespace,
                key.destination,
                key.destination_namespace,
                key.destination_service,
            )
            if key.reporter == "destination":
                mutual = now.mtls - (before.mtls if before else 0.0)
                mtls[edge_id] = round(mutual / requests, 4)
            if edge_id in chosen and not (
                key.reporter == "source" and chosen[edge_id]["reporter"] != "source"
            ):
                continue
            p = {q: histogram_quantile(q, _BOUNDS, buckets) for q in (0.5, 0.9, 0.99)}
            chosen[edge_id] = {
                "source": key.source,
                "source_namespace": key.source_namespace,
                "destination": key.destination,
                "destination_namespace": key.destination_namespace,
                "destination_service": key.destination_service,
                "reporter": key.reporter,
                "requests": int(requests),
                "rps": round(requests / elapsed, 3),
                "success_rate": round(1.0 - errors / requests, 4),
                "error_rate": round(errors / requests, 4),
                "p50_ms": _ms(p[0.5]),
                "p90_ms": _ms(p[0.9]),
                "p99_ms": _ms(p[0.99]),
                "grpc_statuses": _grpc_statuses(now.grpc, before.grpc if before else {}),
            }
        for edge_id, edge in chosen.items():
            # None: no server-side report in the window (e.g. the server is not in the mesh)
            edge["mtls"] = mtls.get(edge_id)
        return sorted(chosen.values(), key=lambda e: (-e["rps"], e["source"], e["destination"]))

    def graph(self, window_s: float) -> dict[str, Any]:
        edges = self.edges(window_s)
        nodes: dict[str, dict[str, Any]] = {}
        for e in edges:
            for side in ("source", "destination"):
                node_id = f"{e[side]}.{e[side + '_namespace']}"
                blank = {"id": node_id, "workload": e[side], "namespace": e[side + "_namespace"]}
                node = nodes.setdefault(node_id, {**blank, "rps_in": 0.0, "rps_out": 0.0})
                node["rps_out" if side == "source" else "rps_in"] += e["rps"]
            e["from"] = f"{e['source']}.{e['source_namespace']}"
            e["to"] = f"{e['destination']}.{e['destination_namespace']}"
        for node in nodes.values():
            node["rps_in"] = round(node["rps_in"], 3)
            node["rps_out"] = round(node["rps_out"], 3)
        span = 0.0
        if len(self._samples) >= 2:
            base = self._baseline(window_s)
            span = self._samples[-1][0] - base[0] if base else 0.0
        return {
            "window_s": window_s,
            "sampled_s": round(span, 3),
            "nodes": sorted(nodes.values(), key=lambda n: n["id"]),
            "edges": edges,
        }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _grpc_statuses(now: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    """gRPC requests of the window by status name (`OK`, `UNAVAILABLE`; a code outside
    gRPC's table, or `unknown`, as reported), most frequent first; empty for an edge
    without gRPC traffic."""
    counts: dict[str, int] = {}
    for code, value in now.items():
        n = int(value - before.get(code, 0.0))
        if n > 0:
            name = grpc_status_label(code)
            counts[name] = counts.get(name, 0) + n
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


# ---------------------------------------------------------------- traces


class TraceIndex:
    """The most recent `max_traces` traces, each up to `max_spans` spans (a span
    delivered twice is kept once)."""

    def __init__(self, max_traces: int = 10_000, max_spans: int = 1_000):
        self.max_traces = max_traces
        self.max_spans = max_spans
        self._traces: OrderedDict[str, dict[str, Span]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._traces)

    def add(self, span: Span) -> None:
        spans = self._traces.get(span.trace_id)
        if spans is None:
            spans = self._traces[span.trace_id] = {}
            while len(self._traces) > self.max_traces:
                self._traces.popitem(last=False)
        else:
            self._traces.move_to_end(span.trace_id)
        if len(spans) < self.max_spans or span.span_id in spans:
            spans[span.span_id] = span

    def spans(self, trace_id: str) -> list[Span]:
        return sorted(
            self._traces.get(trace_id, {}).values(), key=lambda s: (s.start_ns, s.span_id)
        )

    def summaries(
        self,
        service: str = "",
        limit: int = 20,
        *,
        min_duration_ms: float = 0.0,
        errors_only: bool = False,
        trace_id: str = "",
    ) -> list[dict[str, Any]]:
        """Recent traces, newest first: those with a span of `service`, lasting at
        least `min_duration_ms`, with an error span when `errors_only`, or the one
        whose id starts with `trace_id`."""
        out: list[dict[str, Any]] = []
        for tid in reversed(self._traces):
            if trace_id and not tid.startswith(trace_id):
                continue
            spans = list(self._traces[tid].values())
            if service and not any(s.service == service for s in spans):
                continue
            if errors_only and not any(s.error for s in spans):
                continue
            summary = _summary(tid, spans)
            if summary["duration_ms"] < min_duration_ms:
                continue
            out.append(summary)
            if len(out) >= limit:
                break
        return out

    def tree(self, trace_id: str) -> dict[str, Any] | None:
        spans = self.spans(trace_id)
        if not spans:
            return None
        return {**_summary(trace_id, spans), "roots": assemble(spans)}


def _summary(trace_id: str, spans: list[Span]) -> dict[str, Any]:
    start = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    ids = {s.span_id for s in spans}
    roots = sorted((s for s in spans if s.parent_span_id not in ids), key=lambda s: s.start_ns)
    return {
        "trace_id": trace_id,
        "root": roots[0].name if roots else "",
        "root_service": roots[0].service if roots else "",
        "start_ns": start,
        "duration_ms": round((end - start) / 1e6, 3),
        "spans": len(spans),
        "services": sorted({s.service for s in spans}),
        "error": any(s.error for s in spans),
    }


def assemble(spans: Iterable[Span]) -> list[dict[str, Any]]:
    """Spans as trees: each node is the span's fields plus `duration_ms` and
    `children` (by start time). A span whose parent is missing (not sampled, not yet
    arrived) becomes a root, marked `orphan`."""
    nodes: dict[str, dict[str, Any]] = {}
    ordered = sorted(spans, key=lambda s: (s.start_ns, s.span_id))
    for s in ordered:
        node = msgspec.to_builtins(s)
        node.pop("type", None)
        node["duration_ms"] = round((s.end_ns - s.start_ns) / 1e6, 3)
        node["children"] = []
        nodes[s.span_id] = node
    roots: list[dict[str, Any]] = []
    for s in ordered:
        node = nodes[s.span_id]
        parent = nodes.get(s.parent_span_id) if s.parent_span_id else None
        if parent is not None and parent is not node:
            parent["children"].append(node)
        else:
            if s.parent_span_id:
                node["orphan"] = True
            roots.append(node)
    return roots


# ---------------------------------------------------------------- access records


class AccessEntry(NamedTuple):
    namespace: str  # of the reporting proxy
    service: str
    record: AccessRecord


def access_json(entry: AccessEntry) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(entry.record)
    out.pop("type", None)
    out["proxy_service"] = entry.service
    out["proxy_namespace"] = entry.namespace
    return out


class AccessFilter(NamedTuple):
    """Which access records a reader wants; an empty field matches all.

    `service` is the reporting proxy's service (as `kubectl logs` of its istio-proxy
    would show); `status` an exact code or a class such as `5xx`; `flag` one response
    flag (`FI` matches `FI` and `UF,URX`-style lists containing it); `path` a substring
    of the request path."""

    service: str = ""
    status: str = ""
    flag: str = ""
    path: str = ""


def access_matches(entry: AccessEntry, wanted: AccessFilter | str) -> bool:
    f = AccessFilter(service=wanted) if isinstance(wanted, str) else wanted
    r = entry.record
    if f.service and entry.service != f.service:
        return False
    if f.status:
        code = str(r.status)
        if f.status.endswith("xx"):
            if not code.startswith(f.status[0]) or len(code) != 3:
                return False
        elif code != f.status:
            return False
    if f.flag and f.flag not in r.response_flags.split(","):
        return False
    return not f.path or f.path in r.path


class AccessLog:
    def __init__(self, max_records: int = 10_000):
        self._records: deque[AccessEntry] = deque(maxlen=max_records)

    def __len__(self) -> int:
        return len(self._records)

    def add(self, entry: AccessEntry) -> None:
        self._records.append(entry)

    def recent(self, service: AccessFilter | str = "", limit: int = 100) -> list[AccessEntry]:
        out: list[AccessEntry] = []
        for entry in reversed(self._records):
            if access_matches(entry, service):
                out.append(entry)
                if len(out) >= limit:
                    break
        out.reverse()
        return out
