"""Leader election on etcd with fencing.

A candidate holds `/mesh/election/<service>` under a lease it keeps alive. The
leader key's create revision is the fencing token: every write a leader makes is a
transaction that also checks that the key still has that create revision, so a
deposed leader (paused past its lease, partitioned) cannot overwrite what the new
leader wrote, whatever it believes about itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Sequence

from mesh import errors
from mesh.logs import get_logger
from mesh.store import Compare, Get, Op, Put, Store, TxnResult

log = get_logger("election")

# a candidate that cannot reach etcd tries again after this (doubling, jittered, capped)
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 2.0


def step_down_at(last_renewed: float, ttl: float, interval: float) -> float:
    """When a leader whose lease was last renewed at `last_renewed` must stop acting:
    etcd expires the lease at most `ttl` after it saw that renewal, which was before we
    did, so one renewal interval earlier leaves a margin."""
    return last_renewed + ttl - interval


def retry_delay(failures: int, rng: random.Random | None = None) -> float:
    """Backoff before the next attempt after `failures` consecutive ones (capped, with
    jitter so that replicas cut off together do not retry in step)."""
    base = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** max(0, failures - 1))
    return base * (0.5 + (rng or random).random() / 2)


class Election:
    def __init__(self, store: Store, name: str, candidate: str, *, ttl: int = 5):
        self.store = store
        self.name = name
        self.candidate = candidate
        self.ttl = ttl
        self.key = store.key("election", name)
        self.token: int | None = None  # fencing token while leader
        self._lease: int = 0

    @property
    def is_leader(self) -> bool:
        return self.token is not None

    async def leader(self) -> str | None:
        """The current leader's candidate id, or None when there is none."""
        kv = await self.store.get(self.key)
        return kv.value.decode() if kv else None

    async def campaign(self) -> int:
        """Block until this candidate leads; return the fencing token. etcd being
        unreachable (a partition, a lost quorum) is waited out, not raised: a replica
        must survive it and campaign again once etcd answers (docs/architecture.md §2)."""
        failures = 0
        while True:
            try:
                return await self._campaign_once()
            except errors.StoreError as e:
                failures += 1
                self._lease = 0  # it may expire meanwhile: take a new one
                delay = retry_delay(failures)
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "election.store_unavailable",
                        election=self.name,
                        candidate=self.candidate,
                        failures=failures,
                        error=str(e),
                    )
                await asyncio.sleep(delay)

    async def _campaign_once(self) -> int:
        while True:
            if not self._lease:
                self._lease = await self.store.grant_lease(self.ttl)
            result = await self.store.txn(
                [Compare(self.key, "create", "==", 0)],
                [Put(self.key, self.candidate.encode(), lease=self._lease)],
                [Get(self.key)],
            )
            if result.succeeded:
                self.token = result.revision
                log.info(
                    "election.won", election=self.name, candidate=self.candidate, token=self.token
                )
                return self.token
            current = result.gets[0][0] if result.gets and result.gets[0] else None
            if current is not None and current.lease == self._lease:
                # our own key from an earlier term that survived (e.g. after a reconnect)
                self.token = current.create_revision
                return self.token
            await self._wait_for_vacancy(result.revision)

    async def _wait_for_vacancy(self, revision: int) -> None:
        """Return when the leader key is deleted (or after a while, to re-check anyway),
        keeping our own lease alive meanwhile so it is ready the moment we win."""

        async def watch_delete() -> None:
            async for ev in self.store.watch_prefix(self.key, revision + 1):
                if ev.key == self.key and ev.kind == "delete":
                    return

        try:
            async with asyncio.timeout(self.ttl):
                await watch_delete()
        except TimeoutError:
            pass
        try:
            await self.store.keepalive(self._lease)
        except errors.NotFound:
            self._lease = 0

    async def hold(self) -> None:
        """Keep the lease alive while leader; return when leadership is lost, or when
        the lease may expire before we could renew it: each renewal is given only the
        time left until then, so a leader cut off from etcd (whose client may wait
        longer than the lease lives) stops acting before another replica can win."""
        interval = max(0.2, self.ttl / 3)
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while self.token is not None:
            await asyncio.sleep(interval)
            left = step_down_at(last_ok, self.ttl, interval) - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError
                async with asyncio.timeout(left):
                    await self.store.keepalive(self._lease)
                last_ok = loop.time()
            except errors.NotFound:
                break
            except (errors.StoreError, TimeoutError) as e:
                # etcd unreachable: our lease may expire; stop acting as leader before it can
                if loop.time() >= step_down_at(last_ok, self.ttl, interval):
                    log.warning(
                        "election.unreachable",
                        election=self.name,
                        error=str(e) or "no answer before the lease could expire",
                    )
                    break
        log.warning("election.lost", election=self.name, candidate=self.candidate, token=self.token)
        self.token = None
        self._lease = 0

    async def resign(self) -> None:
        """Give up leadership (or candidacy) at once, so another replica takes over now."""
        token, lease = self.token, self._lease
        self.token = None
        self._lease = 0
        if lease:
            with contextlib.suppress(errors.MeshError):
                await self.store.revoke_lease(lease)
        if token is not None:
            log.info("election.resigned", election=self.name, candidate=self.candidate)

    async def guarded_txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """A transaction that applies only while we still hold the leader key we won.

        Raises FencingError when leadership was lost (the new leader's writes stand)."""
        token = self.token
        if token is None:
            raise errors.FencingError(f"not the leader of {self.name}")
        fence = Compare(self.key, "create", "==", token)
        if failure:
            # a caller-provided failure branch must not hide a fencing failure
            check = await self.store.txn([fence], [], [])
            if not check.succeeded:
                raise errors.FencingError(f"leadership of {self.name} was lost (token {token})")
        result = await self.store.txn([fence, *compare], success, failure)
        if not result.succeeded and not failure:
            held = await self.store.get(self.key)
            if held is None or held.create_revision != token:
                self.token = None
                raise errors.FencingError(f"leadership of {self.name} was lost (token {token})")
        return result

    async def lead(self, work: Callable[[int], Awaitable[None]]) -> None:
        """Forever: campaign, run `work(token)` while leader, stop it when leadership is
        lost, campaign again. If the work fails, resign so another replica takes over.
        Cancelling this resigns."""
        try:
            while True:
                token = await self.campaign()
                async with asyncio.TaskGroup() as tg:
                    holder = tg.create_task(self.hold(), name=f"election:{self.name}:hold")
                    worker = tg.create_task(
                        self._guard(work, token), name=f"election:{self.name}:work"
                    )
                    await asyncio.wait({holder, worker}, return_when=asyncio.FIRST_COMPLETED)
                    holder.cancel()
                    worker.cancel()
                if self.token is not None:
                    # the work ended while we still led: hand over and back off a little
                    await self.resign()
                    await asyncio.sleep(self.ttl / 2)
        finally:
            await asyncio.shield(self.resign())

    async def _guard(self, work: Callable[[int], Awaitable[None]], token: int) -> None:
        try:
            await work(token)
        except errors.FencingError as e:
            log.warning("election.fenced", election=self.name, error=str(e))
        except Exception:
            log.exception("election.work_failed", election=self.name)
