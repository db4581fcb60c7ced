"""The stop request every long-running process of the mesh shares (control-plane
services, sidecar agents): SIGTERM/SIGINT or `request()` set it once, and any
start-up step can be raced against it, so a stop during start-up unwinds what has
started, in reverse order, instead of each step writing its own race."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class StopRequested(Exception):
    """A stop came before the awaited start-up step finished (the step is cancelled)."""


class StopSignal:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def install(self) -> None:
        """SIGTERM and SIGINT request a stop (where the loop supports signal handlers)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request)

    def request(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    async def unless_stopped(self, work: Awaitable[T]) -> T:
        """`work`'s result, or StopRequested (and `work` cancelled) when a stop comes
        first. An exception of `work` propagates."""
        task = asyncio.ensure_future(work)
        if self._event.is_set():
            task.cancel()
            raise StopRequested
        stop_wait = asyncio.create_task(self._event.wait(), name="lifecycle:stop-wait")
        try:
            await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise StopRequested
        return task.result()
