"""Circuit breaking for one destination (+ subset): Envoy's cluster thresholds. Pure.

One `CircuitBreaker` per upstream cluster (destination service, or one of its subsets),
shared by every request of the sidecar to it, counting what is in flight against the
DestinationRule's `connectionPool`:

- `tcp.maxConnections`: open upstream connections; at the limit a request waits for a
  connection as a *pending* request instead of opening one;
- `http.http1MaxPendingRequests`: requests waiting for a connection;
- `http.http2MaxRequests`: requests in flight (Istio's name; it applies to HTTP/1.1);
- `http.maxRetries`: retries in flight, and in addition the retry budget (20 % of the
  active and pending requests, at least 3).

A refused `try_acquire_*` for pending or active requests means: answer 503 at once,
flag `UO`. A refused connection means: queue (as pending) instead. A refused retry
means: return the last response as it is.

Istio leaves every threshold at 2^32-1 when unset (`getDefaultCircuitBreakerThresholds`),
so without a `connectionPool` only the retry budget limits anything. Envoy replaces
`max_retries` with the budget when one is configured; here both apply, so an explicit
`maxRetries` is never ignored and the budget always protects against retry storms.
"""

from __future__ import annotations

import enum
from typing import Any

from mesh.compiled import ConnectionPool

from .retry import RetryBudget

_DEFAULT_POOL = ConnectionPool()


class Threshold(enum.StrEnum):
    """The resources counted, named after Envoy's circuit-breaker thresholds."""

    CONNECTIONS = "max_connections"
    PENDING = "max_pending_requests"
    REQUESTS = "max_requests"
    RETRIES = "max_retries"


class CircuitBreaker:
    """In-flight counters of one upstream cluster and the limits they are held to."""

    __slots__ = ("_active", "_limits", "budget", "overflows", "pool")

    def __init__(
        self, pool: ConnectionPool | None = None, budget: RetryBudget | None = RetryBudget()
    ) -> None:
        self.pool = pool or _DEFAULT_POOL
        self.budget = budget
        self._active = dict.fromkeys(Threshold, 0)
        self._limits = self._limits_of(self.pool)
        # refusals per threshold, as Envoy's upstream_*_overflow counters
        self.overflows = dict.fromkeys(Threshold, 0)

    def update(self, pool: ConnectionPool | None) -> None:
        """New limits from a new DestinationRule; what is in flight stays counted."""
        self.pool = pool or _DEFAULT_POOL
        self._limits = self._limits_of(self.pool)

    # ------------------------------------------------------------ acquire / release

    def try_acquire_connection(self) -> bool:
        return self._acquire(Threshold.CONNECTIONS)

    def release_connection(self) -> None:
        self._release(Threshold.CONNECTIONS)

    def try_acquire_pending(self) -> bool:
        return self._acquire(Threshold.PENDING)

    def release_pending(self) -> None:
        self._release(Threshold.PENDING)

    def try_acquire_request(self) -> bool:
        return self._acquire(Threshold.REQUESTS)

    def release_request(self) -> None:
        self._release(Threshold.REQUESTS)

    def try_acquire_retry(self) -> bool:
        """A retry may start: under `maxRetries` and within the retry budget."""
        active = self._active
        if self.budget is not None and not self.budget.allows(
            active[Threshold.RETRIES], active[Threshold.REQUESTS], active[Threshold.PENDING]
        ):
            self.overflows[Threshold.RETRIES] += 1
            return False
        return self._acquire(Threshold.RETRIES)

    def release_retry(self) -> None:
        self._release(Threshold.RETRIES)

    def connection_reusable(self, requests_served: int) -> bool:
        """Whether a connection that has served `requests_served` requests may take
        another (`maxRequestsPerConnection`; 0 = unlimited)."""
        limit = self.pool.max_requests_per_connection
        return not limit or requests_served < limit

    # ------------------------------------------------------------ introspection

    def active(self, threshold: Threshold) -> int:
        return self._active[threshold]

    def limit(self, threshold: Threshold) -> int:
        return self._limits[threshold]

    def snapshot(self) -> dict[str, Any]:
        """Thresholds, what is in flight and refusals, for `/clusters`."""
        snapshot: dict[str, Any] = {
            t.value: {
                "limit": self._limits[t],
                "active": self._active[t],
                "overflows": self.overflows[t],
            }
            for t in Threshold
        }
        if self.budget is not None:
            snapshot["retry_budget"] = {
                "budget_percent": self.budget.budget_percent,
                "min_retry_concurrency": self.budget.min_retry_concurrency,
                "max_retries_now": self.budget.max_retries(
                    self._active[Threshold.REQUESTS], self._active[Threshold.PENDING]
                ),
            }
        return snapshot

    # ------------------------------------------------------------ internals

    def _acquire(self, threshold: Threshold) -> bool:
        if self._active[threshold] >= self._limits[threshold]:
            self.overflows[threshold] += 1
            return False
        self._active[threshold] += 1
        return True

    def _release(self, threshold: Threshold) -> None:
        # never below zero: a release after `update` or a double release must not
        # hand out capacity that does not exist
        if self._active[threshold] > 0:
            self._active[threshold] -= 1

    @staticmethod
    def _limits_of(pool: ConnectionPool) -> dict[Threshold, int]:
        return {
            Threshold.CONNECTIONS: pool.max_connections,
            Threshold.PENDING: pool.http1_max_pending_requests,
            Threshold.REQUESTS: pool.http2_max_requests,
            Threshold.RETRIES: pool.max_retries,
        }
