"""HTTP/2 for the sidecar: a sans-IO connection (`H2Connection`, both roles) and its
asyncio shells (server: `H2ServerProtocol`; upstream: `H2UpstreamPool`)."""

from .connection import PREFACE, H2Connection, H2Limits, StreamGone
from .events import (
    ConnectionFailed,
    Data,
    Event,
    GoAway,
    RequestHead,
    ResponseHead,
    SendWindowOpened,
    StreamEnded,
    StreamReset,
    Trailers,
)

__all__ = [
    "PREFACE",
    "ConnectionFailed",
    "Data",
    "Event",
    "GoAway",
    "H2Connection",
    "H2Limits",
    "RequestHead",
    "ResponseHead",
    "SendWindowOpened",
    "StreamEnded",
    "StreamGone",
    "StreamReset",
    "Trailers",
]
