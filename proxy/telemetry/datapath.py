"""What the sidecar's listeners call: `SidecarTelemetry` turns each finished request or
relayed TCP connection into one `RequestRecord` / `TcpRecord` for the recorder, and
rewrites a request's trace and peer-metadata headers on its way through.

No I/O. Per request: one pass over the headers, one `TracePropagator.step` (an
unsampled request draws at most one random number and builds no span), one
`RequestRecord`, one dict lookup in the recorder. The other side's `Workload` is
memoised: per endpoint on the source side, per (metadata header, certificate
identity) on the destination side. Recording runs once the response is out, and never
raises into the request.

Principals in labels are SPIFFE URIs (`spiffe://cluster.local/ns/N/sa/SA`), as Istio's
standard metrics carry them (`source_principal`, `destination_principal`); the
AuthorizationPolicy form without the scheme is `mesh.identity.principal()`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from mesh.hosts import ServiceRef
from mesh.logs import get_logger
from proxy.peer import Peer, peer_of
from proxy.response_flags import ResponseFlag

from .peer_metadata import PEER_METADATA_HEADER, decode_peer_metadata, encode_peer_metadata
from .recorder import TelemetryRecorder
from .records import UNKNOWN, RequestRecord, TcpRecord, Workload, workload_name
from .tracing import (
    DEFAULT_SAMPLER,
    TRACE_HEADERS,
    Headers,
    Sampler,
    SpanContext,
    TracePropagator,
    finish_span,
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
_new_tuple = tuple.__new__
# RFC 9562 variant bits (10xx) for the first hex digit of the fourth group
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}

InboundHandle = Callable[["Request", "Exchange"], Awaitable["Outcome"]]
# what `inbound_start` hands `inbound_done`: the caller's workload, the connection
# security policy, the trace context and the request id (a plain tuple: per request)
InboundSeen = tuple[Workload, str, SpanContext, str]


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


def caller_workload(
    ref: ServiceRef, endpoints: Iterable[Endpoint], spiffe_id: str, peer_ip: str
) -> Workload | None:
    """The calling workload of an mTLS connection, from the registered instances of
    `ref` (the service named like the caller's service account) that hold its
    identity; among several, those on the caller's address. Fields the candidates
    disagree on (two versions sharing an identity and a host) stay unknown; None
    when no instance holds the identity."""
    candidates = [ep for ep in endpoints if ep.identity == spiffe_id]
    on_host = [ep for ep in candidates if peer_ip and _host_of(ep.address) == peer_ip]
    candidates = on_host or candidates
    if not candidates:
        return None
    versions = {ep.version or ep.labels.get("version", "") for ep in candidates}
    apps = {ep.labels.get("app", ref.name) for ep in candidates}
    one_version = len(versions) == 1
    version = versions.pop() if one_version else ""
    app = apps.pop() if len(apps) == 1 else ""
    return Workload(
        # named as that instance names itself (`own_workload`)
        name=workload_name(ref.name, version) if one_version else UNKNOWN,
        namespace=ref.namespace,
        principal=spiffe_id,
        app=app or UNKNOWN,
        version=version or UNKNOWN,
    )


def _host_of(address: str) -> str:
    host = address.rpartition(":")[0] if ":" in address else address
    return host.removeprefix("[").removesuffix("]")


def new_request_id() -> str:
    """A random UUID (version 4) for `x-request-id`, as Envoy generates them. Not a
    secret, so the fast PRNG serves (`uuid.uuid4()` reads the OS entropy pool: ~4x the
    cost, on every request that arrives without an id)."""
    h = f"{_rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


def _split_headers(headers: Headers) -> tuple[Headers, dict[str, str] | None, str | None, str]:
    """One pass: the headers to keep, the trace headers (first value of each; None
    when there is none), the peer metadata value and the request id (added when
    missing). Header names are lower-case (the engine's)."""
    kept: Headers = []
    found: dict[str, str] | None = None
    metadata: str | None = None
    request_id = ""
    for item in headers:
        name = item[0]
        if name in _REPLACED:
            if name == PEER_METADATA_HEADER:
                if metadata is None:
                    metadata = item[1]
            elif found is None:
                found = {name: item[1]}
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
        self.tracer = TracePropagator(
            service=recorder.service,
            namespace=recorder.namespace,
            instance=recorder.instance,
            sampler=sampler,
        )
        self.peer_header = (PEER_METADATA_HEADER, encode_peer_metadata(workload))
        self._destinations: dict[str, tuple[Endpoint, Workload]] = {}
        self._sources: dict[tuple[str | None, Peer], Workload] = {}
        self._callers: dict[tuple[str | None, Peer], tuple[Workload, str]] = {}
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

    def _caller(self, metadata: str | None, peer: Peer) -> tuple[Workload, str]:
        """`source_of` and the connection security policy, memoised together."""
        key = (metadata, peer)
        found = self._callers.get(key)
        if found is None:
            found = self.source_of(metadata, peer), "mutual_tls" if peer.mtls else "none"
            if len(self._callers) >= _MAX_MEMO:
                self._callers.clear()
            self._callers[key] = found
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
        outcome.trace, forward = self.tracer.step(found, "client", b3=False)
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
                span = self.tracer.step(found, "client", now_ns=started)[0]
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
        when the handler ended by an exception, e.g. the client left). A listener that
        has a wrapper of its own calls `inbound_start` and `inbound_done` from it
        instead (one coroutine less per request)."""

        async def handler(req: Request, ex: Exchange) -> Outcome:
            seen = self.inbound_start(req)
            outcome: Outcome | None = None
            try:
                outcome = await handle(req, ex)
                return outcome
            finally:
                self.inbound_done(req, ex, outcome, seen)

        return handler

    def inbound_start(self, req: Request) -> InboundSeen:
        """Before the inbound handler runs: swap the request's trace headers for the
        server span's, drop the peer metadata; what `inbound_done` needs."""
        headers, found, metadata, request_id = _split_headers(req.headers)
        span, forward = self.tracer.step(found, "server")
        headers += forward
        req.headers = headers
        source, policy = self._caller(metadata, peer_of(req.ssl_object))
        return source, policy, span, request_id

    def inbound_done(
        self, req: Request, ex: Exchange, outcome: Outcome | None, seen: InboundSeen
    ) -> None:
        """Record a request the inbound handler answered (`outcome` None: it ended by
        an exception). Never raises."""
        try:
            self._record(
                "destination", seen[0], self.workload, self.service_host, req, ex, outcome,
                seen[2], seen[3], seen[1],
            )  # fmt: skip
        except Exception as e:
            self._failed(e)

    # ------------------------------------------------------------ TCP

    def tcp_inbound(
        self, ssl_object: Any, flags: str = "-", caller: Workload | None = None
    ) -> TcpRecord:
        """A connection relayed to the app; the caller from its certificate, if any,
        and its workload, app and version from `caller` (`caller_workload`: TCP carries
        no peer metadata header, the registry knows the instance)."""
        peer = peer_of(ssl_object)
        source = self.source_of(None, peer)
        if caller is not None:
            source = caller._replace(principal=source.principal, namespace=source.namespace)
        return TcpRecord(
            "destination",
            source,
            self.workload,
            self.service_host,
            "mutual_tls" if peer.mtls else "none",
            flags,
        )

    def tcp_outbound(
        self, ref: ServiceRef | None, endpoint: Endpoint | None, flags: str = "-"
    ) -> TcpRecord:
        """A connection relayed to `endpoint` of `ref` (None: no endpoint accepted it;
        `ref` None: no destination was chosen, e.g. no rule at a gateway)."""
        if ref is None:
            return TcpRecord("source", self.workload, NO_WORKLOAD, UNKNOWN, UNKNOWN, flags)
        destination = self.destination_of(ref, endpoint) if endpoint is not None else NO_WORKLOAD
        return TcpRecord("source", self.workload, destination, ref.fqdn, UNKNOWN, flags)

    # ------------------------------------------------------------ internals

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
        dry_run_result = dry_run_policy = ""
        flags: str
        if outcome is None:
            status, flags, upstream = 0, ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION, ""
        else:
            status, flags, upstream = outcome.status, outcome.flags or "-", outcome.upstream
            shadow = outcome.authz_shadow
            if shadow is not None:
                dry_run_result = "allowed" if shadow.allowed else "denied"
                dry_run_policy = shadow.policy
        grpc_status: str = getattr(ex, "grpc_status", "")  # exchanges of either protocol
        # Istio's request_protocol: "grpc" for gRPC requests, else "http"
        protocol = "grpc" if grpc_status or _is_grpc(req.headers) else "http"
        finished = ex.finished_at
        ended = finished if finished is not None else time.monotonic()
        duration_ms = (ended - ex.started_at) * 1000.0
        # every field, in order (RequestRecord(...) itself is a Python-level call)
        self.recorder.record_request(
            _new_tuple(RequestRecord, (
                reporter, source, destination, service or UNKNOWN, req.method, req.authority,
                req.path, status, duration_ms, ex.request_bytes, ex.response_bytes, flags,
                upstream, request_id, span.trace_id, protocol, policy, dry_run_result,
                dry_run_policy, grpc_status, time.time_ns() - int(duration_ms * 1e6),
            ))
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


def _is_grpc(headers: list[tuple[str, str]]) -> bool:
    for name, value in headers:
        if name == "content-type":
            return value.startswith("application/grpc")
    return False
