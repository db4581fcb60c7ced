"""Traffic mirroring (a rule's `mirror`): a copy of the request to another destination,
fire and forget.

The copy leaves with its authority suffixed `-shadow` (`reviews-shadow:9080`), goes
to an endpoint of the mirror's cluster through the one upstream path
(`proxy.cluster_send`: its circuit breaker counts it, its balancer and outlier
detector see it, as Envoy's shadow requests are its cluster's), and its response is
read and discarded. The primary request never waits for it and never
sees how it went: the copy runs in its own task, owned by `Mirrors`, bounded in time
(the route's `timeout`, else `MIRROR_TIMEOUT_S`) and in number (`MAX_IN_FLIGHT`;
beyond, copies are dropped and counted). Only bodies the primary could hold in
memory (`proxy.attempts.buffered_body`: up to 64 KiB) are mirrored; a request whose
body streams is not copied (counted as `skipped_body`), because copying would mean
either buffering it all or holding the primary back to the mirror's pace.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from mesh import errors
from mesh.hosts import ServiceRef
from mesh.logs import get_logger
from proxy import cluster_send
from proxy.destinations import DestinationCache
from proxy.forward import PoolSet
from proxy.http import UpstreamError
from proxy.resilience import mirror_authority

log = get_logger("proxy.mirroring")

# Envoy's default route timeout: a copy never lives longer without a route timeout
MIRROR_TIMEOUT_S = 15.0
MAX_IN_FLIGHT = 256


class Mirrors:
    """The mirror copies this proxy has in flight, and what became of them."""

    def __init__(
        self,
        cache: DestinationCache,
        pools: PoolSet,
        rand: random.Random,
        max_in_flight: int = MAX_IN_FLIGHT,
    ):
        self.cache = cache
        self.pools = pools
        self.rand = rand
        self.max_in_flight = max_in_flight
        self.tasks: set[asyncio.Task[None]] = set()
        self.counters = {
            "sent": 0,  # a response came back (and was discarded)
            "failed": 0,  # no response: no endpoint, connect failure, reset, timeout
            "dropped": 0,  # too many copies in flight, or the mirror cluster overflowed
            "skipped_body": 0,  # the request body streams: not copied
        }

    def send(
        self,
        ref: ServiceRef,
        subset: str,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        authority: str,
        body: bytes,
        timeout_s: float,
    ) -> None:
        """Start a copy of a request (its outgoing `headers`, `authority` before the
        shadow suffix) to the mirror destination; returns at once."""
        if len(self.tasks) >= self.max_in_flight:
            self.counters["dropped"] += 1
            return
        shadow = mirror_authority(authority)
        copy = [(n, v) for n, v in headers if n != "host"]
        copy.append(("host", shadow))
        task = asyncio.create_task(
            self._send(ref, subset, method, path, copy, body, timeout_s),
            name=f"proxy:mirror:{ref}",
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def skipped_body(self) -> None:
        self.counters["skipped_body"] += 1

    def close(self) -> None:
        """Cancel every copy in flight (shutdown)."""
        for task in list(self.tasks):
            task.cancel()

    def snapshot(self) -> dict[str, Any]:
        return {"in_flight": len(self.tasks), **self.counters}

    async def _send(
        self,
        ref: ServiceRef,
        subset: str,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        timeout_s: float,
    ) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                outcome = await self._exchange(ref, subset, method, path, headers, body)
        except TimeoutError:
            outcome = "failed"
        except (UpstreamError, errors.MeshError, OSError) as e:
            log.debug("mirror.failed", destination=str(ref), error=str(e))
            outcome = "failed"
        self.counters[outcome] += 1

    async def _exchange(
        self,
        ref: ServiceRef,
        subset: str,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> str:
        dest = await self.cache.get(ref)
        cluster = dest.cluster(subset, self.rand)
        if cluster is None:
            return "failed"
        breaker = cluster.breaker
        if not breaker.try_acquire_request():
            return "dropped"
        try:
            attempt = await cluster_send.send(
                cluster, self.pools, cluster_send.Request(method, path, headers, body)
            )
            if attempt is None or attempt.response is None:
                return "failed"  # no endpoint, or no response (`attempt.failure`)
            resp = attempt.response
            try:
                async for _ in resp.body:
                    pass
            finally:
                resp.close()
                attempt.finished()
        finally:
            breaker.release_request()
        return "sent"
