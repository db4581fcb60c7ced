"""A DestinationRule's `connectionPool` on the HTTP/2 upstream pool: which connection
takes the next stream (`proxy.http.h2.streams`, pure), and the pool's admission with
the cluster's circuit breaker (connections, pending requests, overflow) over fake
connections: no sockets."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from mesh.compiled import ConnectionPool
from proxy.http import Limits, UpstreamConnectError
from proxy.http.h2.client import H2UpstreamPool
from proxy.http.h2.streams import StreamLimits, exhausted, pick_connection, takes_another_stream
from proxy.http.pool import PoolOverflowError
from proxy.resilience import CircuitBreaker


@dataclass
class Load:
    has_room: bool = True
    active_streams: int = 0
    streams_started: int = 0


@pytest.mark.parametrize(
    ("load", "limits", "takes"),
    [
        (Load(active_streams=99), StreamLimits(), True),
        (Load(has_room=False), StreamLimits(), False),  # the peer's SETTINGS, or GOAWAY
        (Load(active_streams=1), StreamLimits(max_concurrent_streams=2), True),
        (Load(active_streams=2), StreamLimits(max_concurrent_streams=2), False),
        (Load(streams_started=2), StreamLimits(max_requests_per_connection=3), True),
        (Load(streams_started=3), StreamLimits(max_requests_per_connection=3), False),
    ],
)
def test_a_connection_takes_another_stream(load: Load, limits: StreamLimits, takes: bool) -> None:
    assert takes_another_stream(load, limits) is takes


def test_the_oldest_connection_with_room_is_picked() -> None:
    full, spare, other = Load(active_streams=2), Load(active_streams=1), Load()
    limits = StreamLimits(max_concurrent_streams=2)
    assert pick_connection([full, spare, other], limits) is spare
    assert pick_connection([full], limits) is None
    assert exhausted(Load(streams_started=1), StreamLimits(max_requests_per_connection=1))
    assert not exhausted(Load(streams_started=10**6), StreamLimits())


# ---------------------------------------------------------------- the pool's admission


class FakeConnection:
    """Streams that stay open until the test ends them."""

    def __init__(self, pool: FakePool, name: str) -> None:
        self.pool, self.name = pool, name
        self.streams: list[str] = []
        self.streams_started = 0
        self.closed = False
        self.context = None

    @property
    def has_room(self) -> bool:
        return not self.closed

    @property
    def usable(self) -> bool:
        return not self.closed

    @property
    def active_streams(self) -> int:
        return len(self.streams)

    @property
    def idle(self) -> bool:
        return not self.streams

    async def request(self, method: str, scheme: str, authority: str, path: str, *_: Any) -> str:
        self.streams_started += 1
        self.streams.append(path)
        return f"{self.name}{path}"

    def end_stream(self) -> None:
        self.streams.pop(0)
        self.pool._stream_done(self)  # type: ignore[arg-type]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool._lost(self)  # type: ignore[arg-type]


class FakePool(H2UpstreamPool):
    async def _open(self, context: Any) -> Any:
        await asyncio.sleep(0)  # connecting takes a turn of the loop
        connection = FakeConnection(self, f"c{self.opened}")
        self.opened += 1
        self._connections.append(connection)  # type: ignore[arg-type]
        return connection

    def connection(self, index: int) -> FakeConnection:
        return self._connections[index]  # type: ignore[return-value]


def pool_with(breaker: CircuitBreaker | None, **settings: int) -> FakePool:
    pool = FakePool("10.0.0.1", 15006, limits=Limits())
    pool.configure(connection_limit=breaker, **settings)
    return pool


async def call(pool: FakePool, path: str) -> str:
    return await pool.request("POST", path, [("content-type", "application/grpc")])  # type: ignore[return-value]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_without_limits_every_stream_shares_one_connection() -> None:
    pool = pool_with(None)
    got = await asyncio.gather(*(call(pool, f"/{i}") for i in range(20)))
    assert got == [f"c0/{i}" for i in range(20)] and pool.opened == 1


async def test_full_connections_make_requests_pending_then_overflow_uo() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=1, http1_max_pending_requests=1))
    pool = pool_with(breaker, max_concurrent_streams=2)
    assert [await call(pool, "/a"), await call(pool, "/b")] == ["c0/a", "c0/b"]
    waiting = asyncio.ensure_future(call(pool, "/c"))
    await settle()
    assert not waiting.done() and pool.pending == 1 and pool.opened == 1
    with pytest.raises(PoolOverflowError, match="too many requests waiting"):
        await call(pool, "/d")
    assert breaker.overflows["max_pending_requests"] == 1
    # a stream ends: the pending request takes its place on the same connection
    pool.connection(0).end_stream()
    assert await waiting == "c0/c"
    assert pool.pending == 0 and pool.opened == 1


async def test_a_newcomer_queues_behind_pending_requests() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=1, http1_max_pending_requests=5))
    pool = pool_with(breaker, max_concurrent_streams=1)
    assert await call(pool, "/a") == "c0/a"
    first = asyncio.ensure_future(call(pool, "/first"))
    await settle()
    newcomer = asyncio.ensure_future(call(pool, "/newcomer"))  # runs before `first` wakes
    pool.connection(0).end_stream()  # room for `first`
    await settle()
    assert first.done() and await first == "c0/first"
    assert not newcomer.done() and pool.pending == 1
    pool.connection(0).end_stream()
    assert await newcomer == "c0/newcomer"


async def test_more_connections_while_the_cluster_has_slots() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=2, http1_max_pending_requests=1))
    pool = pool_with(breaker, max_concurrent_streams=1)
    got = [await call(pool, "/a"), await call(pool, "/b")]
    assert got == ["c0/a", "c1/b"]
    waiting = asyncio.ensure_future(call(pool, "/c"))
    await settle()
    assert pool.pending == 1
    # a connection that goes away frees its slot: the pending request opens another
    pool.connection(0).close()
    assert await waiting == "c2/c"


async def test_max_requests_per_connection_retires_a_connection() -> None:
    pool = pool_with(CircuitBreaker(ConnectionPool()), max_requests_per_connection=2)
    got = [await call(pool, f"/{i}") for i in range(3)]
    assert got == ["c0/0", "c0/1", "c1/2"]
    first = pool.connection(0)
    first.end_stream()
    assert not first.closed  # still carrying a stream
    first.end_stream()
    assert first.closed  # retired once its last stream ended
    assert await call(pool, "/3") == "c1/3"


async def test_the_first_connection_of_an_endpoint_is_always_allowed() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=1, http1_max_pending_requests=1))
    assert breaker.try_acquire_connection()  # another endpoint's pool holds the only slot
    pool = pool_with(breaker)
    assert await call(pool, "/a") == "c0/a"


async def test_close_fails_pending_requests() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=1, http1_max_pending_requests=1))
    pool = pool_with(breaker, max_concurrent_streams=1)
    await call(pool, "/a")
    waiting = asyncio.ensure_future(call(pool, "/b"))
    await settle()
    pool.close()
    with pytest.raises(UpstreamConnectError, match="closed"):
        await waiting
