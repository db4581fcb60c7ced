"""The sidecar's OTLP trace receiver (`opentelemetry.proto.collector.trace.v1.
TraceService`, gRPC) for its Envoy's OpenTelemetry tracer: on a Unix socket private to
the sidecar, next to the access-log one, it converts each exported span
(`otlp_spans`) and feeds the same `TelemetryRecorder` the Python data plane feeds.

    spans = OtlpSpanConverter(access_log_converter)
    async with TraceServer(socket_path, SpanIngest(spans, recorder)):
        ...  # Envoy's bootstrap names the socket as the `tracing_cluster`

`SpanIngest` is the part without I/O; `TraceServer` the grpc.aio shell. The Python
packages ship the OTLP messages but no gRPC stubs: the one method is registered by
hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from mesh.logs import get_logger
from proxy.telemetry.recorder import TelemetryRecorder

from .otlp_spans import OtlpSpanConverter, SpanError, spans_of
from .private_grpc import PrivateGrpcServer

log = get_logger("proxy.envoy.trace_service")

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


@dataclass
class SpanCounts:
    spans: int = 0  # spans recorded
    failed: int = 0  # spans that could not be converted (dropped, counted)


class SpanIngest:
    """Converts one Envoy's export requests and records their spans (no I/O)."""

    def __init__(self, converter: OtlpSpanConverter, recorder: TelemetryRecorder):
        self.converter = converter
        self.recorder = recorder
        self.counts = SpanCounts()

    def on_export(
        self, request: trace_service_pb2.ExportTraceServiceRequest
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        """Never raises: a span that cannot be converted is counted and logged
        (without its attribute values). (These OTLP messages predate `partial_success`:
        Envoy is not told.)"""
        for otlp in spans_of(request):
            try:
                span = self.converter.span(otlp)
            except Exception as e:
                self._failed(e)
                continue
            if span.attributes.get("http.method") == "CONNECT":
                # the app's CONNECT tunnel: each call in it has its own span (served by
                # `outbound_tunnel`); the Python proxy opens none for the tunnel either
                continue
            self.recorder.record_span(span)
            self.counts.spans += 1
        return trace_service_pb2.ExportTraceServiceResponse()

    def _failed(self, error: Exception) -> None:
        self.counts.failed += 1
        failed = self.counts.failed
        if failed == 1 or failed % 10_000 == 0:
            reason = str(error) if isinstance(error, SpanError) else type(error).__name__
            log.error("trace_service.span_dropped", failed=failed, error=reason)


class TraceServer(PrivateGrpcServer):
    """The OTLP trace receiver on `socket_path` (created 0600, removed on stop)."""

    def __init__(self, socket_path: Path | str, ingest: SpanIngest):
        self.ingest = ingest
        super().__init__(socket_path, "trace receiver", self._add)

    @property
    def counts(self) -> SpanCounts:
        return self.ingest.counts

    def _add(self, server: grpc.aio.Server) -> None:
        async def export(
            request: trace_service_pb2.ExportTraceServiceRequest,
            context: grpc.aio.ServicerContext,
        ) -> trace_service_pb2.ExportTraceServiceResponse:
            self.touch()
            return self.ingest.on_export(request)

        handler = grpc.unary_unary_rpc_method_handler(
            export,
            request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
            response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(TRACE_SERVICE, {"Export": handler}),)
        )

    async def stop(self, grace: float = 1.0) -> bool:
        stopped = await super().stop(grace)
        if stopped:
            log.info("trace_service.stopped", socket=str(self.socket_path), **vars(self.counts))
        return stopped

    async def __aenter__(self) -> TraceServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
