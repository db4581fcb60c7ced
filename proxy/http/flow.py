"""Flow control for one transport: who paused reading, and waiting for writability."""

from __future__ import annotations

import asyncio


class ReadGate:
    """Keeps a transport's reading paused while any owner asks for it.

    Several parties pause one socket for their own reasons (a full body buffer, a deep
    pipeline, a tunnel peer that cannot take more); reading resumes only when all of
    them have released it.
    """

    __slots__ = ("_owners", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._owners: set[object] = set()

    @property
    def paused(self) -> bool:
        return bool(self._owners)

    def pause(self, owner: object) -> None:
        if not self._owners:
            self._transport.pause_reading()
        self._owners.add(owner)

    def resume(self, owner: object) -> None:
        if owner in self._owners:
            self._owners.discard(owner)
            if not self._owners and not self._transport.is_closing():
                self._transport.resume_reading()

    def release_all(self) -> None:
        """Drop every pause, e.g. to read and discard bytes before a graceful close."""
        if self._owners:
            self._owners.clear()
            if not self._transport.is_closing():
                self._transport.resume_reading()


class WriteGate:
    """Mirrors the protocol's pause_writing/resume_writing for writers that must wait.

    `peak` records the transport's buffered bytes each time it crosses the high-water
    mark: the largest write buffer this connection ever held.
    """

    __slots__ = ("_error", "_waiter", "paused", "peak")

    def __init__(self) -> None:
        self.paused = False
        self.peak = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    def pause(self, buffered: int) -> None:
        self.paused = True
        if buffered > self.peak:
            self.peak = buffered

    def resume(self) -> None:
        self.paused = False
        self.wake()

    def wake(self) -> None:
        """Release a waiting writer early (it re-checks why it was waiting)."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        """The transport is gone: every present and future wait raises `error`."""
        self._error = error
        self.paused = True  # so writers checking `paused` come to wait() and get the error
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(error)
                # The writer may have been cancelled meanwhile; avoid "never retrieved".
                waiter.exception()

    async def wait(self) -> None:
        """Return once writing may continue (or `wake` was called)."""
        if self._error is not None:
            raise self._error
        if not self.paused:
            return
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
        await waiter
