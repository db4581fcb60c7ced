"""One upstream HTTP/1.1 connection: sends a request, parses the response.

`UpstreamConnection` is the asyncio shell over the sans-IO `h1.ClientConnection`,
which holds the protocol's state and rules (framing, caps, 1xx, HEAD, upgrades);
`UpstreamPool` (pool.py) owns the connections and decides reuse. Requests are never
pipelined upstream: one exchange at a time per connection, so any byte arriving
outside an exchange means the connection is broken.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from .body import BodyInterrupted, BodyStream
from .errors import UpstreamProtocolError, UpstreamResetError
from .flow import ReadGate, WriteGate
from .h1.client import ClientConnection
from .h1.encode import TRAILER_SKIP
from .h1.events import (
    Data,
    EndOfMessage,
    ProtocolError,
    RequestHead,
    ResponseHead,
    TunnelBytes,
)
from .limits import Limits
from .wire import no_body_status

if TYPE_CHECKING:
    from .tunnel import Tunnel

_HELD = object()  # read-pause owner: too many bytes held before a tunnel starts


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

    def __init__(self, pool: _PoolHooks, limits: Limits, authority: str = "") -> None:
        self._pool = pool
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._h1 = ClientConnection(limits, authority)
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
        self._head_future: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._body: BodyStream | None = None
        self._sending: BodyStream | None = None
        self._head_request = False
        self._upgraded = False

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
        h1 = self._h1
        for event in h1.receive_data(data):
            kind = type(event)
            if kind is Data:
                body = self._body
                if body is not None:
                    body.feed(event.data)  # type: ignore[union-attr]
            elif kind is ResponseHead:
                self._on_response(event)  # type: ignore[arg-type]
            elif kind is EndOfMessage:
                body = self._body
                if body is not None:
                    trailers = event.trailers  # type: ignore[union-attr]
                    if trailers:
                        body.trailers = [t for t in trailers if t[0] not in TRAILER_SKIP]
                    body.feed_eof()
            elif kind is TunnelBytes:
                self._hold(event.data)  # type: ignore[union-attr]
            elif kind is ProtocolError:
                self._protocol_error(event.reason)  # type: ignore[union-attr]
                return
        if h1.response_done:
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
            if not self._h1.response_started and self._exchanges > 1:
                future.set_exception(StaleConnectionError("pooled connection closed by upstream"))
            else:
                future.set_exception(
                    UpstreamResetError("upstream closed the connection before the response head")
                )
        body = self._body
        if body is not None and not body.complete:
            ended = exc is None and any(type(e) is EndOfMessage for e in self._h1.receive_eof())
            if ended:
                body.feed_eof()  # a body delimited by the close (HTTP/1.0 style)
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
        self, head: RequestHead, body: BodyStream | bytes | None
    ) -> UpstreamResponse:
        """Send a request and return once the response head is in.

        The body is framed as `head.content_length` says (None: chunked). A head that
        cannot be sent raises ValueError before any byte leaves, and the connection goes
        back to the pool."""
        transport = self._transport
        if transport is None or not self.usable:
            raise StaleConnectionError("connection already closed")
        h1 = self._h1
        try:
            wire = h1.send(head)
        except ValueError:
            self._pool._release(self, self._h1.idle)  # nothing was sent
            raise
        self._exchanges += 1
        self._response = None
        self._body = None
        self._head_request = head.method == "HEAD"
        future = self._head_future = self._loop.create_future()
        try:
            if isinstance(body, BodyStream):
                if not await self._send_body(transport, wire, body):
                    self._early_response(body)
            else:
                transport.writelines((wire, h1.send_data(body)) if body else (wire,))
                h1.send_end()
            response = await future
        except BaseException:
            # Cancelled, or the request body failed: the upstream holds a partial request.
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # already reported through the raised error
            self.abort()
            raise
        if self._head_future is future and h1.request_done and h1.response_done:
            self._maybe_release()  # a complete answer that arrived while we were sending
        return response

    async def _send_body(self, transport: asyncio.Transport, wire: bytes, body: BodyStream) -> bool:
        """Stream `body`; False when the final response head arrived first."""
        send_data = self._h1.send_data
        parts = [wire]
        for chunk in body.take_ready():
            framed = send_data(chunk)
            if framed:
                parts.append(framed)
        if body.complete and not body.failed:
            end = self._h1.send_end()
            if end:
                parts.append(end)
            transport.writelines(parts)
            return True
        transport.writelines(parts)
        self._sending = body
        try:
            return await self._stream_rest(transport, body, interruptible=True)
        finally:
            self._sending = None

    async def _stream_rest(
        self, transport: asyncio.Transport, body: BodyStream, *, interruptible: bool
    ) -> bool:
        gate = self._write_gate
        write = transport.write
        send_data = self._h1.send_data
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
            framed = send_data(chunk)
            if framed:
                write(framed)
        end = self._h1.send_end()
        if end:
            write(end)
        return True

    def _early_response(self, body: BodyStream) -> None:
        """The final response head arrived while the request body was still streaming."""
        response = self._response
        assert response is not None and self._transport is not None
        self._dead = True  # the request/response boundary is no longer clean
        if response.status >= 400:
            # The upstream refused the request; sending the rest would be wasted.
            self._h1.abandon_request()
            return
        # A success while still uploading is full-duplex streaming (e.g. an echo): keep
        # sending, in the one place where a direct await cannot serve both directions.
        transport = self._transport
        self._body_task = self._loop.create_task(
            self._finish_body(transport, body), name=f"upstream-body-{self.info.peer}"
        )

    async def _finish_body(self, transport: asyncio.Transport, body: BodyStream) -> None:
        try:
            await self._stream_rest(transport, body, interruptible=False)
        except Exception:
            # The client's body failed or the upstream went away: the response cannot
            # complete correctly either.
            self.abort()
            return
        self._maybe_release()

    def _maybe_release(self) -> None:
        h1 = self._h1
        if not (h1.request_done and h1.response_done) or self._head_future is None:
            return
        if self._upgraded:
            return  # an upgraded connection belongs to its tunnel until it closes
        reusable = h1.reusable and not self._dead and self.usable
        self._head_future = None
        self._pool._release(self, reusable)

    def discard(self, response: UpstreamResponse) -> None:
        """The handler is done with `response`, whether or not it read the body."""
        if self._response is response and not self._h1.exchange_done:
            self.abort()

    def _protocol_error(self, message: str) -> None:
        error = UpstreamProtocolError(message)
        future = self._head_future
        if future is not None and not future.done():
            future.set_exception(error)
        elif self._body is not None and not self._body.complete:
            self._body.set_exception(error)
        self.abort()

    def _on_response(self, head: ResponseHead) -> None:
        status = head.status
        if status == 101:
            body = BodyStream.empty()
            self._upgraded = True
            self._dead = True
        elif self._head_request or no_body_status(status):
            body = BodyStream.empty()
        else:
            body = self._body = BodyStream(
                length=head.content_length,
                chunked=head.chunked,
                gate=self._read_gate,
                high_water=self._limits.max_body_buffer,
            )
        response = UpstreamResponse(
            status,
            head.reason,
            head.headers,
            body,
            head.http_version,
            head.content_length,
            head.chunked,
            head.keep_alive,
            self,
        )
        self._response = response
        if self._sending is not None:
            self._sending.interrupt()
            self._write_gate.wake()
        future = self._head_future
        if future is not None and not future.done():
            future.set_result(response)

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
