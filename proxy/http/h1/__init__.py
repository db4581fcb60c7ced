"""HTTP/1.1 as a sans-IO engine: bytes in, events out; events in, bytes out.

`ServerConnection` (requests in, responses out) and `ClientConnection` (requests out,
responses in) hold every HTTP/1.1 rule the sidecar enforces: httptools (llhttp) parses,
these classes add the framing checks llhttp leaves to us, header caps, tunnels and
message framing of what is sent. No sockets, no clock: the asyncio shells
(`proxy.http.server`, `proxy.http.client`) move the bytes and own the timers.
"""

from .client import ClientConnection, encode_request_head
from .encode import (
    CONTINUE_100,
    LAST_CHUNK,
    encode_fields,
    encode_head,
    error_response,
    last_chunk,
    request_line,
    status_line,
)
from .events import (
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
from .outgoing import BodySender
from .server import ServerConnection

__all__ = [
    "CONTINUE_100",
    "LAST_CHUNK",
    "BodySender",
    "ClientConnection",
    "ConnectionClosed",
    "Data",
    "EndOfMessage",
    "Event",
    "Headers",
    "InformationalResponse",
    "ProtocolError",
    "RequestHead",
    "ResponseHead",
    "ServerConnection",
    "TunnelBytes",
    "encode_fields",
    "encode_head",
    "encode_request_head",
    "error_response",
    "last_chunk",
    "request_line",
    "status_line",
]
