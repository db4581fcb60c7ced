"""The response side of one HTTP/2 stream: what `Exchange` is for an HTTP/1 request.

Same interface (`respond`, `forward`, and the telemetry attributes), so the listeners'
handlers do not know which protocol the client speaks. Differences: no
connection-level framing (HTTP/2 frames the body), trailers are relayed (an upstream
body's `trailers`), and `tunnel` is refused (no extended CONNECT over HTTP/2 here:
upgrades stay on HTTP/1.1).
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from http import HTTPStatus
from typing import TYPE_CHECKING

from ..body import BodyStream
from ..exchange_state import (  # grpc_status_of: re-exported
    ExchangeState,
    check_local_status,
    discard_body,
    grpc_status_of,
)
from ..headers import HOP_BY_HOP, connection_tokens
from ..request import Request
from ..wire import no_body_status

if TYPE_CHECKING:
    from ..client import UpstreamResponse
    from .server import H2ServerProtocol

# fields HTTP/2 forbids (RFC 9113 §8.2.2), and what the engine itself frames
_SKIP_FIELDS: frozenset[str] = HOP_BY_HOP | {"content-length", "host"}


class H2Exchange(ExchangeState):
    """Answers one HTTP/2 stream."""

    __slots__ = ("_protocol", "_stream_id")

    def __init__(self, protocol: H2ServerProtocol, stream_id: int, request: Request) -> None:
        super().__init__(request)  # close_after: meaningless per stream; kept for the handlers
        self._protocol = protocol
        self._stream_id = stream_id

    @property
    def request_bytes(self) -> int:
        return self._request.body.bytes_received

    @property
    def peak_write_buffer(self) -> int:
        return 0

    @property
    def closing(self) -> bool:
        return False

    async def respond(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] = b"",
    ) -> None:
        """A local response; `grpc-status` among `headers` with no body makes it a
        gRPC trailers-only response (one HEADERS frame ending the stream)."""
        check_local_status(status)
        no_body = self._request.method == "HEAD" or no_body_status(status)
        if isinstance(body, bytes | bytearray | memoryview):
            data = bytes(body) if not no_body else b""
            fields = self._head(status, headers, len(body) if not no_body_status(status) else None)
            self.grpc_status = grpc_status_of(headers)
            self._begin(status)
            connection = self._protocol.connection
            connection.send_head(self._stream_id, fields, end_stream=not data)
            if data:
                connection.send_data(self._stream_id, data)
                connection.end_stream(self._stream_id)
                self.response_bytes = len(data)
            self._protocol.flush()
            self._finish()
            return
        fields = self._head(status, headers, None)
        self._begin(status)
        self._protocol.connection.send_head(self._stream_id, fields, end_stream=no_body)
        self._protocol.flush()
        if no_body:
            await discard_body(body)
        else:
            await self._stream(body)
            self._end(None)
        self._finish()

    async def forward(self, response: UpstreamResponse) -> None:
        """Stream an upstream response (HTTP/1.1 or HTTP/2) and its trailers."""
        try:
            status = response.status
            if status < 200:
                raise ValueError("a 101 response is answered with tunnel()")
            no_body = self._request.method == "HEAD" or no_body_status(status)
            nominated = connection_tokens(response.headers)
            length = response.content_length if status != 204 else None
            fields = self._head(status, response.headers, length, nominated)
            self.grpc_status = grpc_status_of(response.headers)
            self._begin(status)
            connection = self._protocol.connection
            body = response.body
            if no_body:
                connection.send_head(self._stream_id, fields, end_stream=True)
                self._protocol.flush()
                response.close()
            elif body.complete and not body.failed and not body.buffered and not body.trailers:
                connection.send_head(self._stream_id, fields, end_stream=True)
                self._protocol.flush()
            elif body.complete and not body.failed:
                # all of it arrived already (a unary gRPC answer): head, body and end
                # in as few frames as the windows allow, no waiting per chunk
                connection.send_head(self._stream_id, fields, end_stream=False)
                ready = body.take_ready()
                self.response_bytes += sum(len(chunk) for chunk in ready)
                self._end(body.trailers, ready)
            else:
                connection.send_head(self._stream_id, fields, end_stream=False)
                self._protocol.flush()
                await self._stream(body)
                self._end(body.trailers)
        except BaseException:
            response.close()
            raise
        self._finish()

    async def tunnel(self, response: UpstreamResponse) -> None:
        response.close()
        raise ValueError("upgrades are not relayed over HTTP/2")

    def respond_error(self, status: int) -> None:
        """The engine's own answer when a handler failed before responding."""
        text = f"{HTTPStatus(status).phrase}\n".encode()
        fields = [
            (":status", str(status)),
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(text))),
        ]
        self._begin(status)
        connection = self._protocol.connection
        connection.send_head(self._stream_id, fields, end_stream=False)
        connection.send_data(self._stream_id, text)
        connection.end_stream(self._stream_id)
        self.response_bytes = len(text)
        self._finish()

    # -- internals -----------------------------------------------------------------------

    def _head(
        self,
        status: int,
        headers: list[tuple[str, str]],
        length: int | None,
        nominated: frozenset[str] = frozenset(),
    ) -> list[tuple[str, str]]:
        self._check_unanswered()
        fields = [(":status", str(status))]
        skip = _SKIP_FIELDS | nominated if nominated else _SKIP_FIELDS
        for name, value in headers:
            lowered = name.lower()
            if lowered not in skip and lowered[:1] != ":":
                fields.append((lowered, value))
        if length is not None:
            fields.append(("content-length", str(length)))
        return fields

    async def _stream(self, chunks: AsyncIterable[bytes]) -> None:
        protocol = self._protocol
        connection = protocol.connection
        stream_id = self._stream_id
        if isinstance(chunks, BodyStream):
            ready = chunks.take_ready()
            for chunk in ready:
                connection.send_data(stream_id, chunk)
                self.response_bytes += len(chunk)
            protocol.flush()
        async for chunk in chunks:
            if not chunk:
                continue
            await protocol.wait_writable(stream_id)
            connection.send_data(stream_id, chunk)
            self.response_bytes += len(chunk)
            protocol.flush()

    def _end(self, trailers: list[tuple[str, str]] | None, last: list[bytes] | None = None) -> None:
        """End the stream after `last` (the rest of the body), with `trailers` if any."""
        if trailers:
            trailers = [(n.lower(), v) for n, v in trailers if n.lower() not in _SKIP_FIELDS]
            status = grpc_status_of(trailers)
            if status:
                self.grpc_status = status
        self._protocol.connection.send_last(self._stream_id, last or [], trailers or None)
        self._protocol.flush()
