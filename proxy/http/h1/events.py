"""What an HTTP/1.1 connection hands to its shell, and what the shell hands back.

Receiving, a `ServerConnection` turns bytes into `RequestHead`, `Data`, `EndOfMessage`,
`TunnelBytes` and `ProtocolError`; a `ClientConnection` into `InformationalResponse`,
`ResponseHead`, `Data`, `EndOfMessage`, `TunnelBytes`, `ConnectionClosed` and
`ProtocolError`. Sending, the same head and body events become bytes.

Header lists hold (lower-case name, value) pairs in wire order, duplicates kept; values
are latin-1 text without surrounding whitespace. Classes use slots and no freezing:
one is allocated per head and per body chunk on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Headers = list[tuple[str, str]]


@dataclass(slots=True, eq=False)
class RequestHead:
    """A request head.

    Received: `target` is the raw request-target and `scheme`, `authority` and `path`
    its normalised parts (`proxy.http.target`); `headers` have Host rewritten to the
    authority. `content_length` and `chunked` say how the body is framed; `upgrade` is
    the Upgrade value of a valid upgrade request (not of a CONNECT); after such a head
    (or a CONNECT), the connection stops parsing HTTP and hands out `TunnelBytes`.

    Sent (client role): `method`, `target`, `headers`, and `content_length` (None for a
    chunked body); the other fields are ignored.
    """

    method: str
    target: str
    headers: Headers
    content_length: int | None = None
    chunked: bool = False
    http_version: str = "1.1"
    keep_alive: bool = True
    upgrade: str | None = None
    expect_continue: bool = False
    absolute_form: bool = False
    scheme: str = "http"
    authority: str = ""
    path: str = ""


@dataclass(slots=True, eq=False)
class ResponseHead:
    """A final response head (status 101, or 200-599).

    Received (client role): `content_length`/`chunked` frame the body, which is
    delimited by the connection's close when neither is set and the response may have
    a body; `keep_alive` says whether the connection may carry another request.

    Sent (server role): `content_length` is the body's length when known (None: chunked
    to an HTTP/1.1 client, delimited by the close for HTTP/1.0). Framing and hop-by-hop
    fields in `headers` (and those `Connection` nominates) are dropped: the connection
    writes its own. `keep_alive=False` asks for `Connection: close`.
    """

    status: int
    headers: Headers
    reason: str = ""
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    http_version: str = "1.1"


@dataclass(slots=True, eq=False)
class InformationalResponse:
    """A 1xx head other than 101 (100 Continue, 103 Early Hints)."""

    status: int
    headers: Headers = field(default_factory=list)
    reason: str = ""


@dataclass(slots=True, eq=False)
class Data:
    """A piece of a message body, as the parser delivered it (no copies)."""

    data: bytes


@dataclass(slots=True, eq=False)
class EndOfMessage:
    """The end of a message body, with the trailer fields of a chunked body."""

    trailers: Headers | None = None


# The end of a message without trailers, shared: events are read, never changed.
END_OF_MESSAGE = EndOfMessage()


@dataclass(slots=True, eq=False)
class TunnelBytes:
    """Bytes after an upgrade or CONNECT head: not HTTP, to be relayed as they are."""

    data: bytes


@dataclass(slots=True, eq=False)
class ConnectionClosed:
    """The peer closed the connection (client role: ends a body delimited by the close)."""


@dataclass(slots=True, eq=False)
class ProtocolError:
    """The peer broke HTTP/1.1; nothing more is parsed from this connection.

    Server role: `status` is the answer owed (400, 408, 431) and `reason` a short text of
    our own that may be shown to the client (never request data), empty when the generic
    phrase will do. `in_body` is True when the request whose body broke was already
    handed out (its consumer must fail, the answer goes out if nothing was sent yet).
    Client role: `status` is 502 and `reason` says what was wrong with the response.
    """

    status: int
    reason: str = ""
    in_body: bool = False


Event = (
    RequestHead
    | ResponseHead
    | InformationalResponse
    | Data
    | EndOfMessage
    | TunnelBytes
    | ConnectionClosed
    | ProtocolError
)
