"""The shared stop request: a start-up step raced against a stop."""

from __future__ import annotations

import asyncio

import pytest

from mesh.lifecycle import StopRequested, StopSignal


async def test_work_that_finishes_first_gives_its_result() -> None:
    stop = StopSignal()

    async def work() -> int:
        return 7

    assert await stop.unless_stopped(work()) == 7


async def test_a_stop_during_the_work_cancels_it_and_raises() -> None:
    stop = StopSignal()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def stop_when_started() -> None:
        await started.wait()
        stop.request()

    stopper = asyncio.create_task(stop_when_started())
    with pytest.raises(StopRequested):
        await stop.unless_stopped(forever())
    await stopper
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_a_stop_requested_before_the_work_never_runs_it() -> None:
    stop = StopSignal()
    stop.request()
    ran = False

    async def work() -> None:
        nonlocal ran
        ran = True

    with pytest.raises(StopRequested):
        await stop.unless_stopped(work())
    await asyncio.sleep(0)
    assert not ran and stop.is_set()


async def test_an_error_of_the_work_propagates() -> None:
    stop = StopSignal()

    async def failing() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        await stop.unless_stopped(failing())
