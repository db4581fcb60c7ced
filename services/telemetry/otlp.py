"""OTLP export, the pure part: spans as OpenTelemetry protobuf messages, and the
bounded export queue (batching, capped backoff, bounded retries, counted drops). No
I/O: `exporter.py` sends what `ExportQueue.next_batch` returns and reports back.

Resource attributes (one resource per proxy instance): `service.name`,
`service.namespace`, `service.instance.id`, and Kubernetes-style names:
`k8s.namespace.name`, `k8s.pod.name` (the instance) and `k8s.deployment.name` (the
workload, `<service>-<version>`, read from Meshwork's instance ids
`<service>-<version>-<host>-<pid>-<nonce>`; the service name for other ids).

Span attributes follow OpenTelemetry's stable HTTP semantic conventions
(`http.request.method`, `http.response.status_code`, `url.full` on client spans,
`url.path` and `url.scheme` on server spans, `server.address`, `server.port`,
`network.protocol.name`); what has no convention keeps its meaning under `meshwork.`
(`meshwork.response_flags`, `meshwork.upstream_host`, `meshwork.request_id`,
`meshwork.peer.workload`). A span with an error (5xx, or no response) has status ERROR;
others leave it unset, as the conventions ask.
"""

from __future__ import annotations

import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1 import trace_pb2

from mesh import __version__
from mesh.telemetry import Span

# The OTLP messages come from `opentelemetry-proto`, or from the older copy that
# `xds-protos` (a dependency, for Envoy) installs at the same import path and that pip
# would not let both live side by side. The older one names the scope "instrumentation
# library"; the wire format is the same (ResourceSpans field 2: scope, spans; scope
# fields 1, 2: name, version), so a current collector reads either.
if hasattr(trace_pb2, "ScopeSpans"):
    _SCOPE: Any = common_pb2.InstrumentationScope(name="meshwork.proxy", version=__version__)

    def _scope_spans(spans: list[trace_pb2.Span]) -> dict[str, Any]:
        return {"scope_spans": [trace_pb2.ScopeSpans(scope=_SCOPE, spans=spans)]}

else:  # pragma: no cover - depends on which package provides the messages
    _SCOPE = common_pb2.InstrumentationLibrary(name="meshwork.proxy", version=__version__)

    def _scope_spans(spans: list[trace_pb2.Span]) -> dict[str, Any]:
        return {
            "instrumentation_library_spans": [
                trace_pb2.InstrumentationLibrarySpans(instrumentation_library=_SCOPE, spans=spans)
            ]
        }


def request_spans(request: ExportTraceServiceRequest) -> list[tuple[Resource, trace_pb2.Span]]:
    """Every span of a decoded request with its resource (for receivers and tests)."""
    out: list[tuple[Resource, trace_pb2.Span]] = []
    for rs in request.resource_spans:
        groups = rs.scope_spans if hasattr(rs, "scope_spans") else rs.instrumentation_library_spans
        for group in groups:
            out.extend((rs.resource, s) for s in group.spans)
    return out


_KIND = {"client": trace_pb2.Span.SPAN_KIND_CLIENT, "server": trace_pb2.Span.SPAN_KIND_SERVER}
# our span attributes without an OpenTelemetry convention
_OWN = {
    "response_flags": "meshwork.response_flags",
    "upstream_host": "meshwork.upstream_host",
    "request_id": "meshwork.request_id",
    "peer.workload": "meshwork.peer.workload",
}
_REPLACED = {"http.method", "http.url", "http.status_code"}


def _kv(key: str, value: str | int) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def workload_of(service: str, instance: str) -> str:
    """`reviews-v2` for Meshwork's instance id `reviews-v2-host-123-ab12`."""
    rest = instance.removeprefix(service + "-")
    if rest != instance and rest.count("-") >= 3:
        return f"{service}-{rest.split('-', 1)[0]}"
    return service


def resource_of(service: str, namespace: str, instance: str) -> Resource:
    return Resource(
        attributes=[
            _kv("service.name", service),
            _kv("service.namespace", namespace),
            _kv("service.instance.id", instance),
            _kv("k8s.namespace.name", namespace),
            _kv("k8s.pod.name", instance),
            _kv("k8s.deployment.name", workload_of(service, instance)),
        ]
    )


def span_attributes(span: Span) -> list[KeyValue]:
    a = span.attributes
    out: list[KeyValue] = []
    if "http.method" in a:
        out.append(_kv("http.request.method", a["http.method"]))
    if span.status_code:
        out.append(_kv("http.response.status_code", span.status_code))
    url = a.get("http.url", "")
    if url:
        parts = urllib.parse.urlsplit(url)
        if span.kind == "client":
            out.append(_kv("url.full", url))
        else:
            out.append(_kv("url.path", parts.path or "/"))
            if parts.query:
                out.append(_kv("url.query", parts.query))
            out.append(_kv("url.scheme", parts.scheme or "http"))
        if parts.hostname:
            out.append(_kv("server.address", parts.hostname))
        try:
            port = parts.port
        except ValueError:
            port = None
        if port:
            out.append(_kv("server.port", port))
        out.append(_kv("network.protocol.name", "http"))
    for key, value in sorted(a.items()):
        if key in _REPLACED:
            continue
        out.append(_kv(_OWN.get(key, key if key.startswith("meshwork.") else f"meshwork.{key}"),
                       value))  # fmt: skip
    return out


def to_otlp_span(span: Span) -> trace_pb2.Span:
    status = trace_pb2.Status(
        code=trace_pb2.Status.STATUS_CODE_ERROR
        if span.error
        else trace_pb2.Status.STATUS_CODE_UNSET
    )
    return trace_pb2.Span(
        trace_id=bytes.fromhex(span.trace_id),
        span_id=bytes.fromhex(span.span_id),
        parent_span_id=bytes.fromhex(span.parent_span_id) if span.parent_span_id else b"",
        name=span.name,
        kind=_KIND.get(span.kind, trace_pb2.Span.SPAN_KIND_UNSPECIFIED),
        start_time_unix_nano=span.start_ns,
        end_time_unix_nano=span.end_ns,
        attributes=span_attributes(span),
        status=status,
    )


def export_request(spans: Iterable[Span]) -> ExportTraceServiceRequest:
    """One request: spans grouped by the proxy instance that recorded them."""
    by_resource: dict[tuple[str, str, str], list[trace_pb2.Span]] = {}
    for s in spans:
        by_resource.setdefault((s.service, s.namespace, s.instance), []).append(to_otlp_span(s))
    return ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(resource=resource_of(*key), **_scope_spans(otlp_spans))
            for key, otlp_spans in by_resource.items()
        ]
    )


def valid_for_export(span: Span) -> bool:
    """W3C ids in hex (the proto needs their bytes)."""
    try:
        return (
            len(bytes.fromhex(span.trace_id)) == 16
            and len(bytes.fromhex(span.span_id)) == 8
            and len(bytes.fromhex(span.parent_span_id)) in (0, 8)
        )
    except ValueError:
        return False


# ---------------------------------------------------------------- the export queue


@dataclass
class ExportStats:
    exported: int = 0
    dropped_full: int = 0  # offered while the buffer was full
    dropped_retries: int = 0  # the collector failed every attempt
    dropped_rejected: int = 0  # the collector refused them (not retryable)
    dropped_invalid: int = 0
    failures: int = 0  # failed attempts


@dataclass
class Batch:
    spans: list[Span]
    attempt: int = 0  # failed attempts so far


@dataclass
class ExportQueue:
    """Spans waiting for export, at most `capacity`; sent in batches of up to
    `batch_spans`, one batch in flight at a time. A failed batch is retried after
    `min(backoff_cap_s, backoff_base_s * 2**(attempt-1)) * jitter()`, at most
    `max_attempts` times in all, then dropped (counted)."""

    capacity: int = 10_000
    batch_spans: int = 512
    max_attempts: int = 6
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 10.0
    jitter: Callable[[], float] = field(default=lambda: 1.0)
    stats: ExportStats = field(default_factory=ExportStats)
    _waiting: deque[Span] = field(default_factory=deque)
    _in_flight: Batch | None = None
    _retry_at: float = 0.0

    def __len__(self) -> int:
        return len(self._waiting) + (len(self._in_flight.spans) if self._in_flight else 0)

    def offer(self, spans: Iterable[Span]) -> int:
        """Take spans; return how many were dropped because the buffer is full."""
        dropped = 0
        for s in spans:
            if not valid_for_export(s):
                self.stats.dropped_invalid += 1
            elif len(self) >= self.capacity:
                dropped += 1
            else:
                self._waiting.append(s)
        self.stats.dropped_full += dropped
        return dropped

    def next_batch(self, now: float) -> Batch | None:
        """The batch to send now: the one that failed (once its backoff is over), else
        the next spans; None when empty or backing off."""
        if self._in_flight is not None:
            return self._in_flight if now >= self._retry_at else None
        if not self._waiting:
            return None
        n = min(self.batch_spans, len(self._waiting))
        self._in_flight = Batch([self._waiting.popleft() for _ in range(n)])
        return self._in_flight

    def wait_s(self, now: float) -> float | None:
        """Seconds until `next_batch` has something; None: nothing until an offer."""
        if self._in_flight is not None:
            return max(0.0, self._retry_at - now)
        return 0.0 if self._waiting else None

    def succeeded(self, batch: Batch) -> None:
        assert batch is self._in_flight
        self.stats.exported += len(batch.spans)
        self._in_flight = None

    def rejected(self, batch: Batch) -> None:
        """The collector refused the batch for good (a 4xx other than 429)."""
        assert batch is self._in_flight
        self.stats.dropped_rejected += len(batch.spans)
        self._in_flight = None

    def failed(self, batch: Batch, now: float) -> float | None:
        """A retryable failure: the delay before the next attempt, or None when the
        batch was dropped (attempts exhausted)."""
        assert batch is self._in_flight
        self.stats.failures += 1
        batch.attempt += 1
        if batch.attempt >= self.max_attempts:
            self.stats.dropped_retries += len(batch.spans)
            self._in_flight = None
            return None
        delay = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (batch.attempt - 1))
        delay *= self.jitter()
        self._retry_at = now + delay
        return delay
