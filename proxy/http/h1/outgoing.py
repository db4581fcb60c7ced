"""Framing of the body a connection sends, after the head that announced it."""

from __future__ import annotations

from abc import ABC, abstractmethod

from .encode import LAST_CHUNK, last_chunk
from .events import Headers

# How the body being sent is delimited (ints: compared on every chunk).
NO_MESSAGE = -1  # no message is being sent
NO_BODY = 0  # HEAD, 1xx, 204, 304
LENGTH = 1  # Content-Length
CHUNKED = 2  # Transfer-Encoding: chunked
CLOSE = 3  # delimited by the connection's close (responses to HTTP/1.0 only)


class BodySender(ABC):
    """The body half of `send`, shared by both roles.

    Content-Length bodies are checked against the announced length (ValueError when
    longer, or shorter at the end); chunked bodies get size lines and the last chunk,
    with trailers when the peer takes them; a message without a body refuses content.
    Each role's head sending calls `_start_body`; `_body_sent` is told the end.
    """

    _framing = NO_MESSAGE
    _remaining = 0
    _trailers_allowed = False
    sending_body = False  # the head sent last announced a body

    def _start_body(self, framing: int, length: int, trailers_allowed: bool = False) -> None:
        self._framing = framing
        self._remaining = length
        self._trailers_allowed = trailers_allowed
        self.sending_body = framing != NO_BODY

    @abstractmethod
    def _body_sent(self) -> None:
        """The body ended: each role moves its own state (ServerConnection,
        ClientConnection)."""

    def send_data(self, data: bytes) -> bytes:
        """`send(Data(data))` without the event (the body's hot path): `data` framed,
        b"" for an empty chunk (which would end a chunked body)."""
        size = len(data)
        framing = self._framing
        if framing == LENGTH:
            remaining = self._remaining - size
            if remaining < 0:
                raise ValueError("body longer than its Content-Length")
            self._remaining = remaining
            return data
        if framing == CHUNKED:
            return b"%x\r\n%b\r\n" % (size, data) if size else b""
        if framing == CLOSE or not size:
            return data
        if framing == NO_MESSAGE:
            raise ValueError("body data before its head")
        raise ValueError("this message has no body")

    def send_end(self, trailers: Headers | None = None) -> bytes:
        """`send(EndOfMessage(trailers))` without the event: what ends the body."""
        framing = self._framing
        if framing == NO_MESSAGE:
            raise ValueError("end of a message before its head")
        if framing == LENGTH and self._remaining:
            raise ValueError("body shorter than its Content-Length")
        end = b""
        if framing == CHUNKED:
            end = last_chunk(trailers) if trailers and self._trailers_allowed else LAST_CHUNK
        self._framing = NO_MESSAGE
        self.sending_body = False
        self._body_sent()
        return end
