"""The downstream side: an asyncio shell over the sans-IO `h1.ServerConnection`.

The connection (httptools/llhttp inside) turns bytes into events and holds every
HTTP/1.1 rule; this Protocol moves bytes, queues the requests it is handed
(pipelining), feeds body streams, owns the timers and runs one handler task per
connection. Malformed requests never reach the handler: they are answered
400/431/408 with `Connection: close` and the connection is closed. A client that ends
its stream before its answer has left (HTTP/1.1 has no half-close): its handler task
is cancelled, and with it the upstream exchange.

Protocol choice: a connection whose TLS handshake chose ALPN `h2`, or a plaintext one
whose first bytes are the HTTP/2 client preface (h2c prior knowledge), is handed to the
HTTP/2 shell (`proxy.http.h2.server`) before any byte is parsed here; every listener
built on this protocol (outbound, inbound, gateway) serves both.

Every request head is normalised once, by the connection, before any handler sees
it (`proxy.http.target`): `Request.path` and `Request.authority` are what the listeners
route, authorize and forward, and the Host field is rewritten to the authority (an
absolute-form URI's authority replaces Host, RFC 9112 §3.2.2). An invalid path or
Host is answered 400 with a short reason naming what is wrong.

A handler that raises is answered with a generic 500 (no detail on the wire) and
logged without local variables or header values, at most a few times per second per
kind of error (`mesh.logs.LogRateLimiter`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from mesh.logs import LogRateLimiter, exception_fields, get_logger

from .body import BodyStream
from .errors import DownstreamError, UpstreamError
from .exchange import Exchange
from .flow import ReadGate, WriteGate
from .h1.encode import error_response
from .h1.events import (
    Data,
    EndOfMessage,
    InformationalResponse,
    ProtocolError,
    RequestHead,
    TunnelBytes,
)
from .h1.server import ServerConnection
from .h2.connection import PREFACE
from .limits import Limits
from .request import Request
from .target import DEFAULT_NORMALIZATION, Normalization
from .tunnel import Tunnel

if TYPE_CHECKING:
    from .listen import ConnectionSet

Handler = Callable[[Request, Exchange], Awaitable[None]]

log = get_logger("proxy.http")
# unhandled errors of every connection of this process share one budget per kind
_error_logs = LogRateLimiter()

# Connection modes.
_HTTP = 0  # parsing requests
_UPGRADED = 1  # an upgrade/CONNECT request was parsed; later bytes are held for a tunnel
_TUNNEL = 2  # relaying raw bytes
_FAILED = 3  # a request was malformed: answer what is queued, then close
_CLOSING = 4  # closing or closed
_HANDED_OFF = 5  # a CONNECT was accepted: the transport belongs to a new protocol

# After an error answer, keep reading (and discarding) this long so the client gets the
# answer instead of a reset caused by unread bytes.
_LINGER_SECONDS = 2.0

# Owners of read pauses, besides body streams and tunnels.
_PIPELINE = object()  # too many parsed requests waiting for the handler
_HELD = object()  # too many bytes held after an upgrade request
_FAILED_OWNER = object()  # nothing more will be parsed

_ERROR_RESPONSES = {status: error_response(status) for status in (400, 408, 431, 500, 502)}


class _Rejection:
    """Queued in place of a request that must be answered with an error."""

    __slots__ = ("reason", "status")

    def __init__(self, status: int, reason: str = "") -> None:
        self.status = status
        self.reason = reason


class HttpServerProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits,
        connections: ConnectionSet | None = None,
        normalization: Normalization = DEFAULT_NORMALIZATION,
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._normalization = normalization
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._read_gate: ReadGate | None = None
        self._write_gate = WriteGate()
        # the sans-IO HTTP/1.1 connection (a plain attribute: read on every response)
        self.h1 = self._h1 = ServerConnection(limits, normalization)
        self._mode = _HTTP
        self._queue: deque[Request | _Rejection] = deque()
        self._pipeline_paused = False
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._active: Exchange | None = None
        self._current: Request | None = None  # the request whose body is being parsed
        self._tunnel: Tunnel | None = None
        self._held: list[bytes] = []  # bytes after an upgrade request, until the tunnel
        self._held_bytes = 0
        self._peer: tuple[str, int] = ("", 0)
        self._local: tuple[str, int] = ("", 0)
        self._ssl_object = None
        self._closed = False
        self._client_eof = False
        self._draining = False
        self._timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._timer_period = min(limits.header_timeout, limits.idle_timeout)
        # bytes of a possible HTTP/2 preface, until the first bytes decide (None: HTTP/1)
        self._sniffed: bytes | None = b""
        now = self._loop.time()
        self._last_read = now
        self._head_started: float | None = now  # a new connection must send a head
        self._idle_since: float | None = None

    # -- what Exchange uses ----------------------------------------------------------------

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None
        return self._transport

    @property
    def read_gate(self) -> ReadGate:
        assert self._read_gate is not None
        return self._read_gate

    @property
    def write_gate(self) -> WriteGate:
        return self._write_gate

    def will_close(self, request: Request) -> bool:
        """Whether the connection must close after answering `request`."""
        return (
            not request.keep_alive
            or self._draining
            or not request.body.complete  # the client is still sending: cannot resync
            # Parsing stopped (upgrade, malformed input): nothing follows this answer
            # unless an error answer is queued behind it.
            or (self._mode != _HTTP and not self._queue)
        )

    def start_tunnel(self, tunnel: Tunnel) -> None:
        self._mode = _TUNNEL
        self._tunnel = tunnel
        held, self._held = self._held, []
        self._held_bytes = 0
        self.read_gate.resume(_HELD)
        for data in held:
            tunnel.from_downstream(data)
        if self._write_gate.paused:
            tunnel.downstream_write_paused()
        if self._closed or self._client_eof:
            tunnel.close()

    def serve_tunnelled(self, protocol: asyncio.Protocol | None = None) -> None:
        """After a CONNECT answered 200: the bytes that follow are a new HTTP
        connection (HTTP/1.1 or h2c) served by this listener's handler, on a protocol
        of its own that takes the transport over; or, given `protocol`, that protocol
        takes the transport (and the bytes already read) over, e.g. a TCP relay."""
        held, self._held = self._held, []
        self._held_bytes = 0
        self._mode = _HANDED_OFF
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._connections is not None:
            self._connections.discard(self)
        transport = self.transport
        self.read_gate.release_all()
        inner = protocol or HttpServerProtocol(
            self._handler, self._limits, self._connections, self._normalization
        )
        transport.set_protocol(inner)
        inner.connection_made(transport)
        for data in held:
            inner.data_received(data)

    # -- lifecycle used by ConnectionSet -----------------------------------------------------

    def close_when_idle(self) -> None:
        """Graceful shutdown: close now if idle, else after the current response."""
        self._draining = True
        if self._active is None and not self._queue and not self._h1.in_head:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            self._switch_to_h2(transport, b"")
            return
        self._transport = transport
        self._read_gate = ReadGate(transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self._peer = (peer[0], peer[1])
        self._local = (local[0], local[1])
        self._ssl_object = transport.get_extra_info("ssl_object")
        self._timer = self._loop.call_at(self._loop.time() + self._timer_period, self._on_timer)
        if self._connections is not None:
            self._connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._sniffed is not None:
            data = self._sniff(data)
            if not data:
                return
        if self._mode != _HTTP:
            self._data_outside_http(data)
            return
        now = self._last_read = self._loop.time()
        h1 = self._h1
        for event in h1.receive_data(data):
            if type(event) is Data:
                current = self._current
                if current is not None:
                    current.body.feed(event.data)
            elif type(event) is RequestHead:
                self._head_started = None
                self._idle_since = None
                self._on_request(event)
            elif type(event) is EndOfMessage:
                current = self._current
                if current is not None:
                    current.body.feed_eof()
                    self._current = None
            elif type(event) is TunnelBytes:
                self._mode = _UPGRADED
                self._hold(event.data)
            elif type(event) is ProtocolError:
                self._on_protocol_error(event)
                return
        if h1.in_head:
            if self._head_started is None:
                self._head_started = now
                self._idle_since = None
        elif self._mode == _HTTP and not h1.parsing:
            self._mode = _UPGRADED  # an upgrade or CONNECT head, nothing after it yet

    def eof_received(self) -> bool:
        if self._tunnel is not None:
            self._tunnel.close()
            return False
        self._client_eof = True
        current = self._current
        if current is not None:
            current.body.set_exception(DownstreamError("client closed mid-body"))
            self._current = None
        active = self._active
        if self._mode != _FAILED and ((active is not None and not active.finished) or self._queue):
            # The client went away before its answer. HTTP/1.1 has no half-close: as
            # Envoy (flag DC) and nginx (499) do, give the request up. Closing leads to
            # connection_lost, which cancels the handler and with it the upstream
            # exchange, its retries and their timers.
            self._queue.clear()
            return False
        # Keep the socket open for an error answer still owed; otherwise close.
        return active is not None or bool(self._queue)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._mode = _CLOSING
        for timer in (self._timer, self._linger):
            if timer is not None:
                timer.cancel()
        self._write_gate.fail(DownstreamError("client connection lost"))
        current = self._current
        if current is not None:
            current.body.set_exception(DownstreamError("client connection lost"))
        if self._tunnel is not None:
            self._tunnel.close()
        task = self._task
        if task is not None and not task.done() and self._tunnel is None:
            # The client is gone: stop the handler and its upstream work. A tunnelling
            # handler is not cancelled: the tunnel's end returns it normally, so it can
            # still record what was relayed.
            task.cancel()
        if self._connections is not None:
            self._connections.discard(self)

    def pause_writing(self) -> None:
        self._write_gate.pause(self.transport.get_write_buffer_size())
        if self._tunnel is not None:
            self._tunnel.downstream_write_paused()

    def resume_writing(self) -> None:
        self._write_gate.resume()
        if self._tunnel is not None:
            self._tunnel.downstream_write_resumed()

    # -- protocol choice -------------------------------------------------------------------

    def _sniff(self, data: bytes) -> bytes:
        """The bytes to parse as HTTP/1; b"" while they may still be an HTTP/2 preface
        or once the connection went to the HTTP/2 shell."""
        seen = self._sniffed + data if self._sniffed else data
        if seen[:3] != PREFACE[:3] or not PREFACE.startswith(seen[: len(PREFACE)]):
            self._sniffed = None
            return seen
        if len(seen) < len(PREFACE):
            self._sniffed = seen
            return b""
        self._sniffed = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._connections is not None:
            self._connections.discard(self)
        self._switch_to_h2(self.transport, seen)
        return b""

    def _switch_to_h2(self, transport: asyncio.Transport, data: bytes) -> None:
        from .h2.server import H2ServerProtocol

        self._mode = _CLOSING
        self._sniffed = None
        protocol = H2ServerProtocol(
            self._handler, self._limits, self._connections, self._normalization
        )
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data:
            protocol.data_received(data)

    # -- parsing outcomes --------------------------------------------------------------------

    def _on_request(self, head: RequestHead) -> None:
        chunked = head.chunked
        content_length = head.content_length
        if chunked or content_length:
            body = BodyStream(
                length=content_length,
                chunked=chunked,
                gate=self._read_gate,
                high_water=self._limits.max_body_buffer,
            )
        else:
            body = BodyStream.empty()
        request = Request(
            head.method,
            head.target,
            head.absolute_form,
            head.scheme,
            head.authority,
            head.path,
            head.headers,
            head.http_version,
            head.keep_alive,
            head.upgrade,
            self._peer,
            self._local,
            self._ssl_object,
            content_length,
            chunked,
            body,
        )
        if head.expect_continue and not body.complete:
            body.on_first_wait(lambda: self._send_continue(request))
        self._current = request
        self._dispatch(request)

    def _on_protocol_error(
        self, error: ProtocolError, body_reason: str = "malformed request body"
    ) -> None:
        """The request stream is broken: answer `error.status` in order, then close.

        `error.reason` is told to the client when the broken part is a request head;
        a request whose body broke fails with `body_reason`."""
        self._fail(error.status, body_reason, error.reason)

    def _dispatch(self, request: Request) -> None:
        queue = self._queue
        queue.append(request)
        if len(queue) >= self._limits.max_pipelined_requests and not self._pipeline_paused:
            self._pipeline_paused = True
            self.read_gate.pause(_PIPELINE)
        self._wake()

    def _wake(self) -> None:
        if self._task is None:
            self._task = self._loop.create_task(self._serve(), name=f"http-conn-{self._peer}")
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(
        self, status: int, reason: str = "malformed request body", head_reason: str = ""
    ) -> None:
        """The request stream is broken: answer `status` in order, then close.

        `head_reason` is told to the client when the broken part is a request head."""
        self._mode = _FAILED
        self.read_gate.pause(_FAILED_OWNER)
        self._head_started = None
        current, self._current = self._current, None
        if current is not None and self._queue and self._queue[-1] is current:
            # Its body turned out malformed before the handler saw it: it never will.
            self._queue.pop()
            current = None
        if current is not None:
            # The handler is already reading this body: fail it; the engine answers
            # `status` if the handler has not responded yet.
            current.body.set_exception(DownstreamError(reason, status))
        else:
            self._queue.append(_Rejection(status, head_reason))
        self._wake()

    def _hold(self, data: bytes) -> None:
        """Keep bytes sent after an upgrade request until the tunnel is up."""
        if data:
            self._held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes > self._limits.max_body_buffer:
                self.read_gate.pause(_HELD)

    def _data_outside_http(self, data: bytes) -> None:
        mode = self._mode
        if mode == _TUNNEL and self._tunnel is not None:
            self._tunnel.from_downstream(data)
        elif mode == _UPGRADED:
            self._hold(data)
        # _FAILED and _CLOSING: discard (lingering close).

    def _send_continue(self, request: Request) -> None:
        """The handler wants the body of a request sent with `Expect: 100-continue`."""
        active = self._active
        if (
            active is not None
            and active.request is request
            and not active.responded
            and self._mode == _HTTP
        ):
            self.transport.write(self._h1.send(InformationalResponse(100)))

    # -- the handler loop --------------------------------------------------------------------

    async def _serve(self) -> None:
        queue = self._queue
        try:
            while True:
                if not queue:
                    if self._mode != _HTTP or self._client_eof or self._draining:
                        self._close()
                        return
                    if self._head_started is None:
                        self._idle_since = self._loop.time()
                    waiter = self._waiter = self._loop.create_future()
                    await waiter
                    continue
                item = queue.popleft()
                if self._pipeline_paused and len(queue) < self._limits.max_pipelined_requests:
                    self._pipeline_paused = False
                    self.read_gate.resume(_PIPELINE)
                if isinstance(item, _Rejection):
                    self._answer_error(item.status, item.reason)
                    return
                if not await self._handle(item):
                    return
        except Exception as error:
            _log_unhandled("http.connection_error", error, peer=self._peer)
            self.abort()

    async def _handle(self, request: Request) -> bool:
        """Run the handler for one request; True when the connection stays open."""
        exchange = Exchange(self, request)
        self._active = exchange
        try:
            await self._handler(request, exchange)
        except DownstreamError as error:
            return self._after_failure(exchange, error.status)
        except UpstreamError as error:
            log.info("http.upstream_error", error=str(error), peer=self._peer)
            return self._after_failure(exchange, 502)
        except Exception as error:
            # the path without its query (which may carry tokens), never the headers
            path = request.path.partition("?")[0]
            _log_unhandled("http.handler_error", error, method=request.method, path=path)
            return self._after_failure(exchange, 500)
        finally:
            self._active = None
        if not exchange.finished:
            log.error("http.handler_no_response", method=request.method, path=request.path)
            return self._after_failure(exchange, 500)
        if exchange.closing or (self._mode != _HTTP and not self._queue):
            self._close(linger=not request.body.complete)
            return False
        return True

    def _after_failure(self, exchange: Exchange, status: int | None) -> bool:
        if exchange.responded or status is None or self._closed:
            # Part of a response is out (or the client is gone): only a reset tells the
            # client the response is incomplete.
            self.abort()
        else:
            self._answer_error(status)
        return False

    def _answer_error(self, status: int, reason: str = "") -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(
            error_response(status, reason) if reason else _ERROR_RESPONSES[status]
        )
        self._close(linger=True)

    def _close(self, linger: bool = False) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or self._mode == _HANDED_OFF:
            return
        self._mode = _CLOSING
        if linger and transport.can_write_eof():
            # Half-close after the answer and drain what the client still sends, so its
            # unread bytes do not turn our close into a reset that destroys the answer.
            transport.write_eof()
            self.read_gate.release_all()
            self._linger = self._loop.call_later(_LINGER_SECONDS, transport.close)
        else:
            transport.close()

    # -- timeouts ----------------------------------------------------------------------------

    def _on_timer(self) -> None:
        """Runs at least every header_timeout; each state's deadline is a timestamp, so
        state changes never reschedule the timer."""
        self._timer = None
        if self._mode == _CLOSING or self._mode == _TUNNEL or self._mode == _HANDED_OFF:
            return
        limits = self._limits
        now = self._loop.time()
        next_check = now + self._timer_period
        if self._mode == _HTTP and self._head_started is not None:
            deadline = self._head_started + limits.header_timeout
            if now >= deadline:
                if self._h1.in_head:
                    self._on_protocol_error(self._h1.fail(408))
                else:
                    self._close()  # not a byte of a request: nothing to answer
                return
            next_check = min(next_check, deadline)
        elif self._idle_since is not None and self._active is None and not self._queue:
            deadline = self._idle_since + limits.idle_timeout
            if now >= deadline:
                self._close()
                return
            next_check = min(next_check, deadline)
        current = self._current
        if current is not None and not self.read_gate.paused:
            deadline = self._last_read + limits.idle_timeout
            if now >= deadline:
                self._on_protocol_error(self._h1.fail(408), "request body stalled")
                return
            next_check = min(next_check, deadline)
        self._timer = self._loop.call_at(next_check, self._on_timer)


def _log_unhandled(event: str, error: BaseException, **fields: object) -> None:
    """Log an unexpected error: its type, a short message and a traceback without
    local variables (`mesh.logs.exception_fields`), rate-limited per kind of error."""
    fields_of_error = exception_fields(error)
    suppressed = _error_logs.admit((event, fields_of_error["error_type"], fields_of_error["at"]))
    if suppressed is None:
        return
    log.error(event, **fields, **fields_of_error, suppressed=suppressed)
