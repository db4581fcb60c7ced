"""What an `H2Connection` reports: one small frozen event per thing the shell must act on.

Header names are lower-case `str` (decoded as latin-1, like the HTTP/1 engine's), in
wire order, pseudo-headers included for heads (`:method`, `:path`, `:status`...).
"""

from __future__ import annotations

from dataclasses import dataclass

Headers = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A peer opened a stream with a request head (server role)."""

    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """The final response head of a stream we opened (client role); 1xx are skipped."""

    stream_id: int
    status: int
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class Data:
    """Body bytes. `flow_controlled` (data plus padding) must be handed back with
    `H2Connection.consumed` once the consumer has read `data`: that is what re-opens
    the peer's window, so a slow reader slows its sender."""

    stream_id: int
    data: bytes
    flow_controlled: int
    end_stream: bool


@dataclass(frozen=True, slots=True)
class Trailers:
    """Trailing headers; the stream ends with them."""

    stream_id: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer finished sending on the stream (after its head, data or trailers)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream was reset: by the peer (`remote`), or by us for a protocol error on
    that stream alone (e.g. malformed headers)."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class SendWindowOpened:
    """The peer gave us window on a stream (or on the connection: stream_id 0): queued
    body bytes may have left; `H2Connection.outbound_buffered` says how many remain."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class GoAway:
    """The peer will open no more streams; streams above `last_stream_id` (ours) were
    not processed and may be retried elsewhere."""

    last_stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """We ended the connection (protocol error, flood, ...): GOAWAY is in
    `data_to_send()`; write it, then close the transport. `reason` is our own text."""

    error_code: int
    reason: str


Event = (
    RequestHead
    | ResponseHead
    | Data
    | Trailers
    | StreamEnded
    | StreamReset
    | SendWindowOpened
    | GoAway
    | ConnectionFailed
)
