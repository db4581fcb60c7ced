"""Envoy's gRPC access-log entries -> Meshwork's telemetry records (pure, no I/O).

Envoy sends one `HTTPAccessLogEntry` per request and one `TCPAccessLogEntry` per
relayed connection to the sidecar's access-log service, on a stream named by the
logger's `log_name` (`proxy.envoy.translate.access_log`): `outbound`, `gateway` and
`outbound_tcp` are reported as `source`, `inbound` and `inbound_tcp` as `destination`.
`AccessLogConverter` turns each entry into what the Python data path hands the same
`TelemetryRecorder`: a `RequestRecord` (plus a `Span` when the request carries a
sampled trace context), or the `TcpRecord` of a connection with its bytes. Aggregation,
access batches and publishing are then shared with the Python data plane.

How the other side is named, as `proxy.telemetry.datapath` names it:
- the caller (inbound): principal and namespace from the SPIFFE ID in its client
  certificate's URI SAN (Envoy's `tls_properties.peer_certificate_properties`), never
  from a header; workload, app and version from its `x-meshwork-peer` header. The
  inbound HCM must strip that header before the app, and a removed header is gone from
  the access log too (route or upstream-filter removal alike, measured on Envoy 1.40):
  `peer_metadata_filter()` moves it into dynamic metadata instead, which the log
  carries; a logged header is the fallback;
- the destination (outbound): the service from the upstream cluster's Istio-style name
  (`outbound|<port>|<subset>|<fqdn>`), else from the request's authority; the endpoint
  Envoy chose (`upstream_remote_address`) looked up among the registry's endpoints of
  that service, for its workload, labels and identity.

Response flags are Envoy's short codes, comma-joined in Envoy's order, exactly as
`%RESPONSE_FLAGS%` prints them. An RBAC denial (Envoy's `rbac_access_denied_*` details)
adds `RBAC`, as the Python proxies flag it: Envoy itself sets no flag for it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2

from mesh import identity
from mesh.hosts import ServiceRef, canonical_host, service_of_host, strip_port
from mesh.messages import Endpoint, EndpointSet
from mesh.telemetry import Span
from proxy.envoy.resources import PASSTHROUGH_CLUSTER
from proxy.response_flags import ResponseFlag
from proxy.telemetry.datapath import caller_workload
from proxy.telemetry.peer_metadata import PEER_METADATA_HEADER, decode_peer_metadata
from proxy.telemetry.records import UNKNOWN, RequestRecord, TcpRecord, Workload, workload_name
from proxy.telemetry.tracing import TRACE_HEADERS, incoming_trace, new_span_id

Reporter = Literal["source", "destination"]

# Envoy's log names (proxy.envoy.translate.access_log) -> the reporter they stand for
HTTP_LOG_REPORTERS: Mapping[str, Reporter] = {
    "outbound": "source",
    "gateway": "source",
    "inbound": "destination",
}
TCP_LOG_REPORTERS: Mapping[str, Reporter] = {
    "outbound_tcp": "source",
    "inbound_tcp": "destination",
}

# `ResponseFlags` fields and Envoy's short codes, in Envoy's order (its CoreResponseFlag
# enum, the order `%RESPONSE_FLAGS%` joins them in). `unauthorized_details` is UAEX.
RESPONSE_FLAG_CODES: tuple[tuple[str, ResponseFlag], ...] = (
    ("failed_local_healthcheck", ResponseFlag.FAILED_LOCAL_HEALTH_CHECK),
    ("no_healthy_upstream", ResponseFlag.NO_HEALTHY_UPSTREAM),
    ("upstream_request_timeout", ResponseFlag.UPSTREAM_REQUEST_TIMEOUT),
    ("local_reset", ResponseFlag.LOCAL_RESET),
    ("upstream_remote_reset", ResponseFlag.UPSTREAM_REMOTE_RESET),
    ("upstream_connection_failure", ResponseFlag.UPSTREAM_CONNECTION_FAILURE),
    ("upstream_connection_termination", ResponseFlag.UPSTREAM_CONNECTION_TERMINATION),
    ("upstream_overflow", ResponseFlag.UPSTREAM_OVERFLOW),
    ("no_route_found", ResponseFlag.NO_ROUTE_FOUND),
    ("delay_injected", ResponseFlag.DELAY_INJECTED),
    ("fault_injected", ResponseFlag.FAULT_INJECTED),
    ("rate_limited", ResponseFlag.RATE_LIMITED),
    ("unauthorized_details", ResponseFlag.UNAUTHORIZED_EXTERNAL_SERVICE),
    ("rate_limit_service_error", ResponseFlag.RATE_LIMIT_SERVICE_ERROR),
    ("downstream_connection_termination", ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION),
    ("upstream_retry_limit_exceeded", ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED),
    ("stream_idle_timeout", ResponseFlag.STREAM_IDLE_TIMEOUT),
    ("invalid_envoy_request_headers", ResponseFlag.INVALID_ENVOY_REQUEST_HEADERS),
    ("downstream_protocol_error", ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR),
    ("upstream_max_stream_duration_reached", ResponseFlag.UPSTREAM_MAX_STREAM_DURATION_REACHED),
    ("response_from_cache_filter", ResponseFlag.RESPONSE_FROM_CACHE_FILTER),
    ("no_filter_config_found", ResponseFlag.NO_FILTER_CONFIG_FOUND),
    ("duration_timeout", ResponseFlag.DURATION_TIMEOUT),
    ("upstream_protocol_error", ResponseFlag.UPSTREAM_PROTOCOL_ERROR),
    ("no_cluster_found", ResponseFlag.NO_CLUSTER_FOUND),
    ("overload_manager", ResponseFlag.OVERLOAD_MANAGER),
    ("dns_resolution_failure", ResponseFlag.DNS_RESOLUTION_FAILED),
    ("downstream_remote_reset", ResponseFlag.DOWNSTREAM_REMOTE_RESET),
)
# what the Python proxies flag an authorization denial with (proxy.inbound, proxy.tcp)
RBAC_FLAG = ResponseFlag.RBAC_ACCESS_DENIED
# Envoy's response code details / connection termination details of an RBAC denial
_RBAC_DENIED = "rbac_access_denied"
_RBAC_METADATA = "envoy.filters.http.rbac"
_SHADOW_RESULT = "shadow_engine_result"
_SHADOW_POLICY = "shadow_effective_policy_id"

# where `peer_metadata_filter` puts the caller's `x-meshwork-peer` value
PEER_METADATA_NAMESPACE = "meshwork"
PEER_METADATA_KEY = "peer"
# the span tag the inbound HCM's tracer fills from that metadata (proxy.envoy.otlp_spans)
PEER_SPAN_TAG = "meshwork.peer"
HEADER_TO_METADATA = (
    "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config"
)

_MAX_MEMO = 4096
# logged by `proxy.envoy.translate.access_log` (trailers, or the headers of a
# trailers-only answer)
GRPC_STATUS = "grpc-status"


def _is_grpc(headers: Mapping[str, str]) -> bool:
    """A gRPC request (`proxy.telemetry.datapath` decides the same way)."""
    return headers.get("content-type", "").startswith("application/grpc")


def peer_metadata_filter() -> dict[str, Any]:
    """The inbound HCM's first HTTP filter: moves the caller's `x-meshwork-peer` header
    into dynamic metadata (`meshwork`/`peer`), so the app never sees it and the access
    log still carries it."""
    return {
        "name": "envoy.filters.http.header_to_metadata",
        "typedConfig": {
            "@type": HEADER_TO_METADATA,
            "requestRules": [
                {
                    "header": PEER_METADATA_HEADER,
                    "onHeaderPresent": {
                        "metadataNamespace": PEER_METADATA_NAMESPACE,
                        "key": PEER_METADATA_KEY,
                        "type": "STRING",
                    },
                    "remove": True,
                }
            ],
        },
    }


class AccessLogError(ValueError):
    """An access-log stream or entry the converter cannot attribute (an unknown log
    name): the message names what is wrong."""


# fqdn -> the endpoints the registry lists for that service (None: not followed)
EndpointLookup = Callable[[str], EndpointSet | None]


def no_endpoints(fqdn: str) -> EndpointSet | None:
    return None


# field name -> (Envoy's order, short code)
_FLAG_BY_FIELD: Mapping[str, tuple[int, str]] = {
    field: (i, code) for i, (field, code) in enumerate(RESPONSE_FLAG_CODES)
}


def response_flags(flags: accesslog_pb2.ResponseFlags, details: str = "") -> str:
    """Envoy's `%RESPONSE_FLAGS%` for `flags` ("-" for none); `details` (response code
    details, or connection termination details for TCP) adds `RBAC` for a denial.

    Reads only the fields Envoy set (`ListFields`: a true flag, or the
    `unauthorized_details` message), one C call for the usual entry with none."""
    found = flags.ListFields()
    denied = details.startswith(_RBAC_DENIED)
    if not found and not denied:
        return "-"
    codes = [code for _, code in sorted(_FLAG_BY_FIELD[f.name] for f, _ in found)]
    if denied:
        codes.append(RBAC_FLAG)
    return ",".join(codes) if codes else "-"


def cluster_service(cluster: str) -> str:
    """The service fqdn in an Istio-style cluster name `outbound|<port>|<subset>|<fqdn>`
    ("" for any other cluster, e.g. `inbound|9080||`)."""
    parts = cluster.split("|")
    if len(parts) == 4 and parts[0] == "outbound":
        return parts[3]
    return ""


def socket_address(address: address_pb2.Address) -> str:
    """`ip:port` (`[ip]:port` for IPv6) of a socket address; "" for none or a pipe."""
    if not address.HasField("socket_address"):
        return ""
    sa = address.socket_address
    host = f"[{sa.address}]" if ":" in sa.address else sa.address
    return f"{host}:{sa.port_value}"


def peer_spiffe_id(tls: accesslog_pb2.TLSProperties) -> str:
    """The SPIFFE ID of the peer's certificate: its one URI SAN, if that is a workload
    SPIFFE ID ("" otherwise: treated as no identity, as `proxy.peer` does)."""
    return one_spiffe_id(
        [san.uri for san in tls.peer_certificate_properties.subject_alt_name if san.uri]
    )


def one_spiffe_id(uris: list[str]) -> str:
    """The one URI SAN of a certificate if it is a workload SPIFFE ID, else ""."""
    if len(uris) != 1:
        return ""
    try:
        identity.parse_spiffe_id(uris[0])
    except identity.IdentityError:
        return ""
    return uris[0]


def _ns(ts_seconds: int, ts_nanos: int) -> int:
    return ts_seconds * 1_000_000_000 + ts_nanos


def _duration_ms(common: accesslog_pb2.AccessLogCommon) -> float:
    """The whole request or connection: Envoy's `duration`, else until the last byte
    sent downstream."""
    if common.HasField("duration"):
        d = common.duration
    elif common.HasField("time_to_last_downstream_tx_byte"):
        d = common.time_to_last_downstream_tx_byte
    else:
        return 0.0
    return _ns(d.seconds, d.nanos) / 1e6


def _method(value: int) -> str:
    # the gRPC access log carries the method as an enum: others are unspecified
    if value == base_pb2.METHOD_UNSPECIFIED:
        return "-"
    return str(base_pb2.RequestMethod.Name(value))


FilterMetadata = Mapping[str, struct_pb2.Struct]


def _peer_metadata(meta: FilterMetadata | None, headers: Mapping[str, str]) -> str:
    """The caller's `x-meshwork-peer` value: from the dynamic metadata
    `peer_metadata_filter` wrote (`meta`: the entry's filter metadata, None when it has
    none), else from the logged request headers."""
    if meta is not None and PEER_METADATA_NAMESPACE in meta:
        value = meta[PEER_METADATA_NAMESPACE].fields.get(PEER_METADATA_KEY)
        if value is not None and value.string_value:
            return str(value.string_value)
    return headers.get(PEER_METADATA_HEADER, "")


def _dry_run(meta: FilterMetadata | None) -> tuple[str, str]:
    """What dry-run (shadow) RBAC rules decided, from the RBAC filter's dynamic
    metadata (`<prefix>shadow_engine_result`, `<prefix>shadow_effective_policy_id`):
    ("allowed"|"denied"|"", "ns/name"). A denial by any shadow engine wins."""
    if meta is None or _RBAC_METADATA not in meta:
        return "", ""
    result = policy = ""
    for key, value in meta[_RBAC_METADATA].fields.items():
        if key.endswith(_SHADOW_RESULT):
            decided = value.string_value
            if decided == "denied" or not result:
                result = decided
        elif key.endswith(_SHADOW_POLICY) and value.string_value:
            # the translator names rules `ns/name[i]`
            policy = value.string_value.split("[", 1)[0]
    return result, policy


def _grpc_status(response: accesslog_pb2.HTTPResponseProperties) -> str:
    """`grpc-status` from the logged trailers, else from the headers of a trailers-only
    answer ("" for none)."""
    trailers, heads = response.response_trailers, response.response_headers
    found = trailers.get(GRPC_STATUS) if len(trailers) else None
    if not found and len(heads):
        found = heads.get(GRPC_STATUS)
    return found or ""


class HttpConversion(NamedTuple):
    record: RequestRecord
    span: Span | None  # only for a request whose trace context is sampled


class TcpConversion(NamedTuple):
    """What one TCP entry means for the recorder: `opened` (first seen), bytes relayed
    since the connection's last entry, and `closed` (its final entry)."""

    record: TcpRecord
    opened: bool
    closed: bool
    sent: int  # towards the downstream (the response direction)
    received: int  # from the downstream (the request direction)


@dataclass(frozen=True)
class LocalProxy:
    """The proxy whose Envoy logs: who it reports as."""

    workload: Workload  # `proxy.telemetry.own_workload(...)`
    service_host: str  # e.g. reviews.default.svc.cluster.local
    namespace: str
    service: str
    instance: str


class AccessLogConverter:
    """One per sidecar: converts the entries its Envoy logs (`http`, `tcp`).

    Memoises how it names the other side (per endpoint, per caller metadata and
    certificate), and for TCP the bytes already reported per open connection (Envoy's
    periodic entries carry running totals)."""

    def __init__(
        self,
        local: LocalProxy,
        *,
        endpoints: EndpointLookup = no_endpoints,
        rng: random.Random | None = None,
    ):
        self.local = local
        self.endpoints = endpoints
        self._rng = rng
        self._destinations: dict[tuple[str, str], tuple[EndpointSet, Workload]] = {}
        self._callers: dict[tuple[str, str], Workload] = {}
        self._spiffe_ids: dict[bytes, str] = {}
        self._open_tcp: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------ HTTP

    def http(self, log_name: str, entry: accesslog_pb2.HTTPAccessLogEntry) -> HttpConversion:
        reporter = HTTP_LOG_REPORTERS.get(log_name)
        if reporter is None:
            raise AccessLogError(
                f"HTTP access log {log_name!r}: not one of {sorted(HTTP_LOG_REPORTERS)}"
            )
        # every field is read once: each read of a protobuf field builds a Python object
        common, request, response = entry.common_properties, entry.request, entry.response
        headers = dict(request.request_headers)
        authority = request.authority
        upstream_host = socket_address(common.upstream_remote_address)
        meta = common.metadata.filter_metadata if common.HasField("metadata") else None
        if reporter == "source":
            cluster = common.upstream_cluster
            service = cluster_service(cluster) or self.service_of(authority)
            if cluster == PASSTHROUGH_CLUSTER:
                # ALLOW_ANY: the host asked for, as the Python sidecar records it
                service = strip_port(authority).lower()
            source = self.local.workload
            destination = self.destination(service, upstream_host)
            policy = UNKNOWN
        else:
            service = self.local.service_host
            spiffe = self._peer_spiffe_id(common)
            source = self.caller(_peer_metadata(meta, headers), spiffe)
            destination = self.local.workload
            policy = "mutual_tls" if spiffe else "none"
        status = response.response_code.value if response.HasField("response_code") else 0
        flags = response_flags(common.response_flags, response.response_code_details)
        trace = incoming_trace(
            {name: value for name, value in headers.items() if name in TRACE_HEADERS}
        )
        duration_ms = _duration_ms(common)
        start = common.start_time
        start_ns = _ns(start.seconds, start.nanos)
        dry_result, dry_policy = _dry_run(meta)
        grpc_status = _grpc_status(response)
        record = RequestRecord(
            reporter=reporter,
            source=source,
            destination=destination,
            destination_service=service or UNKNOWN,
            method=_method(request.request_method),
            authority=authority,
            path=request.path,
            status=status,
            duration_ms=duration_ms,
            request_bytes=request.request_body_bytes,
            response_bytes=response.response_body_bytes,
            flags=flags,
            upstream_host=upstream_host,
            request_id=request.request_id or headers.get("x-request-id", ""),
            trace_id=trace.trace_id,
            protocol="grpc" if grpc_status or _is_grpc(headers) else "http",
            security_policy=policy,
            dry_run_result=dry_result,
            dry_run_policy=dry_policy,
            start_ns=start_ns,  # 0 (never logged): the recorder takes now minus the duration
            grpc_status=grpc_status,
        )
        span = None
        if trace.sampled and trace.trace_id and trace.span_id:
            span = self._span(record, trace.span_id, start_ns, duration_ms)
        return HttpConversion(record, span)

    def _peer_spiffe_id(self, common: accesslog_pb2.AccessLogCommon) -> str:
        """`peer_spiffe_id` of the entry's peer certificate, memoised on the
        certificate's logged properties (the same few callers, request after request)."""
        if not common.HasField("tls_properties"):
            return ""
        tls = common.tls_properties
        if not tls.HasField("peer_certificate_properties"):
            return ""
        key = tls.peer_certificate_properties.SerializeToString()
        found = self._spiffe_ids.get(key)
        if found is None:
            found = peer_spiffe_id(tls)
            if len(self._spiffe_ids) >= _MAX_MEMO:
                self._spiffe_ids.clear()
            self._spiffe_ids[key] = found
        return found

    def _span(
        self, record: RequestRecord, parent_span_id: str, start_ns: int, duration_ms: float
    ) -> Span:
        """The span of this hop: a child of the span id the request arrived with
        (Envoy without a tracer forwards that context unchanged, see the report in
        `proxy.envoy.access_log_service`)."""
        peer = record.destination if record.reporter == "source" else record.source
        status = record.status
        return Span(
            trace_id=record.trace_id,
            span_id=new_span_id(self._rng),
            parent_span_id=parent_span_id,
            name=f"{record.authority or record.destination_service}/*",
            kind="client" if record.reporter == "source" else "server",
            service=self.local.service,
            namespace=self.local.namespace,
            instance=self.local.instance,
            start_ns=start_ns,
            end_ns=start_ns + int(duration_ms * 1e6),
            status_code=status,
            error=status == 0 or status >= 500,
            attributes={
                "http.method": record.method,
                "http.url": f"http://{record.authority}{record.path}",
                "http.status_code": str(status),
                "response_flags": record.flags,
                "upstream_host": record.upstream_host,
                "request_id": record.request_id,
                "peer.workload": peer.name,
            },
        )

    # ------------------------------------------------------------ TCP

    def tcp(self, log_name: str, entry: accesslog_pb2.TCPAccessLogEntry) -> TcpConversion:
        reporter = TCP_LOG_REPORTERS.get(log_name)
        if reporter is None:
            raise AccessLogError(
                f"TCP access log {log_name!r}: not one of {sorted(TCP_LOG_REPORTERS)}"
            )
        common = entry.common_properties
        flags = response_flags(common.response_flags, common.connection_termination_details)
        if reporter == "source":
            service = cluster_service(common.upstream_cluster)
            upstream = socket_address(common.upstream_remote_address)
            record = TcpRecord(
                "source",
                self.local.workload,
                self.destination(service, upstream),
                service or UNKNOWN,
                UNKNOWN,
                flags,
            )
        else:
            spiffe = self._peer_spiffe_id(common)
            record = TcpRecord(
                "destination",
                self.tcp_caller(spiffe, common.downstream_remote_address),
                self.local.workload,
                self.local.service_host,
                "mutual_tls" if spiffe else "none",
                flags,
            )
        # running totals per connection: periodic entries (if configured) report as
        # they go, the final one closes it
        props = entry.connection_properties
        key = common.stream_id
        final = not common.intermediate_log_entry and common.access_log_type in (
            accesslog_pb2.NotSet,
            accesslog_pb2.TcpConnectionEnd,
        )
        before = self._open_tcp.pop(key, None) if key else None
        opened = before is None
        sent_before, received_before = before or (0, 0)
        if not final and key:
            if len(self._open_tcp) >= _MAX_MEMO:
                self._open_tcp.clear()
            self._open_tcp[key] = (props.sent_bytes, props.received_bytes)
        return TcpConversion(
            record,
            opened,
            final,
            max(0, props.sent_bytes - sent_before),
            max(0, props.received_bytes - received_before),
        )

    # ------------------------------------------------------------ naming the other side

    def destination(self, service: str, upstream: str) -> Workload:
        """The workload behind `upstream` (ip:port) of `service` (an fqdn): its
        registered labels and identity; unknown when no endpoint was chosen or the
        address is not one the registry lists."""
        if not service or not upstream:
            return Workload()
        endpoint_set = self.endpoints(service)
        if endpoint_set is None:
            return Workload()
        key = (service, upstream)
        hit = self._destinations.get(key)
        if hit is not None and hit[0] is endpoint_set:
            return hit[1]
        endpoint = _endpoint_at(endpoint_set, upstream)
        if endpoint is None:
            return Workload()
        ref = service_of_host(service)
        name = ref.name if ref is not None else service
        namespace = ref.namespace if ref is not None else endpoint_set.namespace
        version = endpoint.version or endpoint.labels.get("version", "")
        found = Workload(
            name=workload_name(name, version),
            namespace=namespace,
            principal=endpoint.identity or UNKNOWN,
            app=endpoint.labels.get("app", name) or UNKNOWN,
            version=version or UNKNOWN,
        )
        if len(self._destinations) >= _MAX_MEMO:
            self._destinations.clear()
        self._destinations[key] = (endpoint_set, found)
        return found

    def caller(self, metadata: str, spiffe_id: str) -> Workload:
        """The caller: principal and namespace from its certificate (unknown for a
        plaintext caller), workload, app and version from its metadata header."""
        key = (metadata, spiffe_id)
        found = self._callers.get(key)
        if found is None:
            namespace = identity.parse_spiffe_id(spiffe_id).namespace if spiffe_id else UNKNOWN
            found = decode_peer_metadata(metadata, principal=spiffe_id or UNKNOWN)._replace(
                namespace=namespace
            )
            if len(self._callers) >= _MAX_MEMO:
                self._callers.clear()
            self._callers[key] = found
        return found

    def tcp_caller(self, spiffe_id: str, downstream: address_pb2.Address) -> Workload:
        """The caller of an inbound TCP connection: from its certificate, and its
        workload, app and version from the registry (TCP carries no peer metadata
        header; `proxy.telemetry.caller_workload`, as the Python relay does)."""
        found = self.caller("", spiffe_id)
        if not spiffe_id:
            return found
        spiffe = identity.parse_spiffe_id(spiffe_id)
        ref = ServiceRef(spiffe.namespace, spiffe.service_account)
        endpoint_set = self.endpoints(ref.fqdn)
        if endpoint_set is None:
            return found
        host = socket_address(downstream).rpartition(":")[0].strip("[]")
        named = caller_workload(ref, endpoint_set.endpoints, spiffe_id, host)
        if named is None:
            return found
        return named._replace(principal=found.principal, namespace=found.namespace)

    def service_of(self, authority: str) -> str:
        """The mesh service a request's authority names ("" outside the mesh)."""
        if not authority:
            return ""
        ref = service_of_host(canonical_host(authority, self.local.namespace))
        if ref is None or ref.name == "*":
            return ""
        return ref.fqdn


def _endpoint_at(endpoint_set: EndpointSet, address: str) -> Endpoint | None:
    for ep in endpoint_set.endpoints:
        if ep.address == address or address in ep.tcp_listeners.values():
            return ep
    return None
