"""OTLP transports, the I/O shell under both exporters (spans: `exporter.py`,
metrics: `MetricsExporter`): one `send(signal, request)` that says whether the
collector took the request, wants it again later, or refused it for good.

- `http/protobuf` (the default) and `http/json`: POST to `<endpoint>/v1/traces` and
  `/v1/metrics` (see `signal_url`), `Content-Type: application/x-protobuf` or
  `application/json`; 408, 429, 500, 502, 503, 504 are retryable, other statuses
  final (OTLP/HTTP's rules).
- `grpc`: generic unary calls on a grpcio channel
  (`/opentelemetry.proto.collector.trace.v1.TraceService/Export`, `.../metrics.v1.
  MetricsService/Export`), TLS for an `https://` endpoint; the configured headers go
  as call metadata (lower-cased, as gRPC requires). UNAVAILABLE, RESOURCE_EXHAUSTED,
  DEADLINE_EXCEEDED, ABORTED, CANCELLED, OUT_OF_RANGE and DATA_LOSS are retryable,
  other codes final (OTLP/gRPC's rules).

Header values never reach a log or an error: results carry a status, not headers.
"""

from __future__ import annotations

import enum
import json
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
import grpc
from google.protobuf.message import Message
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from services.telemetry.otlp_json import to_otlp_json

Signal = Literal["traces", "metrics"]
PROTOCOLS = ("http/protobuf", "http/json", "grpc")
GRPC_DEFAULT_PORT = 4317

RETRYABLE_HTTP = frozenset({408, 429, 500, 502, 503, 504})
RETRYABLE_GRPC = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.DATA_LOSS,
    }
)
GRPC_METHODS: dict[Signal, str] = {
    "traces": "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    "metrics": "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
}
_RESPONSES: dict[Signal, Any] = {
    "traces": ExportTraceServiceResponse,
    "metrics": ExportMetricsServiceResponse,
}
# what a partial success says was refused, per signal (proto field / JSON key)
_REJECTED_FIELD: dict[Signal, tuple[str, str]] = {
    "traces": ("rejected_spans", "rejectedSpans"),
    "metrics": ("rejected_data_points", "rejectedDataPoints"),
}


class Outcome(enum.Enum):
    OK = "ok"
    RETRY = "retry"
    REJECTED = "rejected"


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    detail: str = ""  # "HTTP 503", "UNAVAILABLE", "ClientConnectorError": never a header
    rejected: int = 0  # items the collector refused in a partial success


class OtlpTransport(Protocol):
    async def send(self, signal: Signal, request: Message) -> SendResult: ...

    async def close(self) -> None: ...


def signal_url(endpoint: str, signal: Signal) -> str:
    """OTLP/HTTP's URL for `signal`: `<endpoint>/v1/<signal>` for an endpoint without
    a path; an endpoint naming one signal's path (`.../v1/traces`, `.../traces`) gives
    the other signal's by swapping the last segment; any other path is the base."""
    url = endpoint.rstrip("/")
    path = urllib.parse.urlsplit(url).path
    if path in ("", "/"):
        return f"{url}/v1/{signal}"
    for known in ("traces", "metrics"):
        if path.endswith("/" + known):
            return url[: -len(known)] + signal
    return f"{url}/v1/{signal}"


def grpc_target(endpoint: str) -> tuple[str, bool]:
    """(`host:port`, TLS?) for a gRPC endpoint URL (`http://collector:4317`)."""
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port or GRPC_DEFAULT_PORT}", parts.scheme == "https"


def _partial(signal: Signal, answer: Message | dict[str, Any] | None) -> int:
    """How many items a (partial success) answer says were refused; 0 when unsure:
    the answer is advisory, a garbled one changes nothing."""
    proto_field, json_key = _REJECTED_FIELD[signal]
    try:
        if isinstance(answer, dict):
            return int(answer.get("partialSuccess", {}).get(json_key, 0))
        if answer is not None and answer.DESCRIPTOR.fields_by_name.get("partial_success"):
            return int(getattr(answer.partial_success, proto_field))  # type: ignore[attr-defined]
    except (TypeError, ValueError, AttributeError):
        return 0
    return 0


class HttpTransport:
    def __init__(
        self,
        endpoint: str,
        headers: Iterable[tuple[str, str]],
        *,
        json_encoding: bool = False,
        timeout_s: float = 10.0,
    ):
        self.endpoint = endpoint
        self.json_encoding = json_encoding
        content_type = "application/json" if json_encoding else "application/x-protobuf"
        self.headers = {**dict(headers), "Content-Type": content_type}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, signal: Signal, request: Message) -> SendResult:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        body = to_otlp_json(request) if self.json_encoding else request.SerializeToString()
        try:
            async with self._session.post(
                signal_url(self.endpoint, signal), data=body, headers=self.headers
            ) as r:
                status = r.status
                answer = await r.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return SendResult(Outcome.RETRY, type(e).__name__)
        if 200 <= status < 300:
            return SendResult(Outcome.OK, rejected=_partial(signal, self._decode(signal, answer)))
        outcome = Outcome.RETRY if status in RETRYABLE_HTTP else Outcome.REJECTED
        return SendResult(outcome, f"HTTP {status}")

    def _decode(self, signal: Signal, answer: bytes) -> Message | dict[str, Any] | None:
        if not answer:
            return None
        try:
            if self.json_encoding:
                data = json.loads(answer)
                return data if isinstance(data, dict) else None
            return _RESPONSES[signal].FromString(answer)  # type: ignore[no-any-return]
        except Exception:  # advisory: a collector's garbled answer changes nothing
            return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class GrpcTransport:
    def __init__(
        self, endpoint: str, headers: Iterable[tuple[str, str]], *, timeout_s: float = 10.0
    ):
        self.target, self.secure = grpc_target(endpoint)
        self.metadata = tuple((k.lower(), v) for k, v in headers)
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None

    def _call(self, signal: Signal) -> Any:
        if self._channel is None:
            self._channel = (
                grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials())
                if self.secure
                else grpc.aio.insecure_channel(self.target)
            )
        return self._channel.unary_unary(
            GRPC_METHODS[signal],
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=_RESPONSES[signal].FromString,
        )

    async def send(self, signal: Signal, request: Message) -> SendResult:
        try:
            answer = await self._call(signal)(
                request, timeout=self.timeout_s, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as e:
            code = e.code()
            outcome = Outcome.RETRY if code in RETRYABLE_GRPC else Outcome.REJECTED
            return SendResult(outcome, code.name)
        return SendResult(Outcome.OK, rejected=_partial(signal, answer))

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def transport_for(
    protocol: str, endpoint: str, headers: Iterable[tuple[str, str]], timeout_s: float
) -> OtlpTransport:
    if protocol == "grpc":
        return GrpcTransport(endpoint, headers, timeout_s=timeout_s)
    return HttpTransport(
        endpoint, headers, json_encoding=protocol == "http/json", timeout_s=timeout_s
    )


__all__ = [
    "PROTOCOLS",
    "GrpcTransport",
    "HttpTransport",
    "OtlpTransport",
    "Outcome",
    "SendResult",
    "signal_url",
    "transport_for",
]
