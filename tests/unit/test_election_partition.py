"""Leader election when etcd cannot be reached (found by the multi-host partition
suite, tests/hosts/): a leader cut off from etcd must stop acting before its lease can
expire even when its client would wait longer than that, and a candidate must survive
etcd being unreachable instead of crashing its replica."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from mesh import election as election_module
from mesh import errors
from mesh.election import Election
from mesh.store import KV, TxnResult


class PartitionedStore:
    """A store fake: leases and one leader key; `hang` makes every call wait forever
    (a partition: packets dropped, no answer), `fail` makes the next N calls raise
    StoreError (etcd answering "context deadline exceeded")."""

    def __init__(self) -> None:
        self.hang = False
        self.fail = 0
        self.revision = 10
        self.held: KV | None = None
        self.leases: set[int] = set()

    def key(self, *parts: str) -> str:
        return "/mesh/" + "/".join(parts)

    async def _io(self) -> None:
        if self.hang:
            await asyncio.Event().wait()
        if self.fail:
            self.fail -= 1
            raise errors.StoreError("etcd request failed: context deadline exceeded")

    async def grant_lease(self, ttl: int) -> int:
        await self._io()
        lease = len(self.leases) + 1
        self.leases.add(lease)
        return lease

    async def keepalive(self, lease: int) -> int:
        await self._io()
        if lease not in self.leases:
            raise errors.NotFound("lease expired")
        return 5

    async def revoke_lease(self, lease: int) -> None:
        self.leases.discard(lease)

    async def txn(self, compare: object, success: list[object], failure: object) -> TxnResult:
        await self._io()
        self.revision += 1
        if self.held is None:
            put = success[0]
            self.held = KV(put.key, put.value, self.revision, self.revision, 1, put.lease)  # type: ignore[attr-defined]
            return TxnResult(True, self.revision)
        return TxnResult(False, self.revision, [[self.held]])

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[object]:
        await asyncio.Event().wait()  # no event: the candidate re-checks after its TTL
        yield None

    async def get(self, key: str) -> KV | None:
        await self._io()
        return self.held


async def test_a_leader_whose_etcd_stops_answering_steps_down_before_its_lease_expires() -> None:
    store = PartitionedStore()
    election = Election(store, "config", "cp1-config", ttl=1)  # type: ignore[arg-type]
    await election.campaign()
    assert election.is_leader
    store.hang = True  # the old hold() waited in keepalive forever, still "leader"
    await asyncio.wait_for(election.hold(), timeout=10)
    assert not election.is_leader


async def test_a_candidate_survives_etcd_failing_and_wins_once_it_answers() -> None:
    store = PartitionedStore()
    store.fail = 3  # grant_lease / txn fail: the old campaign() raised, killing the replica
    election = Election(store, "registry", "cp1-registry", ttl=1)  # type: ignore[arg-type]
    token = await asyncio.wait_for(election.campaign(), timeout=20)
    assert election.is_leader and token == store.held.create_revision  # type: ignore[union-attr]


async def test_a_waiting_candidate_survives_its_keepalive_failing() -> None:
    store = PartitionedStore()
    leader = Election(store, "ca", "cp2-ca", ttl=1)  # type: ignore[arg-type]
    await leader.campaign()
    follower = Election(store, "ca", "cp1-ca", ttl=1)  # type: ignore[arg-type]
    task = asyncio.create_task(follower.campaign())
    await asyncio.sleep(0.05)
    store.fail = 2  # the keepalive while waiting for vacancy fails
    await asyncio.sleep(1.5)
    assert not task.done(), task  # still campaigning, not crashed
    store.held = None  # the leader's key is gone: the follower wins
    await asyncio.wait_for(task, timeout=20)
    assert follower.is_leader


@pytest.mark.parametrize(
    ("last", "ttl", "interval", "expected"),
    [(100.0, 5, 5 / 3, 100 + 5 - 5 / 3), (0.0, 1, 0.34, 0.66)],
)
def test_step_down_comes_one_renewal_interval_before_the_lease_can_expire(
    last: float, ttl: int, interval: float, expected: float
) -> None:
    assert election_module.step_down_at(last, ttl, interval) == pytest.approx(expected)


def test_retry_delay_grows_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    delays = [election_module.retry_delay(n, rng) for n in range(1, 12)]
    assert all(0 < d <= 2.0 for d in delays)
    assert election_module.retry_delay(1, random.Random(2)) < election_module.retry_delay(
        8, random.Random(2)
    )
