"""The server role of an HTTP/1.1 connection: requests in, responses out (sans-IO).

`receive_data` feeds httptools (llhttp) and returns the events it produced; the
framing checks llhttp leaves to us (`proxy.http.wire.check_request_head`), the header
caps of `Limits` and request-target normalisation (`proxy.http.target`) are applied
here, so a malformed request never becomes a `RequestHead`: it becomes a
`ProtocolError` carrying the status owed (400, 431), and nothing more is parsed.

Pipelining: requests are parsed ahead of their answers; `send` answers them in order
(the oldest unanswered request is the one a `ResponseHead` answers, and fixes its
framing: no body for HEAD, 204 and 304; chunked to HTTP/1.1, close-delimited to
HTTP/1.0 when the length is unknown). After an upgrade request or a CONNECT, what
follows the head is `TunnelBytes`.

No clock here: timeouts are the shell's (it calls `fail(408)`).
"""

from __future__ import annotations

from collections import deque
from typing import NoReturn

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from ..headers import accepts_trailers
from ..limits import Limits
from ..target import (
    DEFAULT_NORMALIZATION,
    OVERRIDE_HEADERS,
    InvalidTarget,
    Normalization,
    normalize_path,
    normalize_request_target,
)
from ..wire import check_request_head, parse_content_length
from .encode import (
    CONNECT_ESTABLISHED,
    CONTINUE_100,
    HOP_BY_HOP,
    encode_head,
    response_skip,
    status_line,
)
from .events import (
    END_OF_MESSAGE,
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
from .outgoing import CHUNKED, CLOSE, LENGTH, NO_BODY, NO_MESSAGE, BodySender

# Header names the request parser acts on, mapped to small codes.
_CONTENT_LENGTH, _TRANSFER_ENCODING, _HOST, _UPGRADE, _EXPECT, _OVERRIDE = 1, 2, 3, 4, 5, 6
_SPECIAL = {
    "content-length": _CONTENT_LENGTH,
    "transfer-encoding": _TRANSFER_ENCODING,
    "host": _HOST,
    "upgrade": _UPGRADE,
    "expect": _EXPECT,
    **dict.fromkeys(OVERRIDE_HEADERS, _OVERRIDE),
}

_NAME_CACHE: dict[bytes, str] = {}
_NAME_CACHE_MAX = 512
_METHODS: dict[bytes, str] = {}


class _Rejected(Exception):
    """Raised from a parser callback to stop parsing; the status is on the connection."""


class ServerConnection(BodySender):
    """One client connection's HTTP/1.1 state, both directions."""

    def __init__(
        self, limits: Limits, normalization: Normalization = DEFAULT_NORMALIZATION
    ) -> None:
        self._limits = limits
        self._normalization = normalization
        self._parser = HttpRequestParser(self)
        self._events: list[Event] = []
        self._failed = False
        self._switched = False  # an upgrade/CONNECT head was parsed: bytes are tunnelled
        self.parsing = True  # requests are still parsed (no error, no tunnel)
        self._in_body = False  # a handed-out request's body is still being parsed
        self._quiet_bytes = 0
        self._progress = False
        self._reject_status = 400
        self._reject_reason = ""
        # requests handed out and not yet answered completely, oldest first
        self._unanswered: deque[RequestHead] = deque()
        self.keep_alive = True  # False once an answer said `Connection: close`
        self._memo_host: str | None = None  # the last Host value and its normal form
        self._memo_authority = ""
        self._reset_head()

    def _reset_head(self) -> None:
        self.in_head = False
        self._url = b""
        self._headers: Headers = []
        self._head_bytes = 0
        self._content_lengths: list[str] | None = None
        self._transfer_encodings: list[str] | None = None
        self._hosts: list[str] | None = None
        self._upgrade: str | None = None
        self._expect_continue = False
        self._override_headers = False
        self._trailers: Headers | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def in_body(self) -> bool:
        """The body of the last request handed out is still arriving."""
        return self._in_body

    # -- receiving -----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """The events `data` completes, in order."""
        if self._switched:
            return [TunnelBytes(data)]
        if self._failed:
            return []  # discarded while the error answer leaves (lingering close)
        events = self._events = []
        self._progress = False
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self._switched = True
            self.parsing = False
            rest = data[upgrade.args[0] :]
            if rest:
                events.append(TunnelBytes(rest))
            return events
        except HttpParserError:
            events.append(self.fail(self._reject_status, self._reject_reason))
            return events
        if self._progress:
            self._quiet_bytes = 0
        else:
            # A head (or chunk extension, or trailer) that never ends: httptools buffers
            # it whole, so stop once it exceeds the header budget.
            self._quiet_bytes += len(data)
            if self._quiet_bytes > self._limits.max_header_bytes:
                events.append(self.fail(431 if self.in_head else 400))
        return events

    def fail(self, status: int, reason: str = "") -> ProtocolError:
        """Stop parsing: the request stream is broken (or stalled, 408). The event says
        what to answer; `in_body` when the broken request was already handed out."""
        error = ProtocolError(status, reason, self._in_body)
        self._failed = True
        self.parsing = False
        self._in_body = False
        self.in_head = False
        return error

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_head()
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self._limits.max_header_bytes:
            self._reject(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            self._on_trailer(name, value)
            return
        self._head_bytes += len(name) + len(value) + 4
        headers = self._headers
        limits = self._limits
        if len(headers) >= limits.max_header_count or self._head_bytes > limits.max_header_bytes:
            self._reject(431)
        lowered = _NAME_CACHE.get(name)
        if lowered is None:
            lowered = name.decode("latin-1").lower()
            if len(_NAME_CACHE) < _NAME_CACHE_MAX:
                _NAME_CACHE[name] = lowered
        # llhttp drops leading whitespace but keeps trailing; the value excludes both.
        text = value.decode("latin-1").strip(" \t")
        headers.append((lowered, text))
        special = _SPECIAL.get(lowered)
        if special is None:
            return
        if special == _CONTENT_LENGTH:
            if self._content_lengths is None:
                self._content_lengths = []
            self._content_lengths.append(text)
        elif special == _TRANSFER_ENCODING:
            if self._transfer_encodings is None:
                self._transfer_encodings = []
            self._transfer_encodings.append(text)
        elif special == _HOST:
            if self._hosts is None:
                self._hosts = []
            self._hosts.append(text)
        elif special == _UPGRADE:
            self._upgrade = text
        elif special == _OVERRIDE:
            self._override_headers = True
        elif text.lower() == "100-continue":
            self._expect_continue = True

    def _on_trailer(self, name: bytes, value: bytes) -> None:
        # Trailers count against the head budget.
        trailers = self._trailers
        if trailers is None:
            trailers = self._trailers = []
        self._head_bytes += len(name) + len(value) + 4
        limits = self._limits
        if len(trailers) >= limits.max_header_count or self._head_bytes > limits.max_header_bytes:
            self._reject(431)
        trailers.append((name.decode("latin-1").lower(), value.decode("latin-1").strip(" \t")))

    def on_headers_complete(self) -> None:
        self._progress = True
        self.in_head = False
        parser = self._parser
        version = parser.get_http_version()
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method)
        if method is None:
            method = _METHODS[raw_method] = raw_method.decode("ascii")
        target_text = self._url.decode("latin-1")
        upgrading = parser.should_upgrade()
        hosts = self._hosts
        rules = self._normalization
        content_lengths = self._content_lengths
        content_length: int | None = None
        chunked = False
        try:
            if (
                hosts is not None
                and len(hosts) == 1
                and hosts[0] == self._memo_host
                and target_text[:1] == "/"
                and self._transfer_encodings is None
                and (content_lengths is None or len(content_lengths) == 1)
                and (version == "1.1" or version == "1.0")
                and "#" not in target_text
            ):
                # The common case, a keep-alive client's next origin-form request
                # naming the same Host, without Transfer-Encoding: of
                # `check_request_head`'s rules only the Content-Length's value and an
                # upgrade's body are left to check, and the Host's normal form is
                # remembered (a pure function of the value). Anything else takes the
                # general path below.
                if content_lengths is not None:
                    try:
                        content_length = parse_content_length(content_lengths[0])
                    except ValueError:
                        self._reject(400)
                    if upgrading and content_length:
                        self._reject(400)
                host: str | None = hosts[0]
                absolute_form, scheme = False, "http"
                authority = self._memo_authority
                path = normalize_path(target_text, rules)
            else:
                try:
                    head = check_request_head(
                        version,
                        method,
                        target_text,
                        content_lengths,
                        self._transfer_encodings,
                        hosts,
                        upgrading,
                    )
                except ValueError:
                    self._reject(400)
                content_length, chunked = head.content_length, head.chunked
                host = hosts[0] if hosts else None
                target = normalize_request_target(method, head.target, host, rules)
                absolute_form, scheme = target.absolute_form, target.scheme
                authority, path = target.authority, target.path
                if host is not None and not absolute_form and method != "CONNECT":
                    self._memo_host = host
                    self._memo_authority = authority
        except InvalidTarget as error:
            self._reject(400, str(error))
        headers = self._headers
        if authority != (host or ""):
            headers = _with_host(headers, authority)
        if self._override_headers and rules.drop_override_headers:
            headers = [(n, v) for n, v in headers if n not in OVERRIDE_HEADERS]
        request = RequestHead(
            method,
            target_text,
            headers,
            content_length,
            chunked,
            version,
            parser.should_keep_alive(),
            self._upgrade if upgrading and method != "CONNECT" else None,
            self._expect_continue and version == "1.1",
            absolute_form,
            scheme,
            authority,
            path,
        )
        self._in_body = True
        self._unanswered.append(request)
        self._events.append(request)

    def on_body(self, data: bytes) -> None:
        self._progress = True
        self._events.append(Data(data))

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_message_complete(self) -> None:
        self._progress = True
        self._in_body = False
        trailers = self._trailers
        if trailers is None:
            self._events.append(END_OF_MESSAGE)
        else:
            self._trailers = None
            self._events.append(EndOfMessage(trailers))

    def _reject(self, status: int, reason: str = "") -> NoReturn:
        self._reject_status = status
        self._reject_reason = reason
        raise _Rejected

    # -- sending -------------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """The bytes of `event`, part of the answer to the oldest unanswered request.

        Raises ValueError for an event that does not fit (no request to answer, a body
        longer than announced, a field that would corrupt the head)."""
        if isinstance(event, ResponseHead):
            return self._send_head(event)
        if isinstance(event, Data):
            return self.send_data(event.data)
        if isinstance(event, EndOfMessage):
            return self.send_end(event.trailers)
        if isinstance(event, InformationalResponse):
            if not self._unanswered:
                raise ValueError("no request to answer")
            request = self._unanswered[0]
            if event.status == 100 and not event.headers:
                return CONTINUE_100 if request.http_version == "1.1" else b""
            if not 100 <= event.status < 200 or event.status == 101:
                raise ValueError(f"{event.status} is not an informational status")
            return encode_head(status_line(event.status, event.reason), event.headers, HOP_BY_HOP)
        raise ValueError(f"a server does not send {type(event).__name__}")

    def _body_sent(self) -> None:
        self._unanswered.popleft()

    def _send_head(self, response: ResponseHead) -> bytes:
        if not self._unanswered:
            raise ValueError("no request to answer")
        request = self._unanswered[0]
        if self._framing != NO_MESSAGE:
            raise ValueError("this request was already answered")
        status = response.status
        headers = response.headers
        if status == 101:
            if request.upgrade is None:
                raise ValueError("a 101 answers an upgrade request")
            upgrade = _first(headers, "upgrade") or request.upgrade
            head = encode_head(
                status_line(101),
                headers,
                response_skip(headers) - {"content-length"},
                f"connection: upgrade\r\nupgrade: {upgrade}\r\n",
            )
            self._switch()
            return head
        if status < 200 or status > 999:
            raise ValueError(f"{status} is not a final status")
        method = request.method
        if method == "CONNECT" and status < 300:
            head = encode_head(CONNECT_ESTABLISHED, headers, response_skip(headers))
            self._switch()
            return head
        length = response.content_length
        http11 = request.http_version == "1.1"
        extra = ""
        if method == "HEAD" or status < 200 or status == 204 or status == 304:
            framing = NO_BODY
            # HEAD and 304 may announce what a GET would get
            if length is not None and status != 204:
                extra = f"content-length: {length}\r\n"
        elif length is not None:
            framing = LENGTH
            extra = f"content-length: {length}\r\n"
        elif http11:
            framing = CHUNKED
            extra = "transfer-encoding: chunked\r\n"
        else:
            framing = CLOSE
        if not (response.keep_alive and request.keep_alive and self.keep_alive) or (
            framing == CLOSE
        ):
            extra += "connection: close\r\n"
            self.keep_alive = False
        elif not http11:
            extra += "connection: keep-alive\r\n"
        head = encode_head(
            status_line(status, response.reason), headers, response_skip(headers), extra
        )
        if framing == LENGTH:
            self._start_body(LENGTH, length or 0)
        else:
            self._start_body(framing, 0, framing == CHUNKED and accepts_trailers(request.headers))
        return head

    def _switch(self) -> None:
        """The answer turned the connection into a tunnel: nothing more is HTTP."""
        self._switched = True
        self.parsing = False
        self._unanswered.clear()
        self.keep_alive = False


def _first(headers: Headers, name: str) -> str | None:
    for field_name, value in headers:
        if field_name.lower() == name:
            return value
    return None


def _with_host(headers: Headers, authority: str) -> Headers:
    """`headers` with the Host field's value replaced by `authority` (added when there
    was none); the head has at most one Host field by now."""
    out = [(n, authority) if n == "host" else (n, v) for n, v in headers]
    if authority and not any(n == "host" for n, _ in headers):
        out.append(("host", authority))
    return out
