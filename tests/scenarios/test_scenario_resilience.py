"""Resilience, on both data planes: retries on 503 (counted at the app), a route
timeout answered 504, connection-pool limits answered 503 at once (circuit breaking),
and a failing endpoint ejected by outlier detection.

reviews calls ratings (one app that fails on command) and details (v1 healthy, v2
answering 503)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from tests.scenarios.helpers import Reply, Scenario
from tests.support import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

RATINGS = "http://ratings:9080"
DETAILS = "http://details:9080"


@dataclass
class Env:
    s: Scenario
    client: Any
    ratings: Any
    details_v1: Any
    details_v2: Any


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(scenario: Scenario) -> Env:
    ratings = await scenario.faulty("ratings")
    details_v1 = await scenario.faulty("details", "v1")
    details_v2 = await scenario.faulty("details", "v2")
    client = await scenario.sidecar("reviews")
    await scenario.until(client, RATINGS + "/", lambda r: r.status == 200)
    await scenario.until(client, DETAILS + "/", lambda r: r.status == 200)
    return Env(scenario, client, ratings, details_v1, details_v2)


def ratings_vs(spec: str, marker: str) -> str:
    """A VirtualService for ratings; `marker` is a path answered 204 directly, so a
    test knows when this version of the rule is in force."""
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings}}
spec:
  hosts: [ratings]
  http:
  - match: [{{uri: {{exact: /{marker}}}}}]
    directResponse: {{status: 204}}
  - route: [{{destination: {{host: ratings}}}}]
{spec}"""


async def in_force(e: Env, text: str, marker: str) -> None:
    await e.s.apply(text)
    await e.s.until(e.client, f"{RATINGS}/{marker}", lambda r: r.status == 204)


async def test_retries_on_503_are_counted_at_the_app(env: Env) -> None:
    app = env.ratings.echo
    await in_force(
        env, ratings_vs("    retries: {attempts: 2, retryOn: 5xx}", "retries"), "retries"
    )
    app.mode = "status"
    try:
        before = app.requests
        reply = await env.s.call(env.client, RATINGS + "/r")
        assert reply.status == 503, reply
        assert app.requests == before + 3  # the request and two retries
    finally:
        app.mode = "ok"
    before = app.requests
    reply = await env.s.call(env.client, RATINGS + "/r")
    assert reply.status == 200 and app.requests == before + 1


async def test_route_timeout_is_answered_504(env: Env) -> None:
    app = env.ratings.echo
    await in_force(
        env, ratings_vs("    timeout: 0.5s\n    retries: {attempts: 0}", "timeout"), "timeout"
    )
    app.delay = 3.0
    try:
        reply = await env.s.call(env.client, RATINGS + "/slow")
        assert reply.status == 504, reply
    finally:
        app.delay = 0.0
    reply = await env.s.call(env.client, RATINGS + "/fast")
    assert reply.status == 200, reply


POOL_OF_ONE = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings}
spec:
  host: ratings
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
"""


async def test_connection_pool_overflow_is_answered_503_without_reaching_the_app(
    env: Env,
) -> None:
    await in_force(env, ratings_vs("    retries: {attempts: 0}", "pool"), "pool")
    await env.s.apply(POOL_OF_ONE)
    await _overflowing(env)
    await env.s.delete("DestinationRule", "ratings")


async def _overflowing(env: Env) -> None:
    """Six concurrent requests to an app holding each answer 1 s: one connection and
    one pending request are allowed, the rest overflow at once (503, flag UO)."""
    app = env.ratings.echo

    async def burst() -> list[Reply]:
        app.delay = 1.0
        try:
            before = app.requests
            replies = await asyncio.gather(
                *(env.s.call(env.client, RATINGS + "/burst") for _ in range(6))
            )
            statuses = sorted(r.status for r in replies)
            assert 503 in statuses and 200 in statuses, statuses
            assert app.requests - before == statuses.count(200), (statuses, app.requests)
            return list(replies)
        finally:
            app.delay = 0.0

    await eventually(burst, timeout=20, interval=0.2)
    await env.s.counted(env.client, 1, reporter="source", response_code="503", response_flags="UO")


OUTLIER = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details}
spec:
  host: details
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 2
      interval: 1s
      baseEjectionTime: 60s
      maxEjectionPercent: 100
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details}
spec:
  hosts: [details]
  http:
  - match: [{uri: {exact: /outlier}}]
    directResponse: {status: 204}
  - route: [{destination: {host: details}}]
    retries: {attempts: 0}
"""


async def test_failing_endpoint_is_ejected(env: Env) -> None:
    s, good, bad = env.s, env.details_v1.echo, env.details_v2.echo
    await s.apply(OUTLIER)
    await s.until(env.client, DETAILS + "/outlier", lambda r: r.status == 204)
    bad.mode = "status"  # details v2 answers 503 from now on

    async def ejected() -> bool:
        before = bad.requests
        replies = [await s.call(env.client, DETAILS + "/d") for _ in range(10)]
        return bad.requests == before and all(r.status == 200 for r in replies)

    await eventually(ejected, timeout=20, interval=0.5)
    # ejected for 60 s: every request goes to v1 and succeeds without a retry
    before_good, before_bad = good.requests, bad.requests
    replies = [await s.call(env.client, DETAILS + "/d") for _ in range(20)]
    assert [r.status for r in replies] == [200] * 20
    assert {r.answered_by for r in replies} == {"details-v1"}
    assert (good.requests - before_good, bad.requests) == (20, before_bad)
