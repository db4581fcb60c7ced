"""The one upstream path (`proxy.cluster_send`) with an in-memory transport: which
endpoint an attempt goes to, what a failure becomes, and what the cluster's outlier
detector, balancer and counters learn from it. No sockets: the pools answer from a
script (a response status, or the exception the real pool would raise)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, cast

import pytest

from mesh.compiled import LoadBalancer, OutlierDetection, TrafficPolicy
from mesh.hosts import ServiceRef
from mesh.messages import Endpoint
from proxy import cluster_send
from proxy.clusters import Cluster
from proxy.forward import PoolSet
from proxy.http import UpstreamConnectError, UpstreamResetError
from proxy.http.pool import PoolOverflowError
from proxy.resilience import Failure
from proxy.routing import build_balancer

REF = ServiceRef("default", "reviews")
DETECT = OutlierDetection(
    consecutive_5xx_errors=2, interval_ms=1000, base_ejection_time_ms=10_000,
    max_ejection_percent=100,
)  # fmt: skip
REQUEST = cluster_send.Request("GET", "/", [("host", "reviews")], b"")


class ScriptedResponse:
    def __init__(self, status: int) -> None:
        self.status = status
        self.headers: list[tuple[str, str]] = []


class ScriptedPool:
    """Answers each request with the next item of its script."""

    def __init__(self, script: list[int | BaseException | float]) -> None:
        self.script = script
        self.requests = 0

    async def request(self, method: str, path: str, headers: object, body: object) -> Any:
        self.requests += 1
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, float):  # seconds before the answer
            await asyncio.sleep(item)
            return ScriptedResponse(200)
        return ScriptedResponse(item)


class ScriptedPools:
    """A PoolSet of scripted pools, one per endpoint address."""

    def __init__(self, scripts: dict[str, list[int | BaseException | float]]) -> None:
        self.pools = {address: ScriptedPool(script) for address, script in scripts.items()}

    def get(self, address: str, *_: object) -> ScriptedPool:
        return self.pools[address]


def cluster(names: tuple[str, ...] = ("a",), detect: bool = True) -> Cluster:
    eps = [Endpoint(instance=n, address=f"{n}:80") for n in names]
    balancer = build_balancer(eps, LoadBalancer(simple="LEAST_REQUEST"), random.Random(1))
    policy = TrafficPolicy(outlier_detection=DETECT if detect else None)
    return Cluster(REF, "", policy, balancer)


async def send(c: Cluster, pools: ScriptedPools, **kwargs: Any) -> cluster_send.Attempt | None:
    return await cluster_send.send(c, cast(PoolSet, pools), REQUEST, **kwargs)


@pytest.mark.parametrize(
    ("raised", "failure", "flag"),
    [
        (UpstreamConnectError("refused"), Failure.CONNECT_FAILURE, "UF"),
        (UpstreamResetError("closed"), Failure.RESET, "UC"),
    ],
)
async def test_failures_feed_the_outlier_detector(
    raised: BaseException, failure: Failure, flag: str
) -> None:
    c = cluster()
    pools = ScriptedPools({"a:80": [raised, raised]})
    first = await send(c, pools)
    assert first is not None and first.response is None and first.failure is not None
    assert (first.failure.failure, first.failure.flag) == (failure, flag)
    assert first.endpoint.instance == "a"
    await send(c, pools)
    # two local-origin failures count as two 5xx: ejected, and nothing is left
    assert c.ejected(time.monotonic()) == {"a"}
    assert await send(c, pools) is None  # no healthy upstream


async def test_responses_feed_the_outlier_detector_and_the_balancer() -> None:
    c = cluster(("a", "b"))
    pools = ScriptedPools({"a:80": [503, 503], "b:80": [200, 200]})
    attempts = [await send(c, pools, exclude=frozenset({ep})) for ep in ("b", "b")]
    assert [a.response.status for a in attempts if a and a.response] == [503, 503]
    for attempt in attempts:
        assert attempt is not None
        attempt.finished()
    assert "a" in c.ejected(time.monotonic())
    # least-request saw every request start and end
    assert all(n == 0 for n in c.balancer._active.values())  # type: ignore[attr-defined]


async def test_a_pool_overflow_is_counted_and_not_the_endpoints_fault() -> None:
    c = cluster()
    pools = ScriptedPools({"a:80": [PoolOverflowError("queue full")] * 3})
    for _ in range(3):
        attempt = await send(c, pools)
        assert attempt is not None and attempt.failure is not None
        assert (attempt.failure.flag, attempt.failure.status) == ("UO", 503)
    assert c.counters["overflows"] == 3
    assert c.ejected(time.monotonic()) == frozenset()


async def test_the_attempts_timeout_is_a_UT_failure() -> None:
    c = cluster(detect=False)
    pools = ScriptedPools({"a:80": [5.0]})
    attempt = await send(c, pools, timeout_ms=10)
    assert attempt is not None and attempt.failure is not None
    assert (attempt.failure.failure, attempt.failure.flag, attempt.failure.status) == (
        Failure.TIMEOUT,
        "UT",
        504,
    )


async def test_the_chosen_endpoint_is_announced_before_the_request() -> None:
    c = cluster(("a",), detect=False)
    pools = ScriptedPools({"a:80": [200]})
    seen: list[tuple[str, int]] = []
    attempt = await send(
        c, pools, on_endpoint=lambda ep: seen.append((ep.instance, pools.pools["a:80"].requests))
    )
    assert attempt is not None and attempt.response is not None
    assert seen == [("a", 0)]


async def test_connect_tries_other_endpoints_and_feeds_the_detector() -> None:
    c = cluster(("a", "b"))
    opened: list[str] = []

    async def open_endpoint(endpoint: Endpoint) -> bool:
        opened.append(endpoint.instance)
        return endpoint.instance == "b"

    endpoints = cluster_send.ClusterEndpoints(c)
    chosen, tried = await cluster_send.connect(endpoints, open_endpoint, attempts=3)
    assert chosen is not None and chosen.instance == "b"
    assert tried == set(opened) and opened[-1] == "b" and len(opened) <= 2
    # a connect failure is the endpoint's: "a" failing twice is ejected
    while opened.count("a") < 2:
        await cluster_send.connect(endpoints, open_endpoint, attempts=1)
    assert c.ejected(time.monotonic()) == {"a"}


async def test_connect_gives_up_after_its_attempts() -> None:
    opened: list[str] = []

    async def refused(endpoint: Endpoint) -> bool:
        opened.append(endpoint.instance)
        return False

    endpoints = cluster_send.ClusterEndpoints(cluster(("a", "b", "c", "d"), detect=False))
    chosen, tried = await cluster_send.connect(endpoints, refused, attempts=3)
    assert chosen is None and len(opened) == 3 and tried == set(opened)  # three different
    nobody = cluster_send.ClusterEndpoints(cluster((), detect=False))
    assert await cluster_send.connect(nobody, refused, attempts=3) == (None, set())
