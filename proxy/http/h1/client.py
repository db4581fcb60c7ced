"""The client role of an HTTP/1.1 connection: requests out, responses in (sans-IO).

One exchange at a time (requests are never pipelined upstream): `send(RequestHead)`
starts one, `receive_data` returns the response's events, and the exchange is over
once both the request body was sent (`send(EndOfMessage())`) and the response ended
(`EndOfMessage` received). Any byte arriving outside an exchange, a second final
response, a malformed or oversized head, a status outside 100-599, a 101 nobody asked
for: `ProtocolError`, and the connection must not be reused.
"""

from __future__ import annotations

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from ..limits import Limits
from ..wire import no_body_status, parse_content_length, response_is_chunked
from .encode import REQUEST_SKIP, join_head, request_line
from .events import (
    END_OF_MESSAGE,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    Headers,
    InformationalResponse,
    ProtocolError,
    RequestHead,
    ResponseHead,
    TunnelBytes,
)
from .outgoing import CHUNKED, LENGTH, NO_MESSAGE, BodySender

# 1xx heads accepted before the final response (Envoy drops repeats; nobody sends many).
MAX_INTERIM_RESPONSES = 16

# Methods whose empty body is still worth announcing (RFC 9110 §8.6).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

_NAME_CACHE: dict[bytes, str] = {}
_NAME_CACHE_MAX = 512

# Header names the response parser acts on, mapped to small codes.
_CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION = 1, 2, 3
_SPECIAL = {
    "content-length": _CONTENT_LENGTH,
    "transfer-encoding": _TRANSFER_ENCODING,
    "connection": _CONNECTION,
}


class _BadResponse(Exception):
    """Raised from a parser callback to stop parsing; carries the reason."""


def encode_request_head(head: RequestHead, default_authority: str) -> tuple[bytes, bool]:
    """The wire head of `head` and whether it asks for an upgrade.

    Framing follows `head.content_length` (None: chunked), not the caller's fields;
    Host is added (`default_authority`) when absent. Raises ValueError for a head that
    cannot be sent as it is."""
    lines: list[str] = []
    has_host = False
    upgrade_field = False
    connection_upgrade = False
    for name, value in head.headers:
        lowered = name.lower()
        if lowered in REQUEST_SKIP:
            continue
        if lowered == "host":
            has_host = True
        elif lowered == "upgrade":
            upgrade_field = True
        elif lowered == "connection" and "upgrade" in value.lower():
            connection_upgrade = True
        lines.append(f"{name}: {value}\r\n")
    extra = "" if has_host else f"host: {default_authority}\r\n"
    length = head.content_length
    if length is None:
        extra += "transfer-encoding: chunked\r\n"
    elif length or head.method in _BODY_METHODS:
        extra += f"content-length: {length}\r\n"
    upgrade = upgrade_field and connection_upgrade
    if upgrade and length != 0:
        raise ValueError("an upgrade request cannot carry a body")
    return join_head(request_line(head.method, head.target), lines, extra), upgrade


class ClientConnection(BodySender):
    """One upstream connection's HTTP/1.1 state, both directions."""

    def __init__(self, limits: Limits, default_authority: str = "") -> None:
        self._limits = limits
        self._default_authority = default_authority
        self._parser = HttpResponseParser(self)
        self._events: list[Event] = []
        self._in_exchange = False
        self._head_request = False
        self._upgrade_requested = False
        self._switched = False
        self._broken = False
        self.request_done = False
        self.response_done = False
        self.response_started = False  # a byte of the response arrived
        self.keep_alive = True  # the connection may carry another exchange
        self._response: ResponseHead | None = None
        self._in_body = False
        self._interim = 0
        self._quiet_bytes = 0
        self._progress = False
        self._reset_head()

    def _reset_head(self) -> None:
        self._reason = b""
        self._headers: Headers = []
        self._header_bytes = 0
        self._content_lengths: list[str] | None = None
        self._transfer_encodings: list[str] | None = None
        self._connection_tokens = ""
        self._in_head = False
        self._trailers: Headers | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def exchange_done(self) -> bool:
        """Both the request and the response are complete."""
        return self.request_done and self.response_done

    @property
    def reusable(self) -> bool:
        """The exchange is over and the connection may carry another."""
        return self.request_done and self.response_done and self.keep_alive and not self._broken

    @property
    def in_body(self) -> bool:
        return self._in_body

    @property
    def idle(self) -> bool:
        """No exchange under way, and the connection may start one."""
        if self._broken or self._switched or not self.keep_alive:
            return False
        return not self._in_exchange or self.exchange_done

    # -- sending -------------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """The bytes of `event`: a `RequestHead` starts an exchange; its body follows as
        `Data` and ends with `EndOfMessage`. Raises ValueError for an event that does not
        fit, before changing anything."""
        if isinstance(event, RequestHead):
            return self._send_head(event)
        if isinstance(event, Data):
            return self.send_data(event.data)
        if isinstance(event, EndOfMessage):
            return self.send_end(event.trailers)
        raise ValueError(f"a client does not send {type(event).__name__}")

    def _body_sent(self) -> None:
        self.request_done = True

    def _send_head(self, head: RequestHead) -> bytes:
        if self._in_exchange and not (self.request_done and self.response_done):
            raise ValueError("one exchange at a time")
        if self._broken or self._switched or not self.keep_alive:
            raise ValueError("connection cannot carry another request")
        wire, upgrade = encode_request_head(head, self._default_authority)
        if self._head_request:
            # llhttp cannot be told a response answered HEAD: it would wait for the
            # body the head announced. A fresh parser takes the next response.
            self._parser = HttpResponseParser(self)
        self._in_exchange = True
        self._head_request = head.method == "HEAD"
        self._upgrade_requested = upgrade
        self.request_done = False
        self.response_done = False
        self.response_started = False
        self._response = None
        self._interim = 0
        self._quiet_bytes = 0
        length = head.content_length
        # `_start_body`, inlined: this runs for every request
        self._framing = CHUNKED if length is None else LENGTH
        self._remaining = length or 0
        self.sending_body = True
        return wire

    def abandon_request(self) -> None:
        """The request body will not be finished (the response came first and refused
        it): the connection is not reusable."""
        self._framing = NO_MESSAGE
        self.request_done = True
        self._broken = True

    # -- receiving -----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        if self._switched:
            return [TunnelBytes(data)]
        if not self._in_exchange or self.response_done:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self._broken = True
            return [ProtocolError(502, "response bytes outside an exchange")]
        self.response_started = True
        events = self._events = []
        self._progress = False
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0] :]
            if rest:
                events.append(TunnelBytes(rest))
            return events
        except HttpParserError as error:
            cause = error.__context__
            if isinstance(cause, _BadResponse):
                reason = str(cause)
            else:
                reason = f"malformed response: {error}"
            events.append(self._fail(reason))
            return events
        if self._progress:
            self._quiet_bytes = 0
        else:
            # A head or trailer that never ends: bound what httptools accumulates.
            self._quiet_bytes += len(data)
            if self._quiet_bytes > self._limits.max_header_bytes:
                events.append(self._fail("response head too large"))
        return events

    def receive_eof(self) -> list[Event]:
        """The upstream closed the connection (cleanly)."""
        self.keep_alive = False
        if self._switched:
            return [ConnectionClosed()]
        response = self._response
        if self._in_body and response is not None:
            self._in_body = False
            if response.content_length is None and not response.chunked:
                self.response_done = True  # a body delimited by the close (HTTP/1.0 style)
                return [END_OF_MESSAGE]
            self._broken = True
            return [ProtocolError(502, "upstream closed the connection mid-body", True)]
        return [ConnectionClosed()]

    def _fail(self, reason: str) -> ProtocolError:
        self._broken = True
        self._in_body = False
        return ProtocolError(502, reason, self._response is not None)

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._response is not None:
            raise _BadResponse("unsolicited response")  # a second final response
        self._reset_head()
        self._in_head = True

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            self._on_trailer(name, value)
            return
        self._header_bytes += len(name) + len(value) + 4
        headers = self._headers
        if len(headers) >= self._limits.max_header_count:
            raise _BadResponse("too many response header fields")
        if self._header_bytes > self._limits.max_header_bytes:
            raise _BadResponse("response head too large")
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

    def _on_trailer(self, name: bytes, value: bytes) -> None:
        trailers = self._trailers
        if trailers is None:
            trailers = self._trailers = []
        self._header_bytes += len(name) + len(value) + 4
        if len(trailers) >= self._limits.max_header_count:
            raise _BadResponse("too many response trailer fields")
        if self._header_bytes > self._limits.max_header_bytes:
            raise _BadResponse("response trailers too large")
        trailers.append((name.decode("latin-1").lower(), value.decode("latin-1").strip(" \t")))

    def on_headers_complete(self) -> None:
        self._progress = True
        self._in_head = False
        parser = self._parser
        status = parser.get_status_code()
        if not 100 <= status <= 599:
            # llhttp takes any three digits; below 100 would pass for interim and leave
            # the exchange waiting forever.
            raise _BadResponse(f"response status {status} outside 100-599")
        reason = self._reason.decode("latin-1")
        if status < 200 and status != 101:
            # interim (100 Continue, 103 Early Hints): the final one follows, but not
            # after an endless stream of them
            self._interim += 1
            if self._interim > MAX_INTERIM_RESPONSES:
                raise _BadResponse("too many interim responses")
            self._events.append(InformationalResponse(status, self._headers, reason))
            return
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _BadResponse(f"unsupported HTTP version {version}")
        if status == 101 and not (self._upgrade_requested and parser.should_upgrade()):
            raise _BadResponse("101 Switching Protocols without an upgrade request")
        content_length: int | None = None
        chunked = False
        if self._transfer_encodings is not None:
            chunked = response_is_chunked(self._transfer_encodings)
        elif self._content_lengths is not None:
            if len(self._content_lengths) != 1:
                raise _BadResponse("several Content-Length fields")
            try:
                content_length = parse_content_length(self._content_lengths[0])
            except ValueError as error:
                raise _BadResponse(str(error)) from None
        no_body = self._head_request or no_body_status(status)
        delimited_by_close = not no_body and not chunked and content_length is None
        connection = self._connection_tokens
        tokens = {t.strip() for t in connection.split(",")} if connection else ()
        if version == "1.1":
            keep_alive = "close" not in tokens
        else:
            keep_alive = "keep-alive" in tokens
        keep_alive = keep_alive and not delimited_by_close and status != 101
        self.keep_alive = keep_alive
        response = self._response = ResponseHead(
            status, self._headers, reason, content_length, chunked, keep_alive, version
        )
        events = self._events
        events.append(response)
        if status == 101:
            self._switched = True
            self.response_done = True
        elif no_body:
            self.response_done = True
            events.append(END_OF_MESSAGE)
        else:
            self._in_body = True

    def on_body(self, data: bytes) -> None:
        self._progress = True
        if not self._in_body:
            self._broken = True  # bytes after a HEAD/204/304 head
            return
        self._events.append(Data(data))

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_message_complete(self) -> None:
        self._progress = True
        if not self._in_body:
            return  # end of an interim response, of the 101 head, or of a bodiless one
        self._in_body = False
        self.response_done = True
        trailers = self._trailers
        if trailers is None:
            self._events.append(END_OF_MESSAGE)
        else:
            self._trailers = None
            self._events.append(EndOfMessage(trailers))
