"""Traffic resilience end to end: real sidecars (mTLS), real NATS, etcd, registry, config
and CA services, and upstream apps that fail on command (`FaultyApp`: 503, reset,
hang, refused connections). Each feature is configured with its example file from
`examples/resilience/` where its numbers suit a test, else with a variant inline.

Assertions count what the upstreams received and what the client saw; timings are
compared with each other or with the configured delay/timeout, never with absolute
thresholds of their own.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mesh.compiled import ConnectionPool
from proxy.http import Limits, UpstreamConnectError, UpstreamPool
from proxy.http.pool import PoolOverflowError
from proxy.resilience import CircuitBreaker, Threshold
from tests.support import (
    FaultyApp,
    MeshHarness,
    admin_json,
    applied,
    eventually,
    faulty_sidecar,
)

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "resilience"


def example(name: str) -> str:
    return (EXAMPLES / name).read_text()


@pytest.fixture
async def mesh(nats_server, etcd_server, prefix):
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as h:
        yield h


def outbound(sc: Any) -> str:
    return f"http://127.0.0.1:{sc.ports['outbound']}"


class Answer:
    def __init__(self, status: int, headers: Any, body: Any, took: float):
        self.status, self.headers, self.body, self.took = status, headers, body, took

    @property
    def flags(self) -> str:
        return str(self.headers.get("x-mesh-response-flags", ""))


async def call(
    session: aiohttp.ClientSession, client: Any, url: str, method: str = "GET", **kw: Any
) -> Answer:
    t0 = time.monotonic()
    async with session.request(method, url, proxy=outbound(client), **kw) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return Answer(r.status, r.headers, body, time.monotonic() - t0)


async def calls(
    session: aiohttp.ClientSession, client: Any, url: str, n: int, concurrency: int = 1, **kw: Any
) -> list[Answer]:
    """`n` requests, `concurrency` at a time."""
    answers: list[Answer] = []
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            answers.append(await call(session, client, url, **kw))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


async def cluster_of(sc: Any, destination: str, subset: str = "") -> dict[str, Any]:
    data = await admin_json(sc, "/clusters")
    for c in data["clusters"]:
        if c["destination"] == destination and c["subset"] == subset:
            return dict(c)
    raise AssertionError(f"no cluster {destination}/{subset}: {data}")


async def warm_up(session: aiohttp.ClientSession, client: Any, url: str, apps: list[Any]) -> None:
    """Until every app answered once (the client's proxy learnt the destination and
    every endpoint), then forget the counts."""

    async def all_seen() -> bool:
        await call(session, client, url)
        return all(app.requests for app in apps)

    await eventually(all_seen, timeout=10)
    for app in apps:
        app.requests = 0
        app.hosts.clear()


async def meshctl(mesh: MeshHarness, *args: str) -> str:
    """Run `meshctl` against the harness's NATS (a subprocess: the sidecars it asks
    live in this event loop, which must keep running meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshctl.main", "--nats", mesh.nats_url, "--prefix", mesh.prefix,
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (args, out.decode(), err.decode())
    return out.decode()


# ------------------------------------------------------------------ upstream pool limits

LOCAL = "127.0.0.1"


async def fetch(pool: UpstreamPool) -> int:
    resp = await pool.request("GET", "/", [("host", "u")])
    await resp.body.read_all(100_000)
    return resp.status


async def test_pool_connection_limit_queues_pending_then_overflows() -> None:
    """`maxConnections: 1`, `http1MaxPendingRequests: 1`: of three concurrent requests
    one gets the connection, one waits for it and the third is refused at once."""
    app = await FaultyApp().start()
    app.delay = 0.3
    breaker = CircuitBreaker(ConnectionPool(max_connections=1, http1_max_pending_requests=1))
    pool = UpstreamPool(LOCAL, app.port, limits=Limits(), connection_limit=breaker)
    other = UpstreamPool(LOCAL, app.port, limits=Limits(), connection_limit=breaker)
    try:
        first, second, third = await asyncio.gather(
            fetch(pool), fetch(pool), fetch(pool), return_exceptions=True
        )
        assert (first, second) == (200, 200)
        assert isinstance(third, PoolOverflowError)
        assert pool.stats().opened == 1 and app.requests == 2
        assert breaker.active(Threshold.CONNECTIONS) == 1  # the idle connection holds it
        assert breaker.overflows[Threshold.PENDING] == 1 and breaker.active(Threshold.PENDING) == 0
        # another endpoint of the same cluster may always open its first connection
        assert await fetch(other) == 200
        # a pending request given up (its per-try timeout) leaves the queue
        slow = asyncio.create_task(fetch(pool))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await fetch(pool)
        assert breaker.active(Threshold.PENDING) == 0 and pool.pending == 0
        assert await slow == 200 and await fetch(pool) == 200
        assert pool.stats().opened == 1
        pool.close()
        await eventually(lambda: breaker.active(Threshold.CONNECTIONS) == 0, timeout=5)
        # the slot is free again: a waiting request of `other` would now connect
    finally:
        pool.close()
        other.close()
        await app.stop()


async def test_pool_max_requests_per_connection_and_idle_timeout() -> None:
    app = await FaultyApp().start()
    pool = UpstreamPool(LOCAL, app.port, limits=Limits(), max_requests_per_connection=2)
    try:
        for _ in range(5):
            assert await fetch(pool) == 200
        assert pool.stats().opened == 3  # 2 + 2 + 1 requests
        pool.configure(idle_timeout=0.1, max_requests_per_connection=0)
        for _ in range(3):
            assert await fetch(pool) == 200
        assert pool.stats().idle == 1
        await eventually(lambda: pool.stats().idle == 0, timeout=5)  # closed once idle 0.1 s
    finally:
        pool.close()
        await app.stop()


async def test_pool_connect_timeout() -> None:
    """A listener whose accept queue is full drops new SYNs: connecting hangs until the
    pool's connect timeout (`connectionPool.tcp.connectTimeout`)."""
    listener = socket.socket()
    listener.bind((LOCAL, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect((LOCAL, port))
        except BlockingIOError:
            pass
        fillers.append(s)
    await asyncio.sleep(0.05)
    pool = UpstreamPool(LOCAL, port, limits=Limits())
    pool.configure(connect_timeout=0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(UpstreamConnectError, match="timed out"):
            await fetch(pool)
        assert time.monotonic() - t0 >= 0.3
    finally:
        pool.close()
        for s in fillers:
            s.close()
        listener.close()


# ------------------------------------------------------------------ outlier detection

RETRY_5XX_REVIEWS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    retries: {attempts: 2, retryOn: 5xx}
"""


async def test_failing_endpoint_is_ejected_and_retries_hide_it(mesh: MeshHarness) -> None:
    """outlier-detection.yaml (3 consecutive 5xx eject for 30 s) applied with `meshctl
    apply`, with retries on 5xx: one endpoint of three starts answering 503, the client
    sees no error, and the endpoint stops getting traffic after its third 503."""
    apps = []
    for version in ("v1", "v2", "v3"):
        apps.append((await faulty_sidecar(mesh, "reviews", version))[1])
    client = await mesh.sidecar("productpage")
    url = "http://reviews:9080/"
    async with aiohttp.ClientSession() as session:
        await warm_up(session, client, url, apps)
        await meshctl(mesh, "apply", "-f", str(EXAMPLES / "outlier-detection.yaml"))
        await applied(mesh, RETRY_5XX_REVIEWS, client)
        broken = apps[1]
        broken.mode = "status"  # 503 from now on

        answers = await calls(session, client, url, 30)
        assert [a.status for a in answers] == [200] * 30
        assert broken.requests == 3  # ejected after its third consecutive 503
        assert sum(app.requests for app in apps) == 30 + 3  # each 503 was retried once

        cluster = await cluster_of(client, "default/reviews")
        by_version = {e["version"]: e for e in cluster["endpoints"]}
        assert by_version["v2"]["outlier"]["ejected"] is True
        assert by_version["v2"]["outlier"]["times_ejected"] == 1
        assert 25 < by_version["v2"]["outlier"]["ejected_for_s"] <= 30
        assert not by_version["v2"]["in_rotation"]
        assert by_version["v1"]["outlier"]["ejected"] is False
        assert cluster["counters"]["retries"] == 3

        table = await meshctl(mesh, "proxy-config", "endpoints", client.settings.instance)
        rows = [line.split() for line in table.splitlines()]
        assert rows[0][-1] == "OUTLIER"
        # the whole service's cluster (SUBSET "-"): the subsets are clusters of their own
        outlier = {r[2].split("-")[1]: " ".join(r[6:]) for r in rows[1:] if r[1] == "-"}
        assert outlier["v2"].startswith("EJECTED") and outlier["v2"].endswith("(1x)")
        assert outlier["v1"] == outlier["v3"] == "ok"


QUICK_EJECTION = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 2
      interval: 1s
      baseEjectionTime: 1s
      maxEjectionPercent: 100
"""


async def test_ejected_endpoint_returns_after_its_ejection_time(mesh: MeshHarness) -> None:
    """An app refusing connections makes its sidecar answer 503 (UF): Istio's default
    retry policy (503 is retriable) hides it from the client, the detector ejects the
    endpoint, and once the app listens again the endpoint is back after 1 s."""
    _, good = await faulty_sidecar(mesh, "reviews", "v1")
    _, broken = await faulty_sidecar(mesh, "reviews", "v2")
    client = await mesh.sidecar("productpage")
    url = "http://reviews:9080/"
    async with aiohttp.ClientSession() as session:
        await warm_up(session, client, url, [good, broken])
        await applied(mesh, QUICK_EJECTION, client)
        await broken.refuse()

        answers = await calls(session, client, url, 10)
        assert [a.status for a in answers] == [200] * 10  # the default policy retried
        cluster = await cluster_of(client, "default/reviews")
        health = {e["version"]: e["outlier"] for e in cluster["endpoints"]}
        assert health["v2"]["ejected"] and health["v2"]["times_ejected"] == 1
        ejected_at = time.monotonic() - (1.0 - health["v2"]["ejected_for_s"])
        assert broken.requests == 0 and good.requests == 10

        await broken.accept()

        async def back() -> bool:
            await call(session, client, url)
            return broken.requests > 0

        await eventually(back, timeout=10)
        assert time.monotonic() - ejected_at >= 1.0  # not before its ejection time
        cluster = await cluster_of(client, "default/reviews")
        v2 = next(e for e in cluster["endpoints"] if e["version"] == "v2")
        assert v2["in_rotation"] and not v2["outlier"]["ejected"]


# ------------------------------------------------------------------ retries and timeouts


def requests_total(metrics: str, **labels: str) -> float:
    """The sum of `meshwork_proxy_requests_total` series carrying `labels`."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("meshwork_proxy_requests_total{") and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def metrics_of(sc: Any) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{sc.ports['admin']}/stats/prometheus") as r,
    ):
        return await r.text()


PER_TRY_TIMEOUT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - route: [{destination: {host: ratings}}]
    retries: {attempts: 2, perTryTimeout: 0.3s, retryOn: "5xx"}
"""

ROUTE_TIMEOUT_WITH_RETRIES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - route: [{destination: {host: ratings}}]
    timeout: 0.5s
    retries: {attempts: 5, perTryTimeout: 0.3s, retryOn: "5xx"}
"""


async def test_retry_attempts_and_per_try_timeouts(mesh: MeshHarness) -> None:
    """retries.yaml: 3 retries on gateway errors, so a 503 upstream sees 4 requests and
    the client gets the last 503 (flag URX). A per-try timeout fires on each attempt
    (504 `UT,URX` after 3 tries); the route timeout ends all attempts (504 `UT`)."""
    _, app = await faulty_sidecar(mesh, "ratings")
    client = await mesh.sidecar("reviews")
    url = "http://ratings:9080/ratings/0"
    async with aiohttp.ClientSession() as session:
        await warm_up(session, client, url, [app])
        await applied(mesh, example("retries.yaml"), client)

        app.mode = "status"
        answer = await call(session, client, url)
        assert answer.status == 503 and app.requests == 4  # 1 + attempts: 3
        assert requests_total(await metrics_of(client), response_flags="URX") == 1

        app.mode, app.requests = "reset", 0  # the server sidecar answers 503 UC
        answer = await call(session, client, url)
        # 4 tries; the server sidecar's pool resends the first once on a new connection,
        # as a reused keep-alive connection that closed unanswered may just have aged out
        assert answer.status == 503 and app.requests in (4, 5)

        # telemetry records the final outcome with its flag (Istio's metric)
        metrics = await metrics_of(client)
        assert any(
            line.startswith("istio_requests_total{") and 'response_flags="URX"' in line
            and 'reporter="source"' in line and 'response_code="503"' in line
            for line in metrics.splitlines()
        )  # fmt: skip

        # bodies: a small one is kept and replayed on every try, a large one streams
        # and is not sent twice
        app.mode, app.requests, app.bodies = "status", 0, []
        answer = await call(session, client, url, "POST", data=b"s" * 1000)
        assert answer.status == 503 and app.bodies == [1000] * 4
        app.requests, app.bodies = 0, []
        answer = await call(session, client, url, "POST", data=b"L" * 200_000)
        assert answer.status == 503 and app.bodies == [200_000]

        app.mode, app.requests = "ok", 0
        assert (await call(session, client, url)).status == 200 and app.requests == 1

        await applied(mesh, PER_TRY_TIMEOUT, client)
        app.mode = "hang"
        answer = await call(session, client, url)
        assert answer.status == 504 and answer.flags == "UT,URX"
        assert app.requests == 1 + 3  # three tries of 0.3 s each
        assert answer.took >= 3 * 0.3

        await applied(mesh, ROUTE_TIMEOUT_WITH_RETRIES, client)
        app.requests = 0
        answer = await call(session, client, url)
        assert answer.status == 504 and answer.flags == "UT"
        assert app.requests == 2  # 0.3 s, then what is left of the route's 0.5 s
        assert answer.took >= 0.5


async def test_route_timeout(mesh: MeshHarness) -> None:
    """timeouts.yaml: calls to reviews give up after 0.5 s with 504 `UT`; its
    DestinationRule's connectTimeout and idleTimeout reach the client's pools."""
    _, app = await faulty_sidecar(mesh, "reviews")
    client = await mesh.sidecar("productpage")
    url = "http://reviews:9080/"
    async with aiohttp.ClientSession() as session:
        await warm_up(session, client, url, [app])
        await applied(mesh, example("timeouts.yaml"), client)
        app.delay = 1.5
        answer = await call(session, client, url)
        assert answer.status == 504 and answer.flags == "UT"
        assert 0.5 <= answer.took < app.delay
        # between sidecars a pool is HTTP/2 + HTTP/1.1 (`h1` holds the limited pool)
        pools = [
            getattr(p, "h1", p)
            for (_, _, owner, _), p in client.pools.pools.items()
            if owner == "default/reviews"
        ]
        assert pools and all(p._connect_timeout == 0.25 and p._idle_timeout == 30 for p in pools)


RETRY_ALL_5XX = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - route: [{destination: {host: ratings}}]
    retries: {attempts: 3, retryOn: "5xx"}
"""


async def test_retry_budget_holds_when_every_endpoint_fails(mesh: MeshHarness) -> None:
    """Every endpoint answers 503 and each request may be retried 3 times, but retries
    in flight stay within 20 % of the requests in flight (at least 3): the upstreams
    see about 1.2x the client's requests, not 4x."""
    apps = [(await faulty_sidecar(mesh, "ratings", v))[1] for v in ("v1", "v2")]
    client = await mesh.sidecar("reviews")
    url = "http://ratings:9080/ratings/0"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await warm_up(session, client, url, apps)
        await applied(mesh, RETRY_ALL_5XX, client)
        for app in apps:
            app.mode = "status"
        n = 600
        answers = await calls(session, client, url, n, concurrency=40)
        assert Counter(a.status for a in answers) == {503: n}
        upstream = sum(app.requests for app in apps)
        print(f"retry budget: {n} client requests, {upstream} upstream requests")
        assert upstream <= 1.25 * n
        cluster = await cluster_of(client, "default/ratings")
        budget = cluster["circuit_breakers"]["max_retries"]
        assert budget["overflows"] > 0  # the budget refused retries
        assert cluster["counters"]["retries"] == upstream - n


async def test_circuit_breaker_overflow_is_answered_503_at_once(mesh: MeshHarness) -> None:
    """circuit-breaker.yaml: one connection to ratings, one request waiting for it.
    Of five concurrent slow requests two are served (one after the other, as the
    connection serves one request: maxRequestsPerConnection 1), three are refused
    with 503 `UO` without waiting for the slow ones."""
    _, app = await faulty_sidecar(mesh, "ratings")
    client = await mesh.sidecar("reviews")
    url = "http://ratings:9080/ratings/0"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await warm_up(session, client, url, [app])
        await applied(mesh, example("circuit-breaker.yaml"), client)
        app.delay = 0.5
        answers = await asyncio.gather(*(call(session, client, url) for _ in range(5)))
        served = [a for a in answers if a.status == 200]
        refused = [a for a in answers if a.status != 200]
        assert len(served) == 2 and app.requests == 2
        assert [(a.status, a.flags) for a in refused] == [(503, "UO")] * 3
        assert max(a.took for a in refused) < min(a.took for a in served)
        assert max(a.took for a in served) >= 2 * app.delay  # the second waited its turn

        cluster = await cluster_of(client, "default/ratings")
        breakers = cluster["circuit_breakers"]
        assert breakers["max_connections"]["limit"] == 1
        assert breakers["max_pending_requests"] == {"limit": 1, "active": 0, "overflows": 3}
        assert breakers["max_requests"]["limit"] == 10
        assert cluster["counters"]["overflows"] == 3
        assert requests_total(await metrics_of(client), response_flags="UO") == 3


# ------------------------------------------------------------------ fault injection


async def test_abort_fault_share_and_match(mesh: MeshHarness) -> None:
    """fault-abort.yaml: jason's requests are all aborted with 500; of everyone else's,
    half are aborted with 503 (flag FI) without reaching ratings."""
    _, app = await faulty_sidecar(mesh, "ratings")
    client = await mesh.sidecar("reviews")
    url = "http://ratings:9080/ratings/0"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await warm_up(session, client, url, [app])
        await applied(mesh, example("fault-abort.yaml"), client)
        jason = await calls(session, client, url, 20, concurrency=5, headers={"end-user": "jason"})
        assert {(a.status, a.flags) for a in jason} == {(500, "FI")}
        assert app.requests == 0

        n = 1000
        answers = await calls(session, client, url, n, concurrency=20)
        statuses = Counter(a.status for a in answers)
        assert set(statuses) == {200, 503}
        # binomial(1000, 0.5): sd 15.8, so +-80 is beyond 5 sd
        assert abs(statuses[503] - n / 2) <= 80, statuses
        assert {a.flags for a in answers if a.status == 503} == {"FI"}
        assert app.requests == statuses[200]  # aborted requests never left the client side
        metrics = await metrics_of(client)
        assert requests_total(metrics, response_flags="FI") == statuses[503] + 20


DELAY_FOR_JASON = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    fault: {delay: {percentage: {value: 100.0}, fixedDelay: 1s}}
    route: [{destination: {host: ratings}}]
  - route: [{destination: {host: ratings}}]
"""


async def test_delay_fault_applies_only_to_matching_requests(mesh: MeshHarness) -> None:
    """fault-delay.yaml's rule with a 1 s delay instead of 7 s: jason's requests take
    at least the delay (flag DI), the others are not held."""
    _, app = await faulty_sidecar(mesh, "ratings")
    client = await mesh.sidecar("reviews")
    url = "http://ratings:9080/ratings/0"
    delay = 1.0
    rule = example("fault-delay.yaml").replace("fixedDelay: 7s", "fixedDelay: 1s")
    assert rule.count("fixedDelay: 1s") == 1
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await warm_up(session, client, url, [app])
        await applied(mesh, rule, client)
        jason, others = await asyncio.gather(
            calls(session, client, url, 5, concurrency=5, headers={"end-user": "jason"}),
            calls(session, client, url, 20),
        )
        assert all(a.status == 200 for a in jason + others)
        assert min(a.took for a in jason) >= delay
        assert statistics.median(a.took for a in others) < delay
        assert sum(a.took < delay for a in others) >= 18
        assert app.requests == 25
        metrics = await metrics_of(client)
        assert requests_total(metrics, response_flags="DI") == 5


# ------------------------------------------------------------------ mirroring


async def test_mirror_gets_copies_and_never_holds_the_primary(mesh: MeshHarness) -> None:
    """mirror.yaml: everything goes to reviews v1 and a copy to v2 with Host
    `reviews-shadow`. v2 hangs: the primary requests are answered all the same, and
    the copies (small bodies included) reached v2."""
    _, v1 = await faulty_sidecar(mesh, "reviews", "v1")
    _, v2 = await faulty_sidecar(mesh, "reviews", "v2")
    client = await mesh.sidecar("productpage")
    url = "http://reviews:9080/reviews/1"
    async with aiohttp.ClientSession() as session:
        await warm_up(session, client, url, [v1, v2])
        await applied(mesh, example("mirror.yaml"), client)
        v2.mode = "hang"
        answers = await calls(session, client, url, 10, timeout=aiohttp.ClientTimeout(total=5))
        posted = await call(
            session, client, url, "POST", data=b"x" * 1000, timeout=aiohttp.ClientTimeout(total=5)
        )
        answers.append(posted)
        assert [(a.status, a.body["version"]) for a in answers] == [(200, "v1")] * 11
        assert v1.requests == 11 and v1.hosts == ["reviews:9080"] * 11
        await eventually(lambda: v2.requests == 11, timeout=5)
        assert set(v2.hosts) == {"reviews-shadow:9080"}
        assert v2.bodies[-1] == 1000  # the copy carries the body

        mirrors = (await admin_json(client, "/clusters"))["mirrors"]
        assert mirrors["in_flight"] == 11 and mirrors["dropped"] == 0

        # the mirror recovers: copies are answered (and discarded)
        v2.mode = "ok"
        await call(session, client, url)

        async def one_sent() -> bool:
            return bool((await admin_json(client, "/clusters"))["mirrors"]["sent"] >= 1)

        await eventually(one_sent, timeout=5)


# ------------------------------------------------------------------ rate limiting


async def test_rate_limit_429_and_per_identity_buckets(mesh: MeshHarness) -> None:
    """rate-limit.yaml on ratings: 20/s per caller identity, 50/s for reviews, 100/s in
    total. A burst from productpage is cut at its 20 (429, flag RL, x-ratelimit-*);
    reviews, a caller with a bucket of its own, is still served in full."""
    server, _ = await faulty_sidecar(mesh, "ratings")
    productpage = await mesh.sidecar("productpage")
    reviews = await mesh.sidecar("reviews")
    url = "http://ratings:9080/ratings/0"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for client in (productpage, reviews):
            assert (await call(session, client, url)).status == 200
        await applied(mesh, example("rate-limit.yaml"), server)
        assert server.inbound_policy.rate_limiter.policies == ("default/ratings",)

        t0 = time.monotonic()
        burst = await calls(session, productpage, url, 100, concurrency=25)
        took = time.monotonic() - t0
        allowed = [a for a in burst if a.status == 200]
        limited = [a for a in burst if a.status == 429]
        assert len(allowed) + len(limited) == 100
        # a full bucket of 20, plus what refilled at 20/s while the burst lasted
        assert 20 <= len(allowed) <= 20 + 20 * took + 1
        assert limited and {a.flags for a in limited} == {"RL"}
        assert {a.headers["x-ratelimit-limit"] for a in limited} == {"20"}
        assert {a.headers["x-ratelimit-remaining"] for a in limited} == {"0"}
        assert all(int(a.headers["x-ratelimit-reset"]) >= 1 for a in limited)
        assert allowed[0].headers["x-ratelimit-limit"] in {"20", "100"}

        # reviews' own bucket (the override: 50/s) is untouched by productpage's burst
        answers = await calls(session, reviews, url, 40, concurrency=10)
        assert [a.status for a in answers] == [200] * 40
        metrics = await metrics_of(server)
        assert requests_total(metrics, listener="inbound", response_flags="RL") == len(limited)
