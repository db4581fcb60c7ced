"""Circuit breaking: connectionPool thresholds counted per destination (pure)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mesh.compiled import UNLIMITED, ConnectionPool
from proxy.resilience import CircuitBreaker, RetryBudget, Threshold


def test_without_a_connection_pool_nothing_but_the_retry_budget_limits() -> None:
    breaker = CircuitBreaker()
    assert all(breaker.limit(t) == UNLIMITED for t in Threshold)
    assert all(breaker.try_acquire_request() for _ in range(5000))
    assert all(breaker.try_acquire_connection() for _ in range(5000))
    # 20% of 5000 active requests
    assert sum(breaker.try_acquire_retry() for _ in range(2000)) == 1000


@pytest.mark.parametrize(
    ("pool", "acquire", "release", "threshold"),
    [
        (
            ConnectionPool(http2_max_requests=2),
            CircuitBreaker.try_acquire_request,
            CircuitBreaker.release_request,
            Threshold.REQUESTS,
        ),
        (
            ConnectionPool(http1_max_pending_requests=2),
            CircuitBreaker.try_acquire_pending,
            CircuitBreaker.release_pending,
            Threshold.PENDING,
        ),
        (
            ConnectionPool(max_connections=2),
            CircuitBreaker.try_acquire_connection,
            CircuitBreaker.release_connection,
            Threshold.CONNECTIONS,
        ),
    ],
)
def test_threshold_overflows_and_recovers(
    pool: ConnectionPool,
    acquire: Callable[[CircuitBreaker], bool],
    release: Callable[[CircuitBreaker], None],
    threshold: Threshold,
) -> None:
    breaker = CircuitBreaker(pool)
    assert [acquire(breaker) for _ in range(3)] == [True, True, False]
    assert breaker.active(threshold) == 2
    assert breaker.overflows[threshold] == 1
    release(breaker)
    assert acquire(breaker)
    assert not acquire(breaker)
    assert breaker.overflows[threshold] == 2


def test_max_retries_and_budget_both_apply() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_retries=1))
    for _ in range(100):
        breaker.try_acquire_request()
    assert breaker.try_acquire_retry()
    assert not breaker.try_acquire_retry()  # maxRetries, although the budget allows 20
    breaker.release_retry()
    assert breaker.try_acquire_retry()

    budget_only = CircuitBreaker(budget=RetryBudget(budget_percent=20, min_retry_concurrency=3))
    assert [budget_only.try_acquire_retry() for _ in range(4)] == [True, True, True, False]
    assert budget_only.overflows[Threshold.RETRIES] == 1


def test_budget_can_be_disabled() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_retries=5), budget=None)
    assert sum(breaker.try_acquire_retry() for _ in range(10)) == 5


def test_release_never_goes_below_zero() -> None:
    breaker = CircuitBreaker(ConnectionPool(http2_max_requests=1))
    breaker.release_request()
    assert breaker.active(Threshold.REQUESTS) == 0
    assert breaker.try_acquire_request()
    assert not breaker.try_acquire_request()


def test_update_keeps_what_is_in_flight() -> None:
    breaker = CircuitBreaker(ConnectionPool(http2_max_requests=10))
    for _ in range(5):
        assert breaker.try_acquire_request()
    breaker.update(ConnectionPool(http2_max_requests=5))
    assert not breaker.try_acquire_request()
    breaker.release_request()
    assert breaker.try_acquire_request()
    breaker.update(None)
    assert breaker.limit(Threshold.REQUESTS) == UNLIMITED


@pytest.mark.parametrize(
    ("max_per_connection", "served", "reusable"),
    [(0, 10_000, True), (1, 0, True), (1, 1, False), (3, 2, True), (3, 3, False)],
)
def test_max_requests_per_connection(max_per_connection: int, served: int, reusable: bool) -> None:
    breaker = CircuitBreaker(ConnectionPool(max_requests_per_connection=max_per_connection))
    assert breaker.connection_reusable(served) is reusable


def test_snapshot_for_clusters() -> None:
    breaker = CircuitBreaker(ConnectionPool(http2_max_requests=1))
    breaker.try_acquire_request()
    breaker.try_acquire_request()
    snapshot = breaker.snapshot()
    assert snapshot["max_requests"] == {"limit": 1, "active": 1, "overflows": 1}
    assert snapshot["max_connections"]["limit"] == UNLIMITED
    assert snapshot["retry_budget"] == {
        "budget_percent": 20.0,
        "min_retry_concurrency": 3,
        "max_retries_now": 3,
    }
