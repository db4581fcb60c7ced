"""The engine's error hierarchy.

Errors are raised where they enter (a socket, a parser) and mapped to a wire status
only at the boundary: the engine answers an unhandled `UpstreamError` with 502 and a
`DownstreamError` with its `status`; the sidecar's handlers may map them differently.
"""

from __future__ import annotations


class HttpEngineError(Exception):
    """Base class of every error raised by `proxy.http`."""


class UpstreamError(HttpEngineError):
    """Talking to the upstream failed."""


class UpstreamConnectError(UpstreamError):
    """The connection could not be opened: refused, unreachable, timed out, TLS failure."""


class UpstreamResetError(UpstreamError):
    """The upstream reset or closed the connection before the response was complete."""


class UpstreamProtocolError(UpstreamError):
    """The upstream sent a malformed or unacceptable HTTP/1.1 response."""


class DownstreamError(HttpEngineError):
    """The client side failed: it disconnected, sent a malformed body, or stalled.

    `status` is what to answer when no response byte has been sent yet; None means the
    client is gone and nothing can be answered.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BodyTooLargeError(HttpEngineError):
    """`BodyStream.read_all(limit)` saw more than `limit` bytes."""
