"""A foreground `meshctl up` that never leaks its cluster: whatever ends it (Ctrl-C,
SIGTERM, SIGHUP from a closed terminal) stops what it started, and output that can no
longer be written (the reader of a pipe gone, the terminal closed) never skips a stop.

`make demo 2>&1 | tee demo.log` then Ctrl-C kills `tee` too: the next line meshctl
writes fails with EPIPE. Every process the cluster runs leads its own session, so
nothing but meshctl itself can stop them; meshctl must therefore keep going without
its output rather than stop at the first write that fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

# what ends a foreground cluster: Ctrl-C, `kill`, the terminal closing
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequested(BaseException):
    """A stop signal arrived while the cluster was starting: unwinds the start-up
    (a BaseException, as KeyboardInterrupt, so that start-up cleanup runs)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP, turned into one request to stop.

    While `raising` (the cluster is starting), the first signal raises StopRequested in
    the main thread, so the start-up unwinds and stops what it started; afterwards a
    signal only sets `requested`, which the foreground loop waits on. Later signals
    never interrupt the stop itself."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.raising = True
        self.signum = 0
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        first = not self.requested.is_set()
        self.requested.set()
        self.signum = self.signum or signum
        if first and self.raising:
            raise StopRequested(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for stopper, previous in self._previous.items():
                signal.signal(stopper, previous)


def silence_output() -> None:
    """Send stdout and stderr to /dev/null from now on (their reader is gone): later
    writes, and the interpreter's final flush, succeed without anyone reading them."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)


def tolerant(write: Callable[[str], None]) -> Callable[[str], None]:
    """`write`, except that output failing (EPIPE, EIO from a closed terminal) silences
    the output instead of raising: what comes after the message still runs."""

    def write_or_drop(message: str) -> None:
        try:
            write(message)
        except (OSError, ValueError):
            silence_output()

    return write_or_drop


def run_tolerant(fn: Callable[[], object]) -> None:
    """Run `fn` (which prints); if printing fails, silence the output and carry on."""
    try:
        fn()
    except (OSError, ValueError):
        silence_output()
