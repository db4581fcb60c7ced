"""Body streams: chunks handed from a protocol to a consumer, with backpressure."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from .errors import BodyTooLargeError
from .flow import ReadGate


class BodyInterrupted(Exception):
    """Internal: an interruptible read was woken because the peer answered early."""


class BodyStream:
    """An async iterator of body chunks (bytes) with backpressure.

    The producing protocol `feed`s chunks as the parser delivers them; when more than
    `high_water` bytes wait here, the producer's socket is paused, and it resumes once
    the consumer has drained below half of that. Chunks are passed through as the
    parser produced them: no copies, no re-chunking.

    `length` is the declared Content-Length, or None when the body is chunked (or, for
    responses, delimited by the connection's close).

    HTTP/2 streams pass `on_consumed`: told the size of every chunk the consumer takes,
    it re-opens the peer's flow-control window only as fast as the body is read.
    `trailers` are the trailing fields that ended the body (HTTP/2), set before EOF.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_eof",
        "_error",
        "_gate",
        "_high_water",
        "_interrupted",
        "_on_consumed",
        "_on_first_wait",
        "_paused",
        "_waiter",
        "bytes_received",
        "chunked",
        "length",
        "peak_buffered",
        "trailers",
    )

    def __init__(
        self,
        *,
        length: int | None,
        chunked: bool = False,
        gate: ReadGate | None = None,
        high_water: int = 64 * 1024,
        on_consumed: Callable[[int], None] | None = None,
    ) -> None:
        self.length = length
        self.trailers: list[tuple[str, str]] | None = None
        self._on_consumed = on_consumed
        self.chunked = chunked
        self.bytes_received = 0
        self.peak_buffered = 0
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._high_water = high_water
        self._gate = gate
        self._paused = False
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._interrupted = False
        self._on_first_wait: Callable[[], None] | None = None

    @classmethod
    def empty(cls) -> BodyStream:
        """A body with no content, already complete."""
        stream = cls(length=0)
        stream._eof = True
        return stream

    @classmethod
    def from_bytes(cls, data: bytes) -> BodyStream:
        """A complete body holding `data` (handy for local responses and tests)."""
        stream = cls(length=len(data))
        if data:
            stream.feed(data)
        stream._eof = True
        return stream

    # -- state ------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Every byte has been received (it may still be waiting to be consumed)."""
        return self._eof

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def buffered(self) -> int:
        return self._buffered

    @property
    def untouched(self) -> bool:
        """Nothing has been taken from the stream yet."""
        return self._buffered == self.bytes_received

    # -- producer side ----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        size = len(data)
        self.bytes_received += size
        buffered = self._buffered = self._buffered + size
        if buffered > self.peak_buffered:
            self.peak_buffered = buffered
        if buffered > self._high_water and not self._paused and self._gate is not None:
            self._paused = True
            self._gate.pause(self)
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._detach()
        self._wake()

    def set_exception(self, error: BaseException) -> None:
        """Fail the stream: queued chunks are still delivered, then `error` is raised."""
        if self._eof or self._error is not None:
            return
        self._error = error
        self._detach()
        self._wake()

    def on_first_wait(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, the first time the consumer waits for data.

        The server uses it to send `100 Continue` only when the body is wanted.
        """
        self._on_first_wait = callback

    def interrupt(self) -> None:
        """Wake an interruptible reader (`next_chunk(interruptible=True)`)."""
        self._interrupted = True
        self._wake()

    def release_flow(self) -> int:
        """Stop reporting consumption; the bytes still buffered (the producer gives
        their window back itself, as nobody will read them through this stream)."""
        self._on_consumed = None
        return self._buffered

    def _detach(self) -> None:
        # The producer is done with this stream: it must no longer hold the socket.
        if self._paused and self._gate is not None:
            self._paused = False
            self._gate.resume(self)
        self._gate = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- consumer side ----------------------------------------------------------------

    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        # Duplicated from next_chunk to spare the hot path one coroutine frame per chunk.
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                raise StopAsyncIteration
            await self._wait()
        return self._take()

    async def next_chunk(self, *, interruptible: bool = False) -> bytes | None:
        """The next chunk, or None at the end. Raises BodyInterrupted if interrupted."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return None
            if interruptible and self._interrupted:
                raise BodyInterrupted
            await self._wait()
        return self._take()

    def take_ready(self) -> list[bytes]:
        """Every chunk already buffered, without waiting (to coalesce writes)."""
        chunks = list(self._chunks)
        self._chunks.clear()
        taken, self._buffered = self._buffered, 0
        if self._on_consumed is not None and taken:
            self._on_consumed(taken)
        if self._paused and self._gate is not None:
            self._paused = False
            self._gate.resume(self)
        return chunks

    async def peek(self, size: int) -> bytes:
        """Up to `size` bytes from the front of the body, left in place for whoever
        forwards it: waits until that many are buffered or the body is complete. The
        buffer may grow to `size` for it (ext_authz's `maxRequestBytes`). Over HTTP/2
        the peer's flow-control window may stop it short of `size`: callers bound the
        wait."""
        if size > self._high_water:
            self._high_water = size
            if self._paused and self._gate is not None:
                self._paused = False
                self._gate.resume(self)
        while self._buffered < size and not self._eof:
            if self._error is not None:
                raise self._error
            await self._wait()
        return b"".join(self._chunks)[:size]

    async def read_all(self, limit: int) -> bytes:
        """The whole body; raises BodyTooLargeError past `limit` bytes."""
        parts: list[bytes] = []
        total = 0
        async for chunk in self:
            total += len(chunk)
            if total > limit:
                raise BodyTooLargeError(f"body exceeds {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def _take(self) -> bytes:
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._on_consumed is not None:
            self._on_consumed(len(chunk))
        if self._paused and self._buffered <= self._high_water >> 1 and self._gate is not None:
            self._paused = False
            self._gate.resume(self)
        return chunk

    async def _wait(self) -> None:
        callback = self._on_first_wait
        if callback is not None:
            self._on_first_wait = None
            callback()
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        await waiter
