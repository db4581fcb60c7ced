"""The sidecar's gRPC access-log service (`envoy.service.accesslog.v3.AccessLogService`)
for its Envoy: on a Unix socket private to the sidecar, it receives every HTTP and TCP
access-log entry, converts it (`access_log_convert`) and feeds the same
`TelemetryRecorder` the Python data plane feeds, so the metrics, access records and
spans reach the telemetry service over the same stream, counted once.

    converter = AccessLogConverter(LocalProxy(...), endpoints=lambda fqdn: ...)
    async with AccessLogServer(socket_path, AccessLogIngest(converter, recorder)):
        ...  # Envoy's bootstrap names the socket as the `access_log_cluster`

`AccessLogIngest` is the part without I/O (one stream's messages in, recorder calls
out); `AccessLogServer` is the grpc.aio shell around it.

Spans: with Envoy's tracer on (`proxy.dataplane.envoy.ENVOY_TRACER`), Envoy reports
them to the OTLP receiver `trace_service` and the access logs give none; with it off,
a sampled request's hop becomes a span that is a child of the context it arrived with.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from mesh.logs import get_logger
from proxy.telemetry.recorder import TelemetryRecorder

from .access_log_convert import AccessLogConverter, AccessLogError
from .private_grpc import PrivateGrpcServer, PrivateSocketError

log = get_logger("proxy.envoy.access_log")

__all__ = ["AccessLogIngest", "AccessLogServer", "AccessLogServerError", "IngestCounts"]


# the access-log service cannot serve (its socket is taken or cannot be bound)
AccessLogServerError = PrivateSocketError


@dataclass
class IngestCounts:
    http: int = 0  # HTTP entries recorded
    tcp: int = 0  # TCP entries recorded
    failed: int = 0  # entries that could not be converted (dropped, counted)


class AccessLogIngest:
    """Converts one Envoy's access-log messages and records them (no I/O).

    Envoy names a stream once, in its first message (`identifier.log_name`); each
    stream's state is the log name it was given, kept by the caller and passed back."""

    def __init__(
        self,
        converter: AccessLogConverter,
        recorder: TelemetryRecorder,
        *,
        spans: bool = True,
        metrics: bool = True,
    ):
        """`spans`: record a span for each sampled request's hop; off while Envoy's own
        tracer reports the spans (each hop would be recorded twice). `metrics`: count
        each HTTP entry; off in the stats telemetry mode, where Envoy counts every
        request and the log carries only sampled or failed ones, each an access record
        (docs/architecture.md §7). TCP entries are counted either way."""
        self.converter = converter
        self.recorder = recorder
        self.spans = spans
        self.metrics = metrics
        self.counts = IngestCounts()

    def on_message(self, log_name: str, message: als_pb2.StreamAccessLogsMessage) -> str:
        """Record the entries of `message`; returns the stream's log name from now on.
        Never raises: an entry that cannot be converted is counted and logged (its
        field values never reach the log)."""
        if message.HasField("identifier") and message.identifier.log_name:
            log_name = message.identifier.log_name
        recorder, convert = self.recorder, self.converter
        for http_entry in message.http_logs.log_entry:
            try:
                http = convert.http(log_name, http_entry)
            except Exception as e:
                self._failed(log_name, e)
                continue
            if self.metrics:
                recorder.record_request(http.record)
            else:
                recorder.record_access(http.record)
            if http.span is not None and self.spans:
                recorder.record_span(http.span)
            self.counts.http += 1
        for tcp_entry in message.tcp_logs.log_entry:
            try:
                tcp = convert.tcp(log_name, tcp_entry)
            except Exception as e:
                self._failed(log_name, e)
                continue
            if tcp.opened:
                recorder.record_tcp_opened(tcp.record)
            if tcp.closed:
                recorder.record_tcp_closed(tcp.record, tcp.sent, tcp.received)
            else:
                recorder.record_tcp_bytes(tcp.record, tcp.sent, tcp.received)
            self.counts.tcp += 1
        return log_name

    def _failed(self, log_name: str, error: Exception) -> None:
        self.counts.failed += 1
        failed = self.counts.failed
        if failed == 1 or failed % 10_000 == 0:
            # AccessLogError names the log; anything else is a bug: its type, not values
            reason = str(error) if isinstance(error, AccessLogError) else type(error).__name__
            log.error("access_log.entry_dropped", log_name=log_name, failed=failed, error=reason)


class _AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, ingest: AccessLogIngest, server: PrivateGrpcServer):
        self._ingest = ingest
        self._server = server

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        log_name = ""
        async for message in request_iterator:
            self._server.touch()
            log_name = self._ingest.on_message(log_name, message)
        return als_pb2.StreamAccessLogsResponse()


class AccessLogServer(PrivateGrpcServer):
    """The access-log service on `socket_path` (created 0600, removed on stop).
    Stopping: drain Envoy, `wait_quiet`, stop Envoy, then `stop()` (Envoy buffers
    entries up to its flush interval, 1 s by default, and drops them when it exits)."""

    def __init__(self, socket_path: Path | str, ingest: AccessLogIngest):
        self.ingest = ingest
        super().__init__(
            socket_path,
            "access-log service",
            lambda server: als_pb2_grpc.add_AccessLogServiceServicer_to_server(
                _AccessLogServicer(ingest, self), server
            ),
        )

    @property
    def counts(self) -> IngestCounts:
        return self.ingest.counts

    async def stop(self, grace: float = 1.0) -> bool:
        stopped = await super().stop(grace)
        if stopped:
            log.info("access_log.stopped", socket=str(self.socket_path), **vars(self.counts))
        return stopped

    async def __aenter__(self) -> AccessLogServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
