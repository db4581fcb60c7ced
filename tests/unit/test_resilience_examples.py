"""`examples/resilience/*.yaml`: each file goes through the real loader and validation
(what `meshctl apply -f` and the config service run) and compiles to the settings its
comments promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.compiled import (
    ConnectionPool,
    FaultAbort,
    FaultDelay,
    FaultInjection,
    Mirror,
    OutlierDetection,
    RateLimit,
    RateLimitOverride,
    RetryPolicy,
    RouteTable,
)
from mesh.hosts import ServiceRef
from mesh.messages import ResourceDocument
from mesh.resources import Resource, load_yaml, parse_documents
from services.config.compile import compile_route_table
from services.config.compile_security import DEFAULT_ROOT_NAMESPACE, compile_inbound_policy

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "resilience"
FEATURES = {
    "timeouts.yaml": ["VirtualService", "VirtualService", "DestinationRule"],
    "retries.yaml": ["VirtualService"],
    "circuit-breaker.yaml": ["DestinationRule"],
    "outlier-detection.yaml": ["DestinationRule"],
    "fault-delay.yaml": ["VirtualService"],
    "fault-abort.yaml": ["VirtualService"],
    "mirror.yaml": ["VirtualService", "DestinationRule"],
    "rate-limit.yaml": ["RateLimitPolicy"],
}
REVIEWS = ServiceRef("default", "reviews")
RATINGS = ServiceRef("default", "ratings")


def load(name: str) -> list[Resource]:
    path = EXAMPLES / name
    documents = [
        ResourceDocument(source=str(path), index=i, body=body)
        for i, body in enumerate(load_yaml(path.read_text(), str(path)))
    ]
    batch = parse_documents(documents)
    assert [str(e) for e in batch.errors] == []
    return batch.resources


def table(name: str, ref: ServiceRef) -> RouteTable:
    return compile_route_table(load(name), ref, revision=1)


def test_there_is_one_example_per_feature() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(FEATURES)


@pytest.mark.parametrize(("name", "kinds"), sorted(FEATURES.items()))
def test_example_is_valid(name: str, kinds: list[str]) -> None:
    assert [r.kind for r in load(name)] == kinds


def test_timeouts() -> None:
    reviews = table("timeouts.yaml", REVIEWS)
    assert reviews.http[0].timeout_ms == 500
    pool = reviews.traffic_policy.connection_pool
    assert pool == ConnectionPool(connect_timeout_ms=250, idle_timeout_ms=30_000)
    ratings = table("timeouts.yaml", RATINGS)
    assert ratings.http[0].fault == FaultInjection(
        delay=FaultDelay(fixed_delay_ms=2000, percentage=100.0)
    )


def test_retries() -> None:
    assert table("retries.yaml", RATINGS).http[0].retries == RetryPolicy(
        attempts=3,
        per_try_timeout_ms=2000,
        retry_on=("gateway-error", "connect-failure", "refused-stream"),
        retriable_status_codes=(),
    )


def test_circuit_breaker() -> None:
    assert table("circuit-breaker.yaml", RATINGS).traffic_policy.connection_pool == ConnectionPool(
        max_connections=1,
        http1_max_pending_requests=1,
        http2_max_requests=10,
        max_requests_per_connection=1,
        max_retries=3,
    )


def test_outlier_detection() -> None:
    reviews = table("outlier-detection.yaml", REVIEWS)
    top = OutlierDetection(
        consecutive_5xx_errors=3,
        interval_ms=1000,
        base_ejection_time_ms=30_000,
        max_ejection_percent=100,
        min_health_percent=50,
    )
    assert reviews.traffic_policy.outlier_detection == top
    v1, v2, v3 = reviews.subsets
    assert v1.traffic_policy.outlier_detection == v2.traffic_policy.outlier_detection == top
    assert v3.traffic_policy.outlier_detection == OutlierDetection(
        consecutive_5xx_errors=1,
        consecutive_gateway_errors=1,
        interval_ms=1000,
        base_ejection_time_ms=60_000,
        max_ejection_percent=100,
    )


def test_fault_delay_only_for_jason() -> None:
    jason, others = table("fault-delay.yaml", RATINGS).http
    assert jason.match[0].headers["end-user"].value == "jason"
    assert jason.fault == FaultInjection(delay=FaultDelay(fixed_delay_ms=7000, percentage=100.0))
    assert others.fault is None


def test_fault_abort() -> None:
    jason, others = table("fault-abort.yaml", RATINGS).http
    assert jason.fault == FaultInjection(abort=FaultAbort(http_status=500, percentage=100.0))
    assert others.fault == FaultInjection(abort=FaultAbort(http_status=503, percentage=50.0))


def test_mirror() -> None:
    reviews = table("mirror.yaml", REVIEWS)
    assert reviews.http[0].mirror == Mirror(
        host="reviews.default.svc.cluster.local", subset="v2", percentage=100.0
    )
    assert [s.name for s in reviews.subsets] == ["v1", "v2"]


def test_rate_limit() -> None:
    policy = compile_inbound_policy(load("rate-limit.yaml"), RATINGS, 1, DEFAULT_ROOT_NAMESPACE)
    assert policy.rate_limits == (
        RateLimit(
            name="ratings",
            namespace="default",
            selector={"app": "ratings"},
            total_rps=100,
            identity_rps=20,
            overrides=(
                RateLimitOverride(principals=("cluster.local/ns/default/sa/reviews",), rps=50),
            ),
        ),
    )
