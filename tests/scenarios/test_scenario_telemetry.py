"""Telemetry, on both data planes: `istio_requests_total` on the admin
`/stats/prometheus` of the calling (reporter=source) and the called
(reporter=destination) sidecar, with response_code and response_flags, for a 200, a
503 without healthy upstream (UH), a 503 whose app refuses connections (UF) and a 403
from authorization (RBAC)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from tests.scenarios.helpers import Scenario
from tests.support import destination_rule_yaml

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Env:
    s: Scenario
    client: Any
    reviews: Any
    ratings: Any


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(scenario: Scenario) -> Env:
    reviews = await scenario.sidecar("reviews", "v1")
    ratings = await scenario.faulty("ratings", "v1")
    client = await scenario.sidecar("productpage")
    await scenario.until(client, "http://reviews:9080/", lambda r: r.status == 200)
    await scenario.until(client, "http://ratings:9080/", lambda r: r.status == 200)
    return Env(scenario, client, reviews, ratings)


async def test_a_200_is_counted_by_both_reporters(env: Env) -> None:
    s = env.s
    labels = {"response_code": "200", "destination_workload": "reviews-v1"}
    source = await s.istio_requests(env.client, reporter="source", **labels)
    destination = await s.istio_requests(env.reviews, reporter="destination", **labels)
    for _ in range(3):
        assert (await s.call(env.client, "http://reviews:9080/counted")).status == 200
    await s.counted(env.client, source + 3, reporter="source", response_flags="-", **labels)
    await s.counted(
        env.reviews, destination + 3, reporter="destination", response_flags="-", **labels
    )


async def test_the_destination_reporter_names_the_source_workload(env: Env) -> None:
    s = env.s
    labels = {
        "reporter": "destination",
        "response_code": "200",
        "destination_workload": "reviews-v1",
        "source_workload": "productpage-v1",
        "source_app": "productpage",
        "source_version": "v1",
    }
    before = await s.istio_requests(env.reviews, **labels)
    assert (await s.call(env.client, "http://reviews:9080/who")).status == 200
    await s.counted_within(5, env.reviews, before + 1, labels)


NO_HEALTHY_SUBSET = (
    destination_rule_yaml("reviews", ("v1", "v9"))
    + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /nowhere}}]
    route: [{destination: {host: reviews, subset: v9}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"""
)


async def test_a_503_without_healthy_upstream_is_flagged_uh(env: Env) -> None:
    s = env.s
    await s.apply(NO_HEALTHY_SUBSET)
    await s.until(env.client, "http://reviews:9080/nowhere", lambda r: r.status == 503)
    labels = {"reporter": "source", "response_code": "503", "response_flags": "UH"}
    before = await s.istio_requests(env.client, **labels)
    reply = await s.call(env.client, "http://reviews:9080/nowhere/x")
    assert reply.status == 503, reply
    await s.counted(env.client, before + 1, **labels)


async def test_a_503_from_an_app_refusing_connections_is_flagged_uf(env: Env) -> None:
    s, app = env.s, env.ratings.echo
    labels = {"reporter": "destination", "response_code": "503", "response_flags": "UF"}
    before = await s.istio_requests(env.ratings, **labels)
    await app.refuse()
    try:
        reply = await s.call(env.client, "http://ratings:9080/refused")
        assert reply.status == 503, reply
        await s.counted(env.ratings, before + 1, **labels)
        await s.counted(env.client, 1, reporter="source", response_code="503")
    finally:
        await app.accept()
    await s.until(env.client, "http://ratings:9080/", lambda r: r.status == 200)


DENY_SECRET = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-secret, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/secret"]}
"""


async def _denied_once(env: Env) -> None:
    s = env.s
    await s.apply(DENY_SECRET)
    await s.until(env.client, "http://reviews:9080/secret", lambda r: r.status == 403)
    requests = env.reviews.echo.requests
    reply = await s.call(env.client, "http://reviews:9080/secret")
    assert reply.status == 403, reply
    assert env.reviews.echo.requests == requests


async def test_a_403_from_authorization_is_counted_by_both_reporters(env: Env) -> None:
    s = env.s
    destination = {"reporter": "destination", "response_code": "403"}
    source = {"reporter": "source", "response_code": "403", "response_flags": "-"}
    before_d = await s.istio_requests(env.reviews, **destination)
    before_s = await s.istio_requests(env.client, **source)
    await _denied_once(env)
    await s.counted(env.reviews, before_d + 1, **destination)
    await s.counted(env.client, before_s + 1, **source)


async def test_a_403_from_authorization_is_flagged_rbac_at_the_destination(env: Env) -> None:
    s = env.s
    labels = {"reporter": "destination", "response_code": "403", "response_flags": "RBAC"}
    before = await s.istio_requests(env.reviews, **labels)
    await _denied_once(env)
    await s.counted_within(5, env.reviews, before + 1, labels)
