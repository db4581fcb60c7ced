"""The sidecar's per-cluster state without sockets: endpoint choice around ejected and
already-tried endpoints, ejection and return with a fake clock, state kept across
endpoint and policy changes; response flags joined in Envoy's order; the OUTLIER
column of `meshctl proxy-config endpoints`."""

from __future__ import annotations

import random

import pytest

from mesh.compiled import ConnectionPool, LoadBalancer, OutlierDetection, TrafficPolicy
from mesh.hosts import ServiceRef
from mesh.messages import Endpoint
from meshctl.config_cmds import _outlier_state
from proxy.clusters import Cluster
from proxy.resilience import LocalOrigin, Threshold
from proxy.response_flags import join_flags
from proxy.routing import build_balancer

REF = ServiceRef("default", "reviews")
DETECT = OutlierDetection(
    consecutive_5xx_errors=2, interval_ms=1000, base_ejection_time_ms=10_000,
    max_ejection_percent=100,
)  # fmt: skip


def endpoints(*names: str) -> list[Endpoint]:
    return [Endpoint(instance=n, address=f"10.0.0.{i}:80") for i, n in enumerate(names, 1)]


def cluster(
    names: tuple[str, ...] = ("a", "b", "c"), policy: TrafficPolicy | None = None
) -> Cluster:
    policy = policy or TrafficPolicy(outlier_detection=DETECT)
    balancer = build_balancer(endpoints(*names), LoadBalancer(), random.Random(1))
    return Cluster(REF, "", policy, balancer)


def chosen(c: Cluster, n: int, now: float, tried: frozenset[str] = frozenset()) -> set[str]:
    out = set()
    for _ in range(n):
        ep = c.choose(None, tried, now)
        out.add(ep.instance if ep is not None else None)
    return out


def test_ejected_endpoint_skipped_until_its_time_is_over() -> None:
    c = cluster()
    assert chosen(c, 6, 0.0) == {"a", "b", "c"}
    c.report("b", 503, 1.0)
    assert "b" in chosen(c, 6, 1.0)  # one 5xx is not enough
    c.report("b", 500, 1.5)
    assert c.ejected(1.5) == {"b"}
    assert chosen(c, 12, 2.0) == {"a", "c"}
    assert chosen(c, 12, 11.4) == {"a", "c"}
    assert chosen(c, 12, 11.5) == {"a", "b", "c"}  # back after 10 s


def test_tried_endpoints_are_avoided_softly_ejected_ones_strictly() -> None:
    c = cluster()
    c.report("b", 503, 0.0)
    c.report("b", 503, 0.0)
    # a retry that tried a: c is left; having tried a and c, repeat one of them, never b
    assert chosen(c, 6, 1.0, frozenset({"a"})) == {"c"}
    assert chosen(c, 6, 1.0, frozenset({"a", "c"})) <= {"a", "c"}
    for name in ("a", "c"):
        c.report(name, 503, 1.0)
        c.report(name, 503, 1.0)
    assert chosen(c, 3, 1.0) == {None}  # all ejected: no healthy upstream


def test_panic_below_min_health_uses_every_endpoint() -> None:
    od = OutlierDetection(
        consecutive_5xx_errors=1, base_ejection_time_ms=10_000, max_ejection_percent=100,
        min_health_percent=50,
    )  # fmt: skip
    c = cluster(policy=TrafficPolicy(outlier_detection=od))
    c.report("a", 503, 0.0)
    assert chosen(c, 6, 0.5) == {"b", "c"}
    c.report("b", 503, 0.5)  # one of three healthy: below 50 %
    assert chosen(c, 6, 1.0) == {"a", "b", "c"}


def test_connect_failures_count_as_errors() -> None:
    c = cluster()
    c.report("a", LocalOrigin.CONNECT_FAILED, 0.0)
    c.report("a", LocalOrigin.TIMEOUT, 0.0)
    assert c.ejected(0.1) == {"a"}


def test_state_survives_endpoint_and_policy_changes() -> None:
    c = cluster()
    c.report("b", 503, 0.0)
    c.report("b", 503, 0.0)
    assert c.breaker.try_acquire_request()
    pool = ConnectionPool(http2_max_requests=5, max_connections=2)
    policy = TrafficPolicy(connection_pool=pool, outlier_detection=DETECT)
    balancer = build_balancer(endpoints("a", "b", "d"), LoadBalancer(), random.Random(1))
    c.update(policy, balancer)
    assert c.ejected(1.0) == {"b"}  # still out; c is gone, d is new
    assert chosen(c, 6, 1.0) == {"a", "d"}
    assert c.breaker.active(Threshold.REQUESTS) == 1 and c.breaker.limit(Threshold.REQUESTS) == 5
    assert c.pool_options is not None and c.pool_options.owner == "default/reviews"
    assert c.pool_options.limit is c.breaker
    same = c.pool_options
    c.update(policy, balancer)
    assert c.pool_options is same  # unchanged settings: pools need no reconfiguring
    c.update(TrafficPolicy(), balancer)
    assert c.detector is None and c.pool_options is None
    assert chosen(c, 6, 1.0) == {"a", "b", "d"}


def test_sweeps_shrink_the_ejection_multiplier() -> None:
    c = cluster()
    c.ejected(0.0)  # the first request schedules the sweeps
    c.report("a", 503, 0.0)
    c.report("a", 503, 0.0)
    assert c.ejected(0.5) == {"a"}
    # 10 s later it is back; a quiet spell of sweeps shrinks its multiplier to 0,
    # so a new ejection lasts the base time again, not twice as long
    assert c.ejected(100.0) == frozenset()
    c.report("a", 503, 100.0)
    c.report("a", 503, 100.0)
    assert c.ejected(109.9) == {"a"} and c.ejected(110.0) == frozenset()
    snap = c.snapshot(110.0)
    assert snap["endpoint_health"]["a"]["times_ejected"] == 2


@pytest.mark.parametrize(
    ("flags", "joined"),
    [
        ((), ""),
        (("UF", "URX"), "UF,URX"),
        (("URX", "UT"), "UT,URX"),
        (("DI,FI",), "DI,FI"),
        (("DI", "UF,URX"), "UF,DI,URX"),
        (("", "UO", ""), "UO"),
        (("UC", "UC"), "UC"),
    ],
)
def test_join_flags_in_envoy_order(flags: tuple[str, ...], joined: str) -> None:
    assert join_flags(*flags) == joined


@pytest.mark.parametrize(
    ("outlier", "column"),
    [
        (None, "-"),
        ({"ejected": False, "times_ejected": 0}, "ok"),
        ({"ejected": False, "times_ejected": 2}, "ok (2x)"),
        ({"ejected": True, "ejected_for_s": 29.6, "times_ejected": 1}, "EJECTED 30s (1x)"),
    ],
)
def test_outlier_column(outlier: dict[str, object] | None, column: str) -> None:
    assert _outlier_state(outlier) == column
