"""Envoy's access logs become Meshwork telemetry: Envoy streams one entry per request
to the sidecar's gRPC access-log service (a Unix socket private to the sidecar, like
the ADS one); each entry becomes the `RequestRecord` the Python data plane would have
recorded, so `istio_*` metrics and access records reach the telemetry service the same
way on both data planes.

`request_record` is pure (tested with entries built in memory); `AccessLogService` is
the gRPC shell. TCP connections are logged when they close (counted opened and closed
then). Not converted yet: spans (Envoy's tracer is not configured) and the caller's
app/version labels on the server side (an Envoy client sends no peer-metadata header:
the source is named by its certificate only).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from mesh.hosts import ServiceRef, service_of_host
from mesh.identity import IdentityError, parse_spiffe_id
from mesh.logs import get_logger
from mesh.messages import Endpoint
from proxy.telemetry.records import UNKNOWN, RequestRecord, TcpRecord, Workload

log = get_logger("proxy.dataplane.envoy_telemetry")

# Envoy's response flag fields and their short names (as in Envoy's access log)
RESPONSE_FLAGS = (
    ("failed_local_healthcheck", "LH"),
    ("no_healthy_upstream", "UH"),
    ("upstream_request_timeout", "UT"),
    ("local_reset", "LR"),
    ("upstream_remote_reset", "UR"),
    ("upstream_connection_failure", "UF"),
    ("upstream_connection_termination", "UC"),
    ("upstream_overflow", "UO"),
    ("no_route_found", "NR"),
    ("delay_injected", "DI"),
    ("fault_injected", "FI"),
    ("rate_limited", "RL"),
    ("rate_limit_service_error", "RLSE"),
    ("downstream_connection_termination", "DC"),
    ("upstream_retry_limit_exceeded", "URX"),
    ("stream_idle_timeout", "SI"),
    ("invalid_envoy_request_headers", "IH"),
    ("downstream_protocol_error", "DPE"),
    ("upstream_max_stream_duration_reached", "UMSDR"),
    ("no_filter_config_found", "NFCF"),
    ("duration_timeout", "DT"),
    ("upstream_protocol_error", "UPE"),
    ("no_cluster_found", "NC"),
    ("overload_manager", "OM"),
    ("downstream_remote_reset", "DR"),
)

# the access-log names the translator gives each listener (proxy.envoy.translate)
REPORTER_OF_LOG = {"outbound": "source", "gateway": "source", "inbound": "destination"}


def response_flags(flags: accesslog_pb2.ResponseFlags) -> str:
    """Envoy's short response flags, comma-separated ("-" for none)."""
    names = [short for field, short in RESPONSE_FLAGS if getattr(flags, field, False)]
    if flags.HasField("unauthorized_details"):
        names.append("UAEX")
    return ",".join(names) or "-"


def _ms(duration: object) -> float:
    seconds = getattr(duration, "seconds", 0)
    nanos = getattr(duration, "nanos", 0)
    return seconds * 1000.0 + nanos / 1e6


def _trace_id(headers: dict[str, str]) -> str:
    traceparent = headers.get("traceparent", "")
    parts = traceparent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32:
        return parts[1]
    return headers.get("x-b3-traceid", "")


def _peer_principal(common: accesslog_pb2.AccessLogCommon) -> str:
    peer = common.tls_properties.peer_certificate_properties
    for san in peer.subject_alt_name:
        if san.uri.startswith("spiffe://"):
            return san.uri
    return ""


def _cluster_service(cluster: str) -> ServiceRef | None:
    """`outbound|<port>|<subset>|<fqdn>` -> the service it sends to."""
    parts = cluster.split("|")
    if len(parts) == 4 and parts[0] == "outbound":
        return service_of_host(parts[3])
    return None


def _address(address: object) -> str:
    socket_address = getattr(address, "socket_address", None)
    if socket_address is None or not socket_address.address:
        return ""
    return f"{socket_address.address}:{socket_address.port_value}"


def request_record(
    entry: accesslog_pb2.HTTPAccessLogEntry,
    log_name: str,
    *,
    workload: Workload,
    service_host: str,
    destination_of: Callable[[ServiceRef, str], Workload | None],
) -> RequestRecord | None:
    """The record of one request Envoy logged under `log_name` (None: a listener this
    sidecar does not report on). `destination_of(service, upstream address)` names the
    endpoint's workload on the client side."""
    reporter = REPORTER_OF_LOG.get(log_name)
    if reporter is None:
        return None
    common, request, response = entry.common_properties, entry.request, entry.response
    headers = dict(request.request_headers)
    flags = response_flags(common.response_flags)
    status = response.response_code.value if response.HasField("response_code") else 0
    duration_ms = _ms(common.duration) if common.HasField("duration") else 0.0
    upstream = _address(common.upstream_remote_address)
    if reporter == "source":
        source = workload
        ref = _cluster_service(common.upstream_cluster)
        service = ref.fqdn if ref is not None else UNKNOWN
        found = destination_of(ref, upstream) if ref is not None and upstream else None
        destination = found or Workload()
        policy = UNKNOWN
    else:
        principal = _peer_principal(common)
        source = _source_of(principal)
        destination, service = workload, service_host
        policy = "mutual_tls" if principal else "none"
    start = common.start_time
    return RequestRecord(
        reporter=reporter,
        source=source,
        destination=destination,
        destination_service=service,
        method=method_name(request.request_method),
        authority=request.authority,
        path=request.path,
        status=status,
        duration_ms=duration_ms,
        request_bytes=request.request_body_bytes,
        response_bytes=response.response_body_bytes,
        flags=flags,
        upstream_host=upstream,
        request_id=request.request_id,
        trace_id=_trace_id(headers),
        protocol="http",
        security_policy=policy,
        start_ns=start.seconds * 1_000_000_000 + start.nanos,
    )


def method_name(method: int) -> str:
    name = base_pb2.RequestMethod.Name(method)
    return "" if name == "METHOD_UNSPECIFIED" else name


def _source_of(principal: str) -> Workload:
    """The caller as its certificate names it (workload, app and version unknown)."""
    if not principal:
        return Workload()
    try:
        spiffe = parse_spiffe_id(principal)
    except IdentityError:
        return Workload()
    return Workload(
        name=UNKNOWN,
        namespace=spiffe.namespace,
        principal=principal,
        app=UNKNOWN,
        version=UNKNOWN,
    )


def endpoint_at(endpoints: list[Endpoint], address: str) -> Endpoint | None:
    """The endpoint listening at `address` (its HTTP listener or a TCP relay)."""
    for endpoint in endpoints:
        if endpoint.address == address or address in endpoint.tcp_listeners.values():
            return endpoint
    return None


# the TCP access-log names the translator gives each listener
REPORTER_OF_TCP_LOG = {"outbound_tcp": "source", "inbound_tcp": "destination"}


def tcp_record(
    entry: accesslog_pb2.TCPAccessLogEntry,
    log_name: str,
    *,
    workload: Workload,
    service_host: str,
    destination_of: Callable[[ServiceRef, str], Workload | None],
) -> tuple[TcpRecord, int, int] | None:
    """One closed TCP connection Envoy relayed: its record and the bytes sent (the
    response direction) and received (the request direction), as Istio counts them.
    Envoy logs a connection when it closes, so it is counted opened and closed then."""
    reporter = REPORTER_OF_TCP_LOG.get(log_name)
    if reporter is None:
        return None
    common = entry.common_properties
    flags = response_flags(common.response_flags)
    if reporter == "source":
        ref = _cluster_service(common.upstream_cluster)
        upstream = _address(common.upstream_remote_address)
        found = destination_of(ref, upstream) if ref is not None and upstream else None
        record = TcpRecord(
            "source", workload, found or Workload(), ref.fqdn if ref else UNKNOWN, UNKNOWN, flags
        )
    else:
        principal = _peer_principal(common)
        policy = "mutual_tls" if principal else "none"
        record = TcpRecord(
            "destination", _source_of(principal), workload, service_host, policy, flags
        )
    props = entry.connection_properties
    return record, props.sent_bytes, props.received_bytes


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):
    """Envoy's gRPC access-log service on `socket_path` (0600, removed on stop)."""

    def __init__(
        self,
        socket_path: Path,
        on_entry: Callable[[accesslog_pb2.HTTPAccessLogEntry, str], None],
        on_tcp_entry: Callable[[accesslog_pb2.TCPAccessLogEntry, str], None],
    ):
        self.socket_path = socket_path
        self.on_entry = on_entry
        self.on_tcp_entry = on_tcp_entry
        self.entries = 0
        self.failures = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        # a socket left by a sidecar of this instance that died (its Envoy reconnects)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        server = grpc.aio.server()
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self, server)
        old_umask = os.umask(0o177)
        try:
            server.add_insecure_port(f"unix:{self.socket_path}")
        finally:
            os.umask(old_umask)
        await server.start()
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(0.5)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        log_name = ""
        async for message in request_iterator:
            if message.HasField("identifier"):
                log_name = message.identifier.log_name
            for entry in message.http_logs.log_entry:
                self._handle(self.on_entry, entry, log_name)
            for tcp_entry in message.tcp_logs.log_entry:
                self._handle(self.on_tcp_entry, tcp_entry, log_name)
        return als_pb2.StreamAccessLogsResponse()

    def _handle(self, handler: Callable[[Any, str], None], entry: Any, log_name: str) -> None:
        self.entries += 1
        try:
            handler(entry, log_name)
        except Exception as e:
            self.failures += 1
            if self.failures == 1 or self.failures % 10_000 == 0:
                log.error("envoy.access_log_failed", failures=self.failures, error=repr(e))
