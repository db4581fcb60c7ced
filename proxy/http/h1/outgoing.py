"""Framing of the body a connection sends, after the head that announced it."""

from __future__ import annotations

from ..wire import Framing
from .encode import LAST_CHUNK, last_chunk


class BodyWriter:
    """Turns body chunks into wire bytes for one outgoing message.

    Content-Length bodies are checked against the announced length (ValueError when
    longer, or shorter at the end); chunked bodies get size lines and the last chunk,
    with trailers when `trailers_allowed`; a body with no framing (HEAD, 204, 304, 1xx)
    refuses content.
    """

    __slots__ = ("framing", "remaining", "sent", "trailers_allowed")

    def __init__(
        self, framing: Framing, length: int | None = None, trailers_allowed: bool = False
    ) -> None:
        self.framing = framing
        self.remaining = length
        self.sent = 0
        self.trailers_allowed = trailers_allowed

    def data(self, chunk: bytes) -> bytes:
        """`chunk` framed; b"" for an empty chunk (an empty chunk would end a chunked
        body)."""
        size = len(chunk)
        if not size:
            return b""
        framing = self.framing
        self.sent += size
        if framing is Framing.CHUNKED:
            return b"%x\r\n%b\r\n" % (size, chunk)
        if framing is Framing.LENGTH:
            remaining = self.remaining
            if remaining is not None:
                if size > remaining:
                    raise ValueError("body longer than its Content-Length")
                self.remaining = remaining - size
            return chunk
        if framing is Framing.CLOSE:
            return chunk
        raise ValueError("this message has no body")

    def end(self, trailers: list[tuple[str, str]] | None = None) -> bytes:
        """What ends the body: the last chunk (and trailers), or b""."""
        framing = self.framing
        if framing is Framing.CHUNKED:
            return last_chunk(trailers) if trailers and self.trailers_allowed else LAST_CHUNK
        if framing is Framing.LENGTH and self.remaining:
            raise ValueError("body shorter than its Content-Length")
        return b""
