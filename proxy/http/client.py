"""One upstream HTTP/1.1 connection: sends a request, parses the response.

`UpstreamConnection` is the asyncio Protocol; `UpstreamPool` (pool.py) owns the
connections and decides reuse. Requests are never pipelined upstream: one exchange at
a time per connection, so any byte arriving outside an exchange means the connection is
broken.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from .body import BodyInterrupted, BodyStream
from .errors import UpstreamProtocolError, UpstreamResetError
from .flow import ReadGate, WriteGate
from .h1.encode import CRLF, LAST_CHUNK, chunk_size_line
from .limits import Limits
from .wire import (
    no_body_status,
    parse_content_length,
    response_is_chunked,
)

if TYPE_CHECKING:
    from .tunnel import Tunnel

_HELD = object()  # read-pause owner: too many bytes held before a tunnel starts

# 1xx heads accepted before the final response (Envoy drops repeats; nobody sends many).
_MAX_INTERIM_RESPONSES = 16

_NAME_CACHE: dict[bytes, str] = {}
_NAME_CACHE_MAX = 512

# Header names the response parser acts on, mapped to small codes.
_CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION = 1, 2, 3
_SPECIAL = {
    "content-length": _CONTENT_LENGTH,
    "transfer-encoding": _TRANSFER_ENCODING,
    "connection": _CONNECTION,
}


class StaleConnectionError(UpstreamResetError):
    """A reused connection died before any response byte: the request may be retried."""


class _PoolHooks(Protocol):
    def _release(self, connection: UpstreamConnection, reusable: bool) -> None: ...
    def _forget(self, connection: UpstreamConnection) -> None: ...
    def _note_write_peak(self, buffered: int) -> None: ...


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """Where a response came from; `ssl_object` lets mTLS code read the peer certificate."""

    peer: tuple[str, int]
    local: tuple[str, int]
    ssl_object: ssl.SSLObject | None


class UpstreamResponse:
    """A response head from the upstream plus its streaming body.

    The connection goes back to the pool once the body has been fully received (or is
    closed when it cannot be reused). A handler that does not forward or tunnel a
    response must call `close()`.
    """

    __slots__ = (
        "_connection",
        "body",
        "chunked",
        "connection",
        "content_length",
        "headers",
        "http_version",
        "keep_alive",
        "reason",
        "status",
    )

    def __init__(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        body: BodyStream,
        http_version: str,
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
        connection: UpstreamConnection,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.http_version = http_version
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.connection: ConnectionInfo = connection.info
        self._connection = connection

    def close(self) -> None:
        """Done with this response: a connection still carrying its body is closed."""
        self._connection.discard(self)

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} from {self.connection.peer}>"


class UpstreamConnection(asyncio.Protocol):
    """An HTTP/1.1 client connection, one exchange at a time."""

    def __init__(self, pool: _PoolHooks, limits: Limits) -> None:
        self._pool = pool
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = HttpResponseParser(self)
        self._read_gate: ReadGate | None = None
        self._write_gate = WriteGate()
        self.info = ConnectionInfo(("", 0), ("", 0), None)
        self.idle_since = 0.0
        self._exchanges = 0
        self._closed = False
        self._dead = False  # seen something that forbids reuse
        self._tunnel: Tunnel | None = None
        self._held: list[bytes] = []  # bytes after a 101 head, until the tunnel starts
        self._held_bytes = 0
        self._body_task: asyncio.Task[None] | None = None
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self._head_future: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._body: BodyStream | None = None
        self._sending: BodyStream | None = None
        self._head_request = False
        self._upgrade_requested = False
        self._upgraded = False
        self._request_sent = False
        self._response_done = False
        self._keep_alive = False
        self._replace_parser = False
        self._got_bytes = False
        self._interim = 0
        self._reset_head()

    def _reset_head(self) -> None:
        self._reason = b""
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._content_lengths: list[str] | None = None
        self._transfer_encodings: list[str] | None = None
        self._connection_tokens = ""
        self._in_head = False
        self._quiet_bytes = 0

    # -- state the pool reads ------------------------------------------------------------

    @property
    def usable(self) -> bool:
        transport = self._transport
        return not (self._closed or self._dead or transport is None or transport.is_closing())

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._dead = True
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._read_gate = ReadGate(transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.info = ConnectionInfo(
            (peer[0], peer[1]), (local[0], local[1]), transport.get_extra_info("ssl_object")
        )

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.from_upstream(data)
            return
        if self._upgraded:
            self._hold(data)
            return
        if self._head_future is None or self._response_done:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self.abort()
            return
        self._got_bytes = True
        self._progress = False
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self._hold(data[upgrade.args[0] :])
            return
        except HttpParserError as error:
            cause = error.__context__
            if isinstance(cause, UpstreamProtocolError):
                self._protocol_error(str(cause))
            else:
                self._protocol_error(f"malformed response: {error}")
            return
        if self._progress:
            self._quiet_bytes = 0
        else:
            # A head or trailer that never ends: bound what httptools accumulates.
            self._quiet_bytes += len(data)
            if self._quiet_bytes > self._limits.max_header_bytes:
                self._protocol_error("response head too large")
                return
        if self._response_done:
            if self._replace_parser:
                self._parser = HttpResponseParser(self)
            self._maybe_release()

    def eof_received(self) -> bool:
        if self._tunnel is not None:
            self._tunnel.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._write_gate.fail(UpstreamResetError("upstream connection lost"))
        if self._tunnel is not None:
            self._tunnel.close()
        future = self._head_future
        if future is not None and not future.done():
            if not self._got_bytes and self._exchanges > 1:
                future.set_exception(StaleConnectionError("pooled connection closed by upstream"))
            else:
                future.set_exception(
                    UpstreamResetError("upstream closed the connection before the response head")
                )
        body = self._body
        if body is not None and not body.complete:
            if exc is None and body.length is None and not body.chunked:
                body.feed_eof()  # a body delimited by the close (HTTP/1.0 style)
                self._response_done = True
            else:
                body.set_exception(UpstreamResetError("upstream closed the connection mid-body"))
        if self._body_task is not None and not self._body_task.done():
            self._body_task.cancel()
        self._pool._forget(self)

    def pause_writing(self) -> None:
        assert self._transport is not None
        buffered = self._transport.get_write_buffer_size()
        self._write_gate.pause(buffered)
        self._pool._note_write_peak(buffered)
        if self._tunnel is not None:
            self._tunnel.upstream_write_paused()

    def resume_writing(self) -> None:
        self._write_gate.resume()
        if self._tunnel is not None:
            self._tunnel.upstream_write_resumed()

    # -- one exchange ----------------------------------------------------------------------

    async def exchange(
        self, head: bytes, body: BodyStream | bytes | None, *, head_request: bool, upgrade: bool
    ) -> UpstreamResponse:
        """Send a request (head already encoded) and return once the response head is in."""
        transport = self._transport
        if transport is None or not self.usable:
            raise StaleConnectionError("connection already closed")
        self._reset_exchange()
        self._exchanges += 1
        self._head_request = head_request
        self._upgrade_requested = upgrade
        future = self._head_future = self._loop.create_future()
        try:
            if isinstance(body, BodyStream):
                fully_sent = await self._send_body(transport, head, body)
                if not fully_sent:
                    self._early_response(body)
                else:
                    self._request_sent = True
            else:
                transport.writelines((head, body) if body else (head,))
                self._request_sent = True
            response = await future
        except BaseException:
            # Cancelled, or the request body failed: the upstream holds a partial request.
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # already reported through the raised error
            self.abort()
            raise
        if self._head_future is future and self._response_done:
            self._maybe_release()  # a complete answer that arrived while we were sending
        return response

    async def _send_body(self, transport: asyncio.Transport, head: bytes, body: BodyStream) -> bool:
        """Stream `body`; False when the final response head arrived first."""
        chunked = body.length is None
        ready = body.take_ready()
        parts = [head]
        for chunk in ready:
            if chunked:
                parts += (chunk_size_line(len(chunk)), chunk, CRLF)
            else:
                parts.append(chunk)
        if body.complete and not body.failed:
            if chunked:
                parts.append(LAST_CHUNK)
            transport.writelines(parts)
            return True
        transport.writelines(parts)
        self._sending = body
        try:
            return await self._stream_rest(transport, body, chunked, interruptible=True)
        finally:
            self._sending = None

    async def _stream_rest(
        self, transport: asyncio.Transport, body: BodyStream, chunked: bool, *, interruptible: bool
    ) -> bool:
        gate = self._write_gate
        write = transport.write
        while True:
            if gate.paused:
                await gate.wait()
            if interruptible and self._response is not None:
                return False
            try:
                chunk = await body.next_chunk(interruptible=interruptible)
            except BodyInterrupted:
                return False
            if chunk is None:
                break
            if not chunk:
                continue
            if chunked:
                transport.writelines((chunk_size_line(len(chunk)), chunk, CRLF))
            else:
                write(chunk)
        if chunked:
            write(LAST_CHUNK)
        return True

    def _early_response(self, body: BodyStream) -> None:
        """The final response head arrived while the request body was still streaming."""
        response = self._response
        assert response is not None and self._transport is not None
        self._dead = True  # the request/response boundary is no longer clean
        if response.status >= 400:
            # The upstream refused the request; sending the rest would be wasted.
            self._request_sent = True
            return
        # A success while still uploading is full-duplex streaming (e.g. an echo): keep
        # sending, in the one place where a direct await cannot serve both directions.
        chunked = body.length is None
        transport = self._transport
        self._body_task = self._loop.create_task(
            self._finish_body(transport, body, chunked), name=f"upstream-body-{self.info.peer}"
        )

    async def _finish_body(
        self, transport: asyncio.Transport, body: BodyStream, chunked: bool
    ) -> None:
        try:
            await self._stream_rest(transport, body, chunked, interruptible=False)
        except Exception:
            # The client's body failed or the upstream went away: the response cannot
            # complete correctly either.
            self.abort()
            return
        self._request_sent = True
        self._maybe_release()

    def _maybe_release(self) -> None:
        if not (self._response_done and self._request_sent) or self._head_future is None:
            return
        reusable = self._keep_alive and not self._dead and self.usable
        self._head_future = None
        self._pool._release(self, reusable)

    def discard(self, response: UpstreamResponse) -> None:
        """The handler is done with `response`, whether or not it read the body."""
        if self._response is response and not (self._response_done and self._request_sent):
            self.abort()

    def _protocol_error(self, message: str) -> None:
        error = UpstreamProtocolError(message)
        future = self._head_future
        if future is not None and not future.done():
            future.set_exception(error)
        elif self._body is not None and not self._body.complete:
            self._body.set_exception(error)
        self.abort()

    # -- tunnel ----------------------------------------------------------------------------

    def _hold(self, data: bytes) -> None:
        """Keep bytes that follow a 101 head until the tunnel starts (bounded)."""
        if data:
            self._held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes > self._limits.max_body_buffer:
                self.read_gate.pause(_HELD)

    def start_tunnel(self, tunnel: Tunnel) -> None:
        """Switch to relaying raw bytes; replay what arrived after the 101 head."""
        self._tunnel = tunnel
        held, self._held = self._held, []
        self.read_gate.resume(_HELD)
        for data in held:
            if data:
                tunnel.from_upstream(data)
        if self._write_gate.paused:
            tunnel.upstream_write_paused()
        if self._closed:
            tunnel.close()

    @property
    def read_gate(self) -> ReadGate:
        assert self._read_gate is not None
        return self._read_gate

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None
        return self._transport

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._response is not None and not self._upgraded:
            # A second final response to one request.
            raise UpstreamProtocolError("unsolicited response")
        self._reset_head()
        self._in_head = True

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # trailers are not relayed
        self._header_bytes += len(name) + len(value) + 4
        headers = self._headers
        if len(headers) >= self._limits.max_header_count:
            raise UpstreamProtocolError("too many response header fields")
        if self._header_bytes > self._limits.max_header_bytes:
            raise UpstreamProtocolError("response head too large")
        lowered = _NAME_CACHE.get(name)
        if lowered is None:
            lowered = name.decode("latin-1").lower()
            if len(_NAME_CACHE) < _NAME_CACHE_MAX:
                _NAME_CACHE[name] = lowered
        text = value.decode("latin-1").strip(" \t")
        headers.append((lowered, text))
        special = _SPECIAL.get(lowered)
        if special is not None:
            if special == _CONTENT_LENGTH:
                if self._content_lengths is None:
                    self._content_lengths = []
                self._content_lengths.append(text)
            elif special == _TRANSFER_ENCODING:
                if self._transfer_encodings is None:
                    self._transfer_encodings = []
                self._transfer_encodings.append(text)
            else:
                self._connection_tokens += "," + text.lower()

    def on_headers_complete(self) -> None:
        self._progress = True
        self._in_head = False
        parser = self._parser
        status = parser.get_status_code()
        if not 100 <= status <= 599:
            # llhttp takes any three digits; below 100 would pass for interim and leave
            # the exchange waiting forever.
            raise UpstreamProtocolError(f"response status {status} outside 100-599")
        if status < 200 and status != 101:
            # interim (100 Continue, 103 Early Hints): wait for the final one, but not
            # through an endless stream of them
            self._interim += 1
            if self._interim > _MAX_INTERIM_RESPONSES:
                raise UpstreamProtocolError("too many interim responses")
            return
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise UpstreamProtocolError(f"unsupported HTTP version {version}")
        if status == 101 and not (self._upgrade_requested and parser.should_upgrade()):
            raise UpstreamProtocolError("101 Switching Protocols without an upgrade request")
        content_length: int | None = None
        chunked = False
        if self._transfer_encodings is not None:
            chunked = response_is_chunked(self._transfer_encodings)
        elif self._content_lengths is not None:
            if len(self._content_lengths) != 1:
                raise UpstreamProtocolError("several Content-Length fields")
            try:
                content_length = parse_content_length(self._content_lengths[0])
            except ValueError as error:
                raise UpstreamProtocolError(str(error)) from None
        tokens = {t.strip() for t in self._connection_tokens.split(",")}
        no_body = self._head_request or no_body_status(status)
        delimited_by_close = not no_body and not chunked and content_length is None
        if version == "1.1":
            keep_alive = "close" not in tokens
        else:
            keep_alive = "keep-alive" in tokens
        self._keep_alive = keep_alive and not delimited_by_close
        if no_body:
            body = BodyStream.empty()
        else:
            body = self._body = BodyStream(
                length=content_length,
                chunked=chunked,
                gate=self._read_gate,
                high_water=self._limits.max_body_buffer,
            )
        response = UpstreamResponse(
            status,
            self._reason.decode("latin-1"),
            self._headers,
            body,
            version,
            content_length,
            chunked,
            self._keep_alive,
            self,
        )
        self._response = response
        if self._sending is not None:
            self._sending.interrupt()
            self._write_gate.wake()
        if status == 101:
            self._upgraded = True
            self._dead = True
        elif no_body:
            self._response_done = True
            # llhttp cannot be told a response answers HEAD: it would wait for the
            # announced body. A fresh parser takes the next response.
            self._replace_parser = self._head_request
        future = self._head_future
        if future is not None and not future.done():
            future.set_result(response)

    def on_body(self, data: bytes) -> None:
        self._progress = True
        body = self._body
        if body is None or self._response_done:
            self._dead = True  # bytes after a HEAD/204/304 head
            return
        body.feed(data)

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_message_complete(self) -> None:
        self._progress = True
        if self._response is None or self._upgraded:
            return  # end of an interim response, or of the 101 head
        body = self._body
        if body is not None:
            body.feed_eof()
        self._response_done = True
