"""The downstream HTTP/2 shell: an asyncio Protocol around a server `H2Connection`.

`data_received` feeds the connection and acts on its events; every write goes through
`_flush`, which writes once at the end of the event loop's turn: what every stream
and the acknowledgements of what was read queued in that turn leave in one write (over
TLS one record, one syscall) instead of one per frame. Each stream becomes the same
`Request` (a BodyStream for its body) the HTTP/1 engine builds, normalised by the same
`normalize_request_target`, and runs the listener's handler with an `H2Exchange` (same
interface as `Exchange`), one task per stream. A stream the client resets cancels its
handler, and with it the upstream exchange (flag DC), as a closed HTTP/1 connection does.

A stream's head is refused with 400 before any handler sees it when it could not be
carried to an HTTP/1.1 upstream as authorized (docs/architecture.md §6): a field name
that is not a token, a value with a control character other than HTAB, a pseudo-header
other than `:method`, `:scheme`, `:authority`, `:path` (so no extended CONNECT's
`:protocol`, which we never enable), a method that is not an upper-case token (the
HTTP/1.1 parser accepts no other, and policies match methods case-sensitively). The
`h2` library already refuses connection-specific fields, `te` other than
`trailers`, a Host differing from `:authority`, and a body longer or shorter than its
content-length (the connection ends); a head ending its stream while it declares a
non-zero content-length is a 400 here. Request trailers breaking the same field rules
reset the stream, and the handler's body read fails.

The connection is chosen by `HttpServerProtocol` (ALPN `h2`, or the client preface
on plaintext), which hands its transport over (`switch_to`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from mesh.logs import LogRateLimiter, exception_fields, get_logger

from ..body import BodyStream
from ..errors import DownstreamError, UpstreamError
from ..flow import ReadGate
from ..limits import Limits
from ..request import Request
from ..target import OVERRIDE_HEADERS, InvalidTarget, Normalization, normalize_request_target
from ..wire import RequestTarget
from .connection import CANCEL, INTERNAL_ERROR, NO_ERROR, PROTOCOL_ERROR, H2Connection, H2Limits
from .events import (
    ConnectionFailed,
    Data,
    GoAway,
    RequestHead,
    SendWindowOpened,
    StreamEnded,
    StreamReset,
    Trailers,
)
from .exchange import H2Exchange

if TYPE_CHECKING:
    from ..exchange import Exchange
    from ..listen import ConnectionSet

Handler = Callable[[Request, "Exchange"], Awaitable[None]]

log = get_logger("proxy.http.h2")
_error_logs = LogRateLimiter()

# RFC 9110 §5.1 token (names arrive lower-cased: h2 refuses upper-case ones)
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
# RFC 9110 §5.5: no control character but HTAB (CR, LF and NUL would split an HTTP/1.1
# head; h2 refuses those three, not the others)
_FIELD_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Z]+")
_PSEUDO = frozenset((":method", ":scheme", ":authority", ":path"))


def _malformed_fields(fields: list[tuple[str, str]]) -> bool:
    """A name that is not a token or a value with a control character but HTAB."""
    return any(
        _FIELD_NAME.fullmatch(name) is None or _FIELD_VALUE_BAD.search(value) is not None
        for name, value in fields
    )


class MalformedHead(ValueError):
    """A stream's head that is answered 400; the message names the rule, not the value."""


# queued response bytes per stream before its writer waits for the client's window
STREAM_SEND_BUFFER = 64 * 1024
_WRITE_PAUSED = object()  # read-pause owner: the client does not read what we send


class _Stream:
    __slots__ = ("body", "exchange", "request", "task", "waiter")

    def __init__(self, request: Request, exchange: H2Exchange) -> None:
        self.request = request
        self.body = request.body
        self.exchange = exchange
        self.task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None


class H2ServerProtocol(asyncio.Protocol):
    """One HTTP/2 client connection (h2c prior knowledge, or TLS with ALPN h2)."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits,
        connections: ConnectionSet | None,
        normalization: Normalization,
        h2_limits: H2Limits | None = None,
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._normalization = normalization
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._h2 = H2Connection(
            client=False,
            limits=h2_limits or H2Limits(max_header_list_size=limits.max_header_bytes),
        )
        self._transport: asyncio.Transport | None = None
        self._read_gate: ReadGate | None = None
        self._write_paused = False
        self._streams: dict[int, _Stream] = {}
        self._peer: tuple[str, int] = ("", 0)
        self._local: tuple[str, int] = ("", 0)
        self._ssl_object = None
        self._closed = False
        self._flush_scheduled = False
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- lifecycle used by ConnectionSet -------------------------------------------------

    def close_when_idle(self) -> None:
        """Graceful shutdown: GOAWAY now, close once the open streams are answered."""
        self._h2.drain()
        self._flush()
        if not self._streams:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._read_gate = ReadGate(transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self._peer = (peer[0], peer[1])
        self._local = (local[0], local[1])
        self._ssl_object = transport.get_extra_info("ssl_object")
        if self._connections is not None:
            self._connections.add(self)
        self._h2.initiate()
        self._flush()
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        events = self._h2.receive(data, self._loop.time())
        for event in events:
            if isinstance(event, Data):
                self._on_data(event)
            elif isinstance(event, RequestHead):
                self._on_request(event)
            elif isinstance(event, StreamEnded):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.body.feed_eof()
            elif isinstance(event, Trailers):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    if _malformed_fields(event.headers):
                        # what the head would have been refused for: the body fails
                        # before anything ends it upstream
                        stream.body.set_exception(DownstreamError("malformed trailers"))
                        self._h2.reset(event.stream_id, PROTOCOL_ERROR)
                    else:
                        stream.body.trailers = event.headers
            elif isinstance(event, StreamReset):
                self._on_reset(event.stream_id)
            elif isinstance(event, SendWindowOpened):
                self._wake_writers()
            elif isinstance(event, GoAway):
                pass  # the client opens no more streams; the open ones finish
            elif isinstance(event, ConnectionFailed):
                log.info("h2.connection_failed", reason=event.reason, peer=self._peer)
                self._flush()
                self._close()
                return
        self._flush()
        if self._h2.draining and not self._streams and not self._h2.open_streams:
            self._close()

    def eof_received(self) -> bool:
        return False  # HTTP/2 has no half-close: the client is gone

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        for stream_id in list(self._streams):
            self._on_reset(stream_id)
        if self._connections is not None:
            self._connections.discard(self)

    def pause_writing(self) -> None:
        # The client does not read: stop reading it too, so that nothing it sends
        # (PINGs, SETTINGS, requests) makes us queue more answers.
        self._write_paused = True
        if self._read_gate is not None:
            self._read_gate.pause(_WRITE_PAUSED)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._read_gate is not None:
            self._read_gate.resume(_WRITE_PAUSED)
        self._wake_writers()

    # -- what H2Exchange uses ------------------------------------------------------------

    @property
    def connection(self) -> H2Connection:
        return self._h2

    def flush(self) -> None:
        self._flush()

    async def wait_writable(self, stream_id: int) -> None:
        """Until the stream's queued bytes fit the send buffer and the socket takes
        more; raises DownstreamError once the stream or the connection is gone."""
        while True:
            stream = self._streams.get(stream_id)
            if stream is None or self._closed:
                raise DownstreamError("client reset the stream")
            if not self._write_paused and (
                self._h2.outbound_buffered(stream_id) <= STREAM_SEND_BUFFER
            ):
                return
            waiter = stream.waiter = self._loop.create_future()
            await waiter

    # -- events --------------------------------------------------------------------------

    def _on_request(self, head: RequestHead) -> None:
        stream_id = head.stream_id
        try:
            request = self._build_request(head)
        except (InvalidTarget, MalformedHead) as error:
            self._local_error(stream_id, 400, str(error))
            return
        except ValueError:
            self._local_error(stream_id, 400, "")
            return
        exchange = H2Exchange(self, stream_id, request)
        stream = self._streams[stream_id] = _Stream(request, exchange)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        stream.task = self._loop.create_task(
            self._serve(stream_id, stream), name=f"h2-stream-{stream_id}-{self._peer}"
        )

    def _build_request(self, head: RequestHead) -> Request:
        method = scheme = path = ""
        authority: str | None = None
        host: str | None = None
        headers: list[tuple[str, str]] = []
        cookies: list[str] = []
        content_length: int | None = None
        override = False
        for name, value in head.headers:
            if name[0] == ":":
                if name not in _PSEUDO:
                    raise MalformedHead("unknown pseudo-header field")
                if name == ":method":
                    method = value
                elif name == ":scheme":
                    scheme = value
                elif name == ":path":
                    path = value
                elif name == ":authority":
                    authority = value
                continue
            if _FIELD_NAME.fullmatch(name) is None:
                raise MalformedHead("header field name is not a token")
            if _FIELD_VALUE_BAD.search(value) is not None:
                raise MalformedHead("control character in a header field value")
            if name == "host":
                if host is not None:
                    raise InvalidTarget("several Host fields")
                host = value
                continue
            if name == "cookie":
                cookies.append(value)  # RFC 9113 §8.2.3: crumbs are joined again
                continue
            if name == "content-length":
                if not value.isdigit() or (
                    content_length is not None and content_length != int(value)
                ):
                    raise ValueError("invalid content-length")
                content_length = int(value)
            elif name in OVERRIDE_HEADERS:
                override = True
            headers.append((name, value))
        if _METHOD.fullmatch(method) is None:
            raise MalformedHead("method must be an upper-case token")
        if head.end_stream and content_length:
            # RFC 9113 §8.1.1: malformed; h2 checks a length only against DATA received
            raise MalformedHead("content-length does not match the body")
        if cookies:
            headers.append(("cookie", "; ".join(cookies)))
        if len(headers) > self._limits.max_header_count:
            raise ValueError("too many header fields")
        # :authority wins over Host (RFC 9113 §8.3.1); either is validated the same
        raw_authority = authority if authority is not None else (host or "")
        target = normalize_request_target(
            method,
            RequestTarget(False, scheme, raw_authority, path if method != "CONNECT" else ""),
            None,
            self._normalization,
        )
        if override and self._normalization.drop_override_headers:
            headers = [(n, v) for n, v in headers if n not in OVERRIDE_HEADERS]
        if target.authority:
            headers.append(("host", target.authority))
        stream_id = head.stream_id
        if head.end_stream:
            body = BodyStream.empty()
        else:
            h2c = self._h2

            def consumed(size: int) -> None:
                h2c.consumed(stream_id, size)
                self._flush()

            body = BodyStream(
                length=content_length,
                high_water=1 << 62,  # bounded by the stream's flow-control window
                on_consumed=consumed,
            )
        return Request(
            method,
            path,
            False,
            scheme or "http",
            target.authority,
            target.path,
            headers,
            "2",
            True,
            None,
            self._peer,
            self._local,
            self._ssl_object,
            content_length,
            False,
            body,
        )

    def _on_data(self, event: Data) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.body.complete or stream.body.failed:
            # nobody will read it: give its window back at once
            self._h2.consumed(event.stream_id, event.flow_controlled)
            return
        if event.data:
            stream.body.feed(event.data)
        elif event.flow_controlled:
            self._h2.consumed(event.stream_id, event.flow_controlled)

    def _on_reset(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        stream.body.set_exception(DownstreamError("client reset the stream"))
        self._release_window(stream_id, stream.body)
        if stream.waiter is not None and not stream.waiter.done():
            stream.waiter.set_result(None)
        task = stream.task
        if task is not None and not task.done():
            task.cancel()
        self._after_stream()

    def _wake_writers(self) -> None:
        for stream in self._streams.values():
            waiter = stream.waiter
            if waiter is not None:
                stream.waiter = None
                if not waiter.done():
                    waiter.set_result(None)

    # -- the handler per stream ----------------------------------------------------------

    async def _serve(self, stream_id: int, stream: _Stream) -> None:
        request, exchange = stream.request, stream.exchange
        try:
            await self._handler(request, cast("Exchange", exchange))
            if not exchange.finished:
                log.error("h2.handler_no_response", method=request.method, path=request.path)
                self._fail_stream(stream_id, exchange, 500)
        except asyncio.CancelledError:
            if stream_id in self._streams:
                self._h2.reset(stream_id, CANCEL)
                self._flush()
            raise
        except DownstreamError:
            self._fail_stream(stream_id, exchange, None)
        except UpstreamError as error:
            log.info("h2.upstream_error", error=str(error), peer=self._peer)
            self._fail_stream(stream_id, exchange, 502)
        except Exception as error:
            path = request.path.partition("?")[0]
            _log_unhandled("h2.handler_error", error, method=request.method, path=path)
            self._fail_stream(stream_id, exchange, 500)
        finally:
            live = self._streams.get(stream_id)
            if live is stream:
                del self._streams[stream_id]
                if not stream.body.complete:
                    # answered before the client finished sending: it may stop now
                    self._h2.reset(stream_id, NO_ERROR)
                self._release_window(stream_id, stream.body)
                self._flush()
                self._after_stream()

    def _fail_stream(self, stream_id: int, exchange: H2Exchange, status: int | None) -> None:
        if exchange.responded or status is None or stream_id not in self._streams:
            self._h2.reset(stream_id, INTERNAL_ERROR)
        else:
            exchange.respond_error(status)
        self._flush()

    def _local_error(self, stream_id: int, status: int, reason: str) -> None:
        text = (f"Bad Request: {reason}\n" if reason else "Bad Request\n").encode()
        self._h2.send_head(
            stream_id,
            [
                (":status", str(status)),
                ("content-type", "text/plain; charset=utf-8"),
                ("content-length", str(len(text))),
            ],
            end_stream=False,
        )
        self._h2.send_data(stream_id, text)
        self._h2.end_stream(stream_id)
        self._flush()

    def _release_window(self, stream_id: int, body: BodyStream) -> None:
        unread = body.release_flow()
        if unread:
            self._h2.consumed(stream_id, unread)

    def _after_stream(self) -> None:
        if self._streams:
            return
        if self._h2.draining:
            if not self._h2.open_streams:
                self._close()
        else:
            self._arm_idle_timer()

    # -- output and closing --------------------------------------------------------------

    def _flush(self) -> None:
        """Write what is queued once this turn of the event loop is over."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._write_queued)

    def _write_queued(self) -> None:
        self._flush_scheduled = False
        data = self._h2.data_to_send()
        transport = self._transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def _close(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self._write_queued()  # a GOAWAY, the last answers
            transport.close()

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self._loop.call_later(self._limits.idle_timeout, self._on_idle)

    def _on_idle(self) -> None:
        self._idle_timer = None
        if not self._streams:
            self._h2.drain()
            self._flush()
            self._close()


def _log_unhandled(event: str, error: BaseException, **fields: object) -> None:
    fields_of_error = exception_fields(error)
    suppressed = _error_logs.admit((event, fields_of_error["error_type"], fields_of_error["at"]))
    if suppressed is None:
        return
    log.error(event, **fields, **fields_of_error, suppressed=suppressed)
