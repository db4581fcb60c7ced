"""What the sidecar's listeners call: `SidecarTelemetry` turns each finished request or
relayed TCP connection into one `RequestRecord` / `TcpRecord` for the recorder, and
rewrites a request's trace and peer-metadata headers on its way through.

No I/O. Per request: one pass over the headers, one span context (the ids are needed
to propagate the trace even when it is not sampled), one `RequestRecord`, one dict
lookup in the recorder. The other side's `Workload` is memoised: per endpoint on the
source side, per (metadata header, certificate identity) on the destination side.
Recording runs once the response is out, and never raises into the request.

Principals in labels are SPIFFE URIs (`spiffe://cluster.local/ns/N/sa/SA`), as Istio's
standard metrics carry them (`source_principal`, `destination_principal`); the
AuthorizationPolicy form without the scheme is `mesh.identity.principal()`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from mesh.hosts import ServiceRef
from mesh.logs import get_logger
from proxy.peer import Peer, peer_of

from .peer_metadata import PEER_METADATA_HEADER, decode_peer_metadata, encode_peer_metadata
from .recorder import TelemetryRecorder
from .records import UNKNOWN, RequestRecord, TcpRecord, Workload, workload_name
from .tracing import (
    DEFAULT_SAMPLER,
    TRACE_HEADERS,
    Headers,
    Sampler,
    SpanContext,
    continue_trace,
    finish_span,
    incoming_trace,
)

if TYPE_CHECKING:
    from mesh.messages import Endpoint
    from proxy.forward import Outcome
    from proxy.http import Exchange, Request

log = get_logger("proxy.telemetry")

REQUEST_ID = "x-request-id"
NO_WORKLOAD = Workload()
# removed from a request before this proxy adds its own
_REPLACED: frozenset[str] = TRACE_HEADERS | {PEER_METADATA_HEADER}
_MAX_MEMO = 4096
_rng = random.Random()
# RFC 9562 variant bits (10xx) for the first hex digit of the fourth group
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}

InboundHandle = Callable[["Request", "Exchange"], Awaitable["Outcome"]]


def own_workload(
    *, service: str, namespace: str, version: str, labels: Mapping[str, str], identity: str
) -> Workload:
    """The workload a proxy fronts, named as the other side names it (`workload_name`)."""
    version = version or labels.get("version", "")
    return Workload(
        name=workload_name(service, version),
        namespace=namespace,
        principal=identity or UNKNOWN,
        app=labels.get("app", service) or UNKNOWN,
        version=version or UNKNOWN,
    )


def new_request_id() -> str:
    """A random UUID (version 4) for `x-request-id`, as Envoy generates them. Not a
    secret, so the fast PRNG serves (`uuid.uuid4()` reads the OS entropy pool: ~4x the
    cost, on every request that arrives without an id)."""
    h = f"{_rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


def _split_headers(headers: Headers) -> tuple[Headers, dict[str, str], str | None, str]:
    """One pass: the headers to keep, the trace headers (first value of each), the peer
    metadata value and the request id (added when missing). Header names are
    lower-case (the engine's)."""
    kept: Headers = []
    found: dict[str, str] = {}
    metadata: str | None = None
    request_id = ""
    for item in headers:
        name = item[0]
        if name in _REPLACED:
            if name == PEER_METADATA_HEADER:
                if metadata is None:
                    metadata = item[1]
            elif name not in found:
                found[name] = item[1]
            continue
        if name == REQUEST_ID and not request_id:
            request_id = item[1]
        kept.append(item)
    if not request_id:
        request_id = new_request_id()
        kept.append((REQUEST_ID, request_id))
    return kept, found, metadata, request_id


class SidecarTelemetry:
    """One per proxy: who it is, how it names the other side, and the recording step
    each listener runs per request (`outbound_*`, `inbound`) and per TCP connection
    (`tcp_*`)."""

    def __init__(
        self,
        recorder: TelemetryRecorder,
        *,
        workload: Workload,
        service_host: str,
        sampler: Sampler = DEFAULT_SAMPLER,
    ):
        self.recorder = recorder
        self.workload = workload
        self.service_host = service_host  # e.g. reviews.default.svc.cluster.local
        self.sampler = sampler
        self.peer_header = (PEER_METADATA_HEADER, encode_peer_metadata(workload))
        self._destinations: dict[str, tuple[Endpoint, Workload]] = {}
        self._sources: dict[tuple[str | None, Peer], Workload] = {}
        self.failures = 0

    # ------------------------------------------------------------ naming the other side

    def destination_of(self, ref: ServiceRef, endpoint: Endpoint) -> Workload:
        """The workload behind an endpoint (its registered labels and identity)."""
        hit = self._destinations.get(endpoint.instance)
        if hit is not None and hit[0] is endpoint:
            return hit[1]
        version = endpoint.version or endpoint.labels.get("version", "")
        found = Workload(
            name=workload_name(ref.name, version),
            namespace=ref.namespace,
            principal=endpoint.identity or UNKNOWN,
            app=endpoint.labels.get("app", ref.name) or UNKNOWN,
            version=version or UNKNOWN,
        )
        if len(self._destinations) >= _MAX_MEMO:
            self._destinations.clear()
        self._destinations[endpoint.instance] = (endpoint, found)
        return found

    def source_of(self, metadata: str | None, peer: Peer) -> Workload:
        """The caller: principal and namespace from its certificate (unknown for a
        plaintext caller), workload, app and version from its metadata header."""
        key = (metadata, peer)
        found = self._sources.get(key)
        if found is None:
            found = decode_peer_metadata(metadata, principal=peer.spiffe_id or UNKNOWN)._replace(
                namespace=peer.namespace or UNKNOWN
            )
            if len(self._sources) >= _MAX_MEMO:
                self._sources.clear()
            self._sources[key] = found
        return found

    # ------------------------------------------------------------ outbound: reporter "source"

    def client_headers(self, headers: Headers, outcome: Outcome) -> Headers:
        """The headers a routed request leaves with: the client span's trace context in
        place of the incoming one, and this proxy's peer metadata in place of anything
        the app sent under that name. Notes the span and request id in `outcome`.

        Only W3C `traceparent`/`tracestate` travel between sidecars: the receiving
        sidecar reads them and gives its app both W3C and B3 (four headers fewer to
        write, encrypt and parse on every hop)."""
        kept, found, _, outcome.request_id = _split_headers(headers)
        outcome.trace, forward = self._continue(found, "client", b3=False)
        kept += forward
        kept.append(self.peer_header)
        return kept

    def outbound_done(self, req: Request, ex: Exchange, outcome: Outcome) -> None:
        """Record a request the outbound listener or a gateway answered (`outcome`: what
        routing noted, with the final status and flags)."""
        try:
            span = outcome.trace
            request_id = outcome.request_id
            if span is None:  # answered before it was forwarded: a local reply
                _, found, _, request_id = _split_headers(req.headers)
                started = time.time_ns() - int((time.monotonic() - ex.started_at) * 1e9)
                span = self._continue(found, "client", now_ns=started)[0]
            self._record(
                "source", self.workload, outcome.destination or NO_WORKLOAD, outcome.service,
                req, ex, outcome, span, request_id, UNKNOWN,
            )  # fmt: skip
        except Exception as e:
            self._failed(e)

    # ------------------------------------------------------------ inbound: reporter "destination"

    def inbound(self, handle: InboundHandle) -> InboundHandle:
        """Wrap the inbound handler: the app gets the server span's trace headers and no
        peer metadata; the request is recorded once it is answered (status 0, flags DC
        when the handler ended by an exception, e.g. the client left)."""

        async def handler(req: Request, ex: Exchange) -> Outcome:
            peer = peer_of(req.ssl_object)
            headers, found, metadata, request_id = _split_headers(req.headers)
            span, forward = self._continue(found, "server")
            headers += forward
            req.headers = headers
            outcome: Outcome | None = None
            try:
                outcome = await handle(req, ex)
                return outcome
            finally:
                try:
                    self._record(
                        "destination", self.source_of(metadata, peer), self.workload,
                        self.service_host, req, ex, outcome, span, request_id,
                        "mutual_tls" if peer.mtls else "none",
                    )  # fmt: skip
                except Exception as e:
                    self._failed(e)

        return handler

    # ------------------------------------------------------------ TCP

    def tcp_inbound(self, ssl_object: Any, flags: str = "-") -> TcpRecord:
        """A connection relayed to the app; the caller from its certificate, if any."""
        peer = peer_of(ssl_object)
        return TcpRecord(
            "destination",
            self.source_of(None, peer),
            self.workload,
            self.service_host,
            "mutual_tls" if peer.mtls else "none",
            flags,
        )

    def tcp_outbound(
        self, ref: ServiceRef, endpoint: Endpoint | None, flags: str = "-"
    ) -> TcpRecord:
        """A connection relayed to `endpoint` of `ref` (None: no endpoint accepted it)."""
        destination = self.destination_of(ref, endpoint) if endpoint is not None else NO_WORKLOAD
        return TcpRecord("source", self.workload, destination, ref.fqdn, UNKNOWN, flags)

    # ------------------------------------------------------------ internals

    def _continue(
        self, found: dict[str, str], kind: str, *, b3: bool = True, now_ns: int | None = None
    ) -> tuple[SpanContext, Headers]:
        r = self.recorder
        # named when it finishes: only sampled spans need a name
        return continue_trace(
            incoming_trace(found),
            kind,
            name="",
            service=r.service,
            namespace=r.namespace,
            instance=r.instance,
            sampler=self.sampler,
            now_ns=now_ns,
            b3=b3,
        )

    def _record(
        self,
        reporter: str,
        source: Workload,
        destination: Workload,
        service: str,
        req: Request,
        ex: Exchange,
        outcome: Outcome | None,
        span: SpanContext,
        request_id: str,
        policy: str,
    ) -> None:
        if outcome is None:
            status, flags, upstream = 0, "DC", ""
        else:
            status, flags, upstream = outcome.status, outcome.flags or "-", outcome.upstream
        finished = ex.finished_at
        ended = finished if finished is not None else time.monotonic()
        self.recorder.record_request(
            RequestRecord(
                reporter, source, destination, service or UNKNOWN, req.method, req.authority,
                req.path, status, (ended - ex.started_at) * 1000.0, ex.request_bytes,
                ex.response_bytes, flags, upstream, request_id, span.trace_id, "http", policy,
            )
        )  # fmt: skip
        if span.sampled:
            name = f"{req.authority or service}/*"
            done = finish_span(
                span._replace(name=name),
                status_code=status,
                attributes={
                    "http.method": req.method,
                    "http.url": f"http://{req.authority}{req.path}",
                    "http.status_code": str(status),
                    "response_flags": flags,
                    "upstream_host": upstream,
                    "request_id": request_id,
                    "peer.workload": (destination if reporter == "source" else source).name,
                },
            )
            if done is not None:
                self.recorder.record_span(done)

    def _failed(self, error: Exception) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 10_000 == 0:
            log.error("telemetry.record_failed", failures=self.failures, error=repr(error))
