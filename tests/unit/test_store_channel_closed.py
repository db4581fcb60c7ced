"""A call cut by another caller's failover is a StoreError, not a cancellation
(docs/architecture.md §2.2): grpc.aio raises CancelledError in every call in flight on
a channel being closed, and one Store's client is shared. Let through, it ended a
registry replica's election loop silently (tests/hosts/ faults 2-3: no registry
leader for minutes). A real cancellation of the caller still cancels. Fakes of the
aetcd client stand for a call on a closed channel."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mesh import errors
from mesh.election import Election
from mesh.store import Store

FOREVER = 3600


class ClosedUnderneath:
    """Every call ends as grpc.aio ends a call whose channel another task closed."""

    def __init__(self) -> None:
        self.calls = 0

    async def get(self, _key: bytes) -> Any:
        self.calls += 1
        raise asyncio.CancelledError

    async def lease(self, _ttl: int) -> Any:
        self.calls += 1
        raise asyncio.CancelledError

    async def close(self) -> None:
        return None


class Slow:
    async def get(self, _key: bytes) -> Any:
        await asyncio.sleep(FOREVER)

    async def close(self) -> None:
        return None


def store_on(*clients: Any) -> Store:
    store = Store(["http://10.0.0.1:2379", "http://10.0.0.2:2379"], timeout=0.2)
    queue = list(clients)

    async def connected() -> Any:
        if store._client is None:
            store._client = queue.pop(0)
        return store._client

    store._connected_client = connected  # type: ignore[method-assign]
    return store


async def test_a_call_whose_channel_was_closed_under_it_is_a_store_error() -> None:
    first, second = ClosedUnderneath(), ClosedUnderneath()
    store = store_on(first, second)
    with pytest.raises(errors.StoreError, match="connection was closed"):
        await store.get("/mesh/x")
    # retried once on the next client, like a connection failure
    assert (first.calls, second.calls) == (1, 1)


async def test_cancelling_the_caller_still_cancels() -> None:
    store = store_on(Slow())
    task = asyncio.create_task(store.get("/mesh/x"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_candidate_whose_call_is_cut_by_a_failover_keeps_campaigning() -> None:
    """The election loop survives it (waits and campaigns again) instead of ending."""
    store = store_on(*[ClosedUnderneath() for _ in range(100)])
    election = Election(store, "registry", "cp1-registry", ttl=5)
    task = asyncio.create_task(election.campaign())
    await asyncio.sleep(0.5)
    assert not task.done(), task  # still campaigning (etcd "unreachable": waited out)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
