"""Store.watch_prefix never waits forever on aetcd's watcher (docs/architecture.md
§2.2): creating and cancelling a watch both wait on its lock and a bounded request
queue, which a stream frozen by a partition never frees, and an election candidate
cancels a watch every TTL after its own deadline fired (found reading aetcd while
chasing tests/hosts/ faults 2-3; not seen to hang there). Fakes of the aetcd client
stand for the wedged watcher."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mesh import store as store_module
from mesh.store import Store

FOREVER = 3600


class WedgedWatch:
    """A watch on a frozen stream: no event ever, and a cancel that never returns."""

    def __init__(self) -> None:
        self.cancel_called = False

    def __aiter__(self) -> WedgedWatch:
        return self

    async def __anext__(self) -> Any:
        await asyncio.sleep(FOREVER)

    async def cancel(self) -> None:
        self.cancel_called = True
        await asyncio.sleep(FOREVER)


class Event:
    def __init__(self, key: bytes, rev: int) -> None:
        self.kind = "PUT"
        self.kv = type(
            "KV", (), {"key": key, "value": b"v", "mod_revision": rev, "create_revision": rev,
                       "lease": 0},
        )()  # fmt: skip


class OneEventWatch:
    def __init__(self) -> None:
        self.sent = False

    def __aiter__(self) -> OneEventWatch:
        return self

    async def __anext__(self) -> Any:
        if not self.sent:
            self.sent = True
            return Event(b"/p/a", 7)
        await asyncio.sleep(FOREVER)

    async def cancel(self) -> None:
        return None


class FakeClient:
    def __init__(self, watch: Any = None, create_hangs: bool = False) -> None:
        self.watch = watch
        self.create_hangs = create_hangs
        self.close_called = False

    async def watch_prefix(self, _key: bytes, start_revision: int) -> Any:
        if self.create_hangs:
            await asyncio.sleep(FOREVER)
        return self.watch

    async def close(self) -> None:
        self.close_called = True
        await asyncio.sleep(FOREVER)  # the same wedged watcher: close hangs too


@pytest.fixture(autouse=True)
def short_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "WATCH_CANCEL_S", 0.1)
    monkeypatch.setattr(store_module, "CLIENT_CLOSE_S", 0.1)


def store_with(*clients: FakeClient) -> Store:
    store = Store(["http://10.0.0.1:2379", "http://10.0.0.2:2379"], timeout=0.2)
    queue = list(clients)

    async def connected() -> Any:
        if store._client is None:
            store._client = queue.pop(0)  # type: ignore[assignment]
        return store._client

    store._connected_client = connected  # type: ignore[method-assign]
    return store


async def test_a_cancelled_watch_whose_cleanup_hangs_returns_and_gives_the_client_up() -> None:
    watch = WedgedWatch()
    client = FakeClient(watch)
    store = store_with(client)

    async def watch_until_cancelled() -> None:
        async for _ev in store.watch_prefix("/p/", 1):
            pass

    task = asyncio.create_task(watch_until_cancelled())
    await asyncio.sleep(0.05)
    task.cancel()  # the caller's deadline (an election's wait for a vacancy)
    done, _ = await asyncio.wait({task}, timeout=2)
    assert task in done, "the watch's cleanup still waits on the wedged watcher"
    assert watch.cancel_called and client.close_called
    assert store._client is None, "the wedged client must not serve the next call"


async def test_a_watch_whose_creation_hangs_moves_to_another_client() -> None:
    wedged = FakeClient(create_hangs=True)
    working = FakeClient(OneEventWatch())
    store = store_with(wedged, working)

    async def first_event() -> Any:
        async for ev in store.watch_prefix("/p/", 1):
            return ev

    ev = await asyncio.wait_for(first_event(), timeout=5)
    assert (ev.key, ev.revision) == ("/p/a", 7)
    assert wedged.close_called
