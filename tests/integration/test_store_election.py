"""etcd access against a real etcd: watch resume across a restart, leases, election fencing."""

from __future__ import annotations

import asyncio

import pytest

from mesh import errors
from mesh.election import Election
from mesh.store import Compare, Put, Store, WatchEvent
from tests.support import eventually


async def test_watch_resumes_after_etcd_restart_without_missing_events(own_etcd) -> None:
    store = Store([own_etcd.url], prefix="/w/")
    writer = Store([own_etcd.url], prefix="/w/")
    start = await store.revision()
    seen: list[WatchEvent] = []

    async def watch() -> None:
        async for ev in store.watch_prefix("/w/k/", start + 1):
            seen.append(ev)

    task = asyncio.create_task(watch())
    for i in range(5):
        await writer.put(f"/w/k/{i}", b"before")
    await eventually(lambda: len(seen) == 5)

    own_etcd.stop()
    await asyncio.sleep(0.5)
    own_etcd.process.start()  # same data dir: the history is kept
    own_etcd.wait_ready()
    # writes made after the restart, and before the watcher reconnects, are all seen
    for i in range(5, 10):
        await writer.put(f"/w/k/{i}", b"after")
    await writer.delete("/w/k/0")
    await eventually(lambda: len(seen) == 11, timeout=20)
    assert [e.key for e in seen[:10]] == [f"/w/k/{i}" for i in range(10)]
    assert seen[10].kind == "delete" and seen[10].key == "/w/k/0"
    revisions = [e.revision for e in seen]
    assert revisions == sorted(set(revisions)), "no event delivered twice, in order"
    task.cancel()
    await store.close()
    await writer.close()


async def test_multi_key_transaction_delivered_once(etcd_server, prefix) -> None:
    store = Store([etcd_server.url], prefix=f"/{prefix}/")
    start = await store.revision()
    result = await store.txn([], [Put(store.key("a"), b"1"), Put(store.key("b"), b"2")])
    assert result.succeeded
    seen: list[WatchEvent] = []

    async def watch() -> None:
        async for ev in store.watch_prefix(store.prefix, start + 1):
            seen.append(ev)

    task = asyncio.create_task(watch())
    await eventually(lambda: len(seen) == 2)
    assert {e.key for e in seen} == {store.key("a"), store.key("b")}
    assert seen[0].revision == seen[1].revision == result.revision
    task.cancel()
    await store.close()


async def test_lease_expiry_deletes_keys(etcd_server, prefix) -> None:
    store = Store([etcd_server.url], prefix=f"/{prefix}/")
    lease = await store.grant_lease(1)
    await store.put(store.key("leased"), b"x", lease=lease)
    assert await store.get(store.key("leased")) is not None
    await eventually(lambda: _absent(store, store.key("leased")), timeout=5)
    with pytest.raises(errors.NotFound):
        await store.keepalive(lease)
    await store.close()


async def _absent(store: Store, key: str) -> bool:
    return await store.get(key) is None


async def test_election_single_leader_and_takeover(etcd_server, prefix) -> None:
    stores = [Store([etcd_server.url], prefix=f"/{prefix}/") for _ in range(3)]
    elections = [Election(s, "svc", f"cand-{i}", ttl=1) for i, s in enumerate(stores)]
    leading: list[str] = []

    async def work(e: Election) -> None:
        leading.append(e.candidate)
        await asyncio.Event().wait()

    tasks = [asyncio.create_task(e.lead(lambda _t, e=e: work(e))) for e in elections]
    await eventually(lambda: len(leading) == 1)
    first = leading[0]
    assert await elections[0].leader() == first
    assert sum(e.is_leader for e in elections) == 1
    # the leader resigns (as on SIGTERM): another takes over at once
    idx = int(first.split("-")[1])
    tasks[idx].cancel()
    await eventually(lambda: len(leading) == 2, timeout=5)
    assert leading[1] != first
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for s in stores:
        await s.close()


async def test_deposed_leader_cannot_overwrite(etcd_server, prefix) -> None:
    a = Election(Store([etcd_server.url], prefix=f"/{prefix}/"), "svc", "a", ttl=1)
    b = Election(Store([etcd_server.url], prefix=f"/{prefix}/"), "svc", "b", ttl=1)
    token_a = await a.campaign()
    key = a.store.key("data")
    await a.guarded_txn([], [Put(key, b"from-a")])
    # a stops keeping its lease alive (paused past its TTL); b wins
    token_b = await asyncio.wait_for(b.campaign(), 10)
    assert token_b > token_a
    await b.guarded_txn([], [Put(key, b"from-b")])
    # a still believes it leads, but its fenced write is refused
    assert a.token == token_a
    with pytest.raises(errors.FencingError):
        await a.guarded_txn([Compare(key, "version", ">", 0)], [Put(key, b"stale-a")])
    kv = await b.store.get(key)
    assert kv is not None and kv.value == b"from-b"
    await a.store.close()
    await b.store.close()
