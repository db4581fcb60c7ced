"""The upstream HTTP/2 shell: one multiplexed connection per endpoint.

`H2UpstreamPool.request` has `UpstreamPool.request`'s signature and errors, so the
forwarding code (`proxy.forward`, `proxy.attempts`, mirroring) does not know which
protocol carries a request. Requests share one connection per endpoint; another is
opened only when the peer's MAX_CONCURRENT_STREAMS is reached or the connection is
going away (GOAWAY). The request body is sent by a task of its own while the response
streams back (gRPC bidirectional streaming), each direction under flow control, and
request trailers follow the body. A stream the peer refuses (REFUSED_STREAM, or above
a GOAWAY's last stream) raises `UpstreamResetError` before any response byte: safe to
retry.

Over TLS the connection must negotiate ALPN `h2`; a peer that does not raises
`H2NotNegotiated` (the caller falls back to HTTP/1.1).

Writes are coalesced as on the server side (`H2ServerProtocol._flush`): one write per
turn of the event loop for all the streams of a connection. A request body that has
fully arrived when the request starts (a unary gRPC call, most small POSTs) is queued
at once with the head, with no task of its own.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections import deque
from collections.abc import Callable
from typing import cast

from mesh.logs import get_logger

from ..body import BodyStream
from ..client import ConnectionInfo, UpstreamResponse
from ..errors import UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamResetError
from ..headers import HOP_BY_HOP
from ..limits import Limits
from ..pool import ConnectionLimit, PoolOverflowError, PoolStats
from .connection import CANCEL, H2Connection, H2Limits, StreamGone
from .events import (
    ConnectionFailed,
    Data,
    GoAway,
    ResponseHead,
    SendWindowOpened,
    StreamEnded,
    StreamReset,
    Trailers,
)
from .streams import NO_STREAM_LIMITS, StreamLimits, exhausted, pick_connection

log = get_logger("proxy.http.h2")

STREAM_SEND_BUFFER = 64 * 1024
# fields HTTP/2 forbids (RFC 9113 §8.2.2); `host` becomes :authority
_SKIP_FIELDS = HOP_BY_HOP | {"host", "content-length"}


class H2NotNegotiated(UpstreamConnectError):
    """The TLS peer did not choose ALPN h2."""


class H2UpstreamResponse(UpstreamResponse):
    """A response on one HTTP/2 stream; `body.trailers` holds its trailers."""

    __slots__ = ("_stream",)

    def __init__(
        self, status: int, headers: list[tuple[str, str]], body: BodyStream, stream: _Stream
    ) -> None:
        self.status = status
        self.reason = ""
        self.headers = headers
        self.body = body
        self.http_version = "2"
        self.content_length = body.length
        self.chunked = False
        self.keep_alive = True
        self.connection = stream.owner.info
        self._stream = stream

    def close(self) -> None:
        """Done with this response: a stream still carrying its body is reset."""
        self._stream.owner.abandon(self._stream)


class _Stream:
    __slots__ = ("body", "head", "owner", "response_done", "sender", "stream_id", "waiter")

    def __init__(self, owner: H2UpstreamConnection, stream_id: int) -> None:
        self.owner = owner
        self.stream_id = stream_id
        self.head: asyncio.Future[H2UpstreamResponse] = owner.loop.create_future()
        self.body: BodyStream | None = None
        self.sender: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.response_done = False


class H2UpstreamConnection(asyncio.Protocol):
    def __init__(
        self,
        limits: H2Limits,
        on_lost: Callable[[H2UpstreamConnection], None],
        idle_timeout: float,
        on_stream_done: Callable[[H2UpstreamConnection], None] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._on_stream_done = on_stream_done
        # streams opened in the connection's life (`maxRequestsPerConnection`)
        self.streams_started = 0
        self._idle_timeout = idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        self._h2 = H2Connection(client=True, limits=limits)
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _Stream] = {}
        self._write_paused = False
        self._closed = False
        self._flush_scheduled = False
        self.context: ssl_module.SSLContext | None = None  # what it was made with
        self.info = ConnectionInfo(("", 0), ("", 0), None)

    # -- state the pool reads --------------------------------------------------------------

    @property
    def usable(self) -> bool:
        transport = self._transport
        return (
            not self._closed
            and transport is not None
            and not transport.is_closing()
            and (self._h2.open)
        )

    @property
    def has_room(self) -> bool:
        return self.usable and self._h2.can_open_stream

    @property
    def idle(self) -> bool:
        return not self._streams

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def close(self) -> None:
        if self._transport is not None:
            self._write_queued()  # a GOAWAY, resets
            self._transport.close()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.info = ConnectionInfo(
            (peer[0], peer[1]), (local[0], local[1]), transport.get_extra_info("ssl_object")
        )
        self._h2.initiate()
        self._flush()
        self._went_idle()

    def _went_idle(self) -> None:
        """No stream left: close after `idle_timeout` unless one starts meanwhile."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self.loop.call_later(self._idle_timeout, self._on_idle)

    def _on_idle(self) -> None:
        self._idle_timer = None
        if not self._streams:
            self.close()

    def data_received(self, data: bytes) -> None:
        for event in self._h2.receive(data, self.loop.time()):
            if isinstance(event, Data):
                stream = self._streams.get(event.stream_id)
                if stream is not None and stream.body is not None and event.data:
                    stream.body.feed(event.data)
                else:
                    self._h2.consumed(event.stream_id, event.flow_controlled)
            elif isinstance(event, ResponseHead):
                self._on_head(event)
            elif isinstance(event, Trailers):
                stream = self._streams.get(event.stream_id)
                if stream is not None and stream.body is not None:
                    stream.body.trailers = event.headers
            elif isinstance(event, StreamEnded):
                self._on_ended(event.stream_id)
            elif isinstance(event, StreamReset):
                self._fail_stream(
                    event.stream_id,
                    UpstreamResetError(f"upstream reset the stream (code {event.error_code})"),
                )
            elif isinstance(event, SendWindowOpened):
                self._wake_writers()
            elif isinstance(event, GoAway):
                for stream_id in [s for s in self._streams if s > event.last_stream_id]:
                    self._fail_stream(stream_id, UpstreamResetError("upstream refused the stream"))
            elif isinstance(event, ConnectionFailed):
                self._flush()
                self._fail_all(UpstreamProtocolError(event.reason))
                self.close()
                return
        self._flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._fail_all(UpstreamResetError("upstream connection closed"))
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writers()

    # -- exchanges -------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        scheme: str,
        authority: str,
        path: str,
        headers: list[tuple[str, str]],
        body: BodyStream | bytes | None,
    ) -> H2UpstreamResponse:
        if not self.usable:
            raise UpstreamResetError("connection already closed")
        fields = [
            (":method", method),
            (":scheme", scheme),
            (":authority", authority),
            (":path", path),
        ]
        length = body.length if isinstance(body, BodyStream) else len(body or b"")
        for name, value in headers:
            lowered = name.lower()
            if lowered not in _SKIP_FIELDS:
                fields.append((lowered, value))
        # we relay trailers end to end, so we may ask for them (gRPC servers want it)
        fields.append(("te", "trailers"))
        if length:
            fields.append(("content-length", str(length)))
        empty = length == 0 and (not isinstance(body, BodyStream) or body.complete)
        if isinstance(body, BodyStream) and body.complete and not body.buffered:
            empty = not body.trailers
        stream_id = self._h2.open_stream(fields, end_stream=empty)
        self.streams_started += 1
        stream = self._streams[stream_id] = _Stream(self, stream_id)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if not empty:
            if isinstance(body, BodyStream):
                if body.complete and not body.failed and body.buffered <= STREAM_SEND_BUFFER:
                    # all here already: queued now, sent as the upstream's window allows
                    self._h2.send_last(stream_id, body.take_ready(), body.trailers)
                else:
                    stream.sender = self.loop.create_task(
                        self._send_body(stream, body), name=f"h2-upstream-body-{stream_id}"
                    )
            else:
                self._h2.send_data(stream_id, body or b"")
                self._h2.end_stream(stream_id)
        self._flush()
        try:
            return await stream.head
        except BaseException:
            self.abandon(stream)
            raise

    async def _send_body(self, stream: _Stream, body: BodyStream) -> None:
        stream_id = stream.stream_id
        h2c = self._h2
        try:
            async for chunk in body:
                if not chunk:
                    continue
                h2c.send_data(stream_id, chunk)
                self._flush()
                while self._write_paused or h2c.outbound_buffered(stream_id) > STREAM_SEND_BUFFER:
                    if stream.stream_id not in self._streams:
                        return
                    waiter = stream.waiter = self.loop.create_future()
                    await waiter
            h2c.end_stream(stream_id, body.trailers)
            self._flush()
        except StreamGone:
            return  # the upstream answered and reset the stream: nothing more to send
        except UpstreamError:
            return
        except Exception:
            # the client's body failed (it went away): the upstream must not take a
            # truncated request for a complete one
            self._fail_stream(stream_id, UpstreamResetError("request body failed"))
            h2c.reset(stream_id, CANCEL)
            self._flush()

    def abandon(self, stream: _Stream) -> None:
        """The caller is done with the stream: reset it unless it finished both ways."""
        if self._streams.get(stream.stream_id) is not stream:
            return
        sender_running = stream.sender is not None and not stream.sender.done()
        if stream.response_done and not sender_running:
            self._forget(stream)
            return
        self._forget(stream)
        self._h2.reset(stream.stream_id, CANCEL)
        self._flush()

    def _forget(self, stream: _Stream) -> None:
        self._drop(stream.stream_id)
        if stream.sender is not None and not stream.sender.done():
            stream.sender.cancel()
        body = stream.body
        if body is not None:
            unread = body.release_flow()
            if unread:
                self._h2.consumed(stream.stream_id, unread)
        if stream.waiter is not None and not stream.waiter.done():
            stream.waiter.set_result(None)

    def _on_head(self, event: ResponseHead) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.head.done():
            return
        headers = [(n, v) for n, v in event.headers if n[:1] != ":"]
        if event.end_stream:
            body = BodyStream.empty()
            stream.response_done = True
        else:
            length = None
            for name, value in headers:
                if name == "content-length" and value.isdigit():
                    length = int(value)
            h2c, stream_id = self._h2, event.stream_id

            def consumed(size: int) -> None:
                h2c.consumed(stream_id, size)
                self._flush()

            body = BodyStream(length=length, high_water=1 << 62, on_consumed=consumed)
        stream.body = body
        stream.head.set_result(H2UpstreamResponse(event.status, headers, body, stream))
        if event.end_stream:
            self._maybe_done(stream)

    def _on_ended(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.response_done = True
        if stream.body is not None:
            stream.body.feed_eof()
        self._maybe_done(stream)

    def _maybe_done(self, stream: _Stream) -> None:
        if stream.sender is None or stream.sender.done():
            if stream.body is None or stream.body.complete:
                # everything arrived: what is unread stays readable in the body
                self._drop(stream.stream_id)
                if stream.body is not None:
                    unread = stream.body.release_flow()
                    if unread:
                        self._h2.consumed(stream.stream_id, unread)

    def _drop(self, stream_id: int) -> _Stream | None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            if not self._streams and not self._closed:
                self._went_idle()
            if self._on_stream_done is not None:
                self._on_stream_done(self)  # room for a pending request
        return stream

    def _fail_stream(self, stream_id: int, error: UpstreamError) -> None:
        stream = self._drop(stream_id)
        if stream is None:
            return
        if not stream.head.done():
            stream.head.set_exception(error)
        elif stream.body is not None:
            stream.body.set_exception(error)
        if stream.sender is not None and not stream.sender.done():
            stream.sender.cancel()
        if stream.waiter is not None and not stream.waiter.done():
            stream.waiter.set_result(None)

    def _fail_all(self, error: UpstreamError) -> None:
        for stream_id in list(self._streams):
            self._fail_stream(stream_id, error)

    def _wake_writers(self) -> None:
        for stream in self._streams.values():
            waiter = stream.waiter
            if waiter is not None:
                stream.waiter = None
                if not waiter.done():
                    waiter.set_result(None)

    def _flush(self) -> None:
        """Write what is queued once this turn of the event loop is over."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._write_queued)

    def _write_queued(self) -> None:
        self._flush_scheduled = False
        data = self._h2.data_to_send()
        transport = self._transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)


class H2UpstreamPool:
    """HTTP/2 to one endpoint: one multiplexed connection (more only when no open one
    takes another stream), plaintext (h2c prior knowledge) or TLS with ALPN h2.

    Optionally bounded by a DestinationRule's `connectionPool` (`configure`): the
    per-connection stream limits of `streams.StreamLimits`, and a `ConnectionLimit`
    shared by the cluster's pools (its circuit breaker) for connections and pending
    requests. A request that finds no room waits as pending; beyond the pending limit
    it fails with `PoolOverflowError` (503 `UO`), as the HTTP/1.1 pool's do. The first
    connection of an endpoint is always allowed, as there."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: ssl_module.SSLContext | Callable[[], ssl_module.SSLContext] | None = None,
        verify_peer: Callable[[ssl_module.SSLObject | None], object] | None = None,
        limits: Limits,
        connect_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self._ssl = ssl
        self._verify_peer = verify_peer
        self._limits = limits
        self._h2_limits = H2Limits(max_header_list_size=limits.max_header_bytes)
        self._connect_timeout = connect_timeout
        self._idle_timeout = limits.upstream_idle_timeout
        self._authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # The request's scheme, not the hop's: mTLS between sidecars is the mesh's
        # transport, and the app (and what it is told, e.g. a 401's realm) sees the
        # `http` request its caller made, as over HTTP/1.1 and as in Istio.
        self._scheme = "http"
        self._connections: list[H2UpstreamConnection] = []
        self._connecting: asyncio.Future[H2UpstreamConnection] | None = None
        self._stream_limits = NO_STREAM_LIMITS
        self._limit: ConnectionLimit | None = None
        # connections holding one of the limit's slots (released when they close)
        self._slotted: dict[H2UpstreamConnection, ConnectionLimit] = {}
        # pending requests, first come first served, woken when room may have appeared
        self._waiters: deque[asyncio.Future[None]] = deque()
        # waiters woken but not yet running: the room they were woken for is theirs
        self._handoffs = 0
        self._closed = False
        self.opened = 0

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: BodyStream | bytes | None = None,
    ) -> UpstreamResponse:
        if self._closed:
            raise UpstreamConnectError("upstream pool is closed")
        authority = self._authority
        for name, value in headers:
            if name.lower() == "host":
                authority = value
                break
        context = self._context()  # refuses when no certificate is in force (fails closed)
        connection = await self._connection(context)
        # no await between choosing the connection and opening the stream on it
        return await connection.request(method, self._scheme, authority, path, headers, body)

    @property
    def pending(self) -> int:
        """Requests waiting for room on a connection."""
        return sum(1 for w in self._waiters if not w.done())

    def stats(self) -> PoolStats:
        active = sum(1 for c in self._connections if not c.idle)
        return PoolStats(
            active=active,
            idle=len(self._connections) - active,
            opened=self.opened,
            peak_write_buffer=0,
        )

    def configure(
        self,
        *,
        connect_timeout: float | None = None,
        idle_timeout: float | None = None,
        max_requests_per_connection: int | None = None,
        max_concurrent_streams: int | None = None,
        connection_limit: ConnectionLimit | None = None,
    ) -> None:
        """New settings (a changed DestinationRule): they apply to the next request;
        connections already open stay (an idle timeout applies to new ones)."""
        if connect_timeout is not None:
            self._connect_timeout = connect_timeout
        if idle_timeout is not None:
            self._idle_timeout = idle_timeout
        limits = self._stream_limits
        self._stream_limits = StreamLimits(
            max_concurrent_streams=limits.max_concurrent_streams
            if max_concurrent_streams is None
            else max_concurrent_streams,
            max_requests_per_connection=limits.max_requests_per_connection
            if max_requests_per_connection is None
            else max_requests_per_connection,
        )
        if connection_limit is not None:
            # slots taken under a previous limit go back to it as their connections close
            self._limit = connection_limit
        self._wake_waiters(all_of_them=True)  # looser limits may leave room now

    def close(self) -> None:
        self._closed = True
        for connection in list(self._connections):
            connection.close()
        self._connections.clear()
        self._wake_waiters(all_of_them=True)

    def _context(self) -> ssl_module.SSLContext | None:
        try:
            return self._ssl() if callable(self._ssl) else self._ssl
        except Exception as e:
            raise UpstreamConnectError(str(e)) from None

    async def _connection(self, context: ssl_module.SSLContext | None) -> H2UpstreamConnection:
        """A connection that takes one more stream: an open one, a new one while the
        cluster has a connection slot, else one that gets room while we wait."""
        # A renewed certificate applies to new connections; open ones stay (as Envoy's
        # and our HTTP/1.1 pools do), so renewals never interrupt traffic.
        woken = False
        while True:
            if self._closed:
                raise UpstreamConnectError("upstream pool is closed")
            limit = self._limit
            # a newcomer queues behind pending requests: room that appears is theirs
            if woken or limit is None or not (self._handoffs or self.pending):
                connection = pick_connection(self._connections, self._stream_limits)
                if connection is not None:
                    return connection
                if self._connecting is not None:
                    # one connect at a time: it may have room for this request too
                    await asyncio.shield(self._connecting)
                    continue
                if limit is None:
                    return await self._connect(context, None)
                if limit.try_acquire_connection():
                    return await self._connect(context, limit)
                if not self._connections:
                    # the first connection of an endpoint is always allowed
                    return await self._connect(context, None)
            if not limit.try_acquire_pending():
                raise PoolOverflowError(f"too many requests waiting for {self._authority}")
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._handoffs -= 1
                    self._wake_waiters()  # woken as we were cancelled: pass the turn on
                raise
            finally:
                limit.release_pending()
                if not waiter.done():
                    waiter.cancel()
            self._handoffs -= 1
            woken = True

    async def _connect(
        self, context: ssl_module.SSLContext | None, slot: ConnectionLimit | None
    ) -> H2UpstreamConnection:
        future: asyncio.Future[H2UpstreamConnection] = asyncio.get_running_loop().create_future()
        self._connecting = future
        try:
            connection = await self._open(context)
        except BaseException as error:
            if slot is not None:
                slot.release_connection()
            future.set_exception(error)
            future.exception()  # retrieved: waiters get it through shield
            self._wake_waiters()
            raise
        finally:
            self._connecting = None
        if slot is not None:
            self._slotted[connection] = slot
        future.set_result(connection)
        self._wake_waiters(all_of_them=True)  # a new connection may take several
        return connection

    async def _open(self, context: ssl_module.SSLContext | None) -> H2UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: H2UpstreamConnection(
                        self._h2_limits, self._lost, self._idle_timeout, self._stream_done
                    ),
                    self.host,
                    self.port,
                    ssl=context,
                )
        except TimeoutError:
            raise UpstreamConnectError(f"connect to {self._authority} timed out") from None
        except (OSError, ssl_module.SSLError) as e:
            raise UpstreamConnectError(f"connect to {self._authority} failed: {e}") from None
        if context is not None:
            ssl_object = connection.info.ssl_object
            try:
                if self._verify_peer is not None:
                    self._verify_peer(ssl_object)
            except Exception as e:
                connection.close()
                raise UpstreamConnectError(f"peer identity refused: {e}") from None
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                connection.close()
                raise H2NotNegotiated(f"{self._authority} did not negotiate h2")
        self.opened += 1
        connection.context = context
        self._connections.append(connection)
        return connection

    def _stream_done(self, connection: H2UpstreamConnection) -> None:
        if connection.idle and exhausted(connection, self._stream_limits):
            connection.close()  # retired: its slot is released when it is gone
        self._wake_waiters()

    def _wake_waiters(self, *, all_of_them: bool = False) -> None:
        """Tell the first pending request (or every one) to look for room again."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._handoffs += 1
                if not all_of_them:
                    return

    def _lost(self, connection: H2UpstreamConnection) -> None:
        if connection in self._connections:
            self._connections.remove(connection)
        slot = self._slotted.pop(connection, None)
        if slot is not None:
            slot.release_connection()
        self._wake_waiters()  # a connection slot, or the first connection, is free
