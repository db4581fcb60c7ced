"""One upstream cluster in the sidecar: a destination service, or one of its subsets
(Istio makes each subset an Envoy cluster of its own), with the state that outlives
config and endpoint changes.

A `Cluster` owns the cluster's `CircuitBreaker` (in-flight requests, pending requests,
connections, retries and the retry budget), its `OutlierDetector` when the
DestinationRule sets `outlierDetection`, and the connection-pool options its upstream
pools follow. The balancer is rebuilt whenever the endpoints or the load-balancer
policy change (`Destination.cluster` does it); the breaker's counts and the detector's
ejections carry over.

Endpoint choice skips ejected endpoints strictly (none left: no healthy upstream,
unless the detector's panic rule gives them all back) and the endpoints this request
already tried softly (a repeat beats failing when nothing else is left).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from mesh.compiled import ConnectionPool, TrafficPolicy
from mesh.hosts import ServiceRef
from mesh.messages import Endpoint
from proxy.http.pool import ConnectionLimit
from proxy.resilience import CircuitBreaker, LocalOrigin, OutlierDetector
from proxy.routing import Balancer, HashContext
from proxy.upstream_tls import Origination

_NOTHING: frozenset[str] = frozenset()
# sweeps run late after a quiet spell are caught up one interval at a time, at most
# this many (the multiplier they shrink is small)
_MAX_CATCH_UP_SWEEPS = 64


@dataclass(frozen=True, slots=True, eq=False)
class PoolOptions:
    """How the connections of one cluster are made and kept (a DestinationRule's
    `connectionPool`). `owner` names the cluster: pools of different owners never
    share connections, so each cluster's limits count its own."""

    owner: str
    connect_timeout_s: float
    idle_timeout_s: float
    max_requests_per_connection: int
    limit: ConnectionLimit
    # HTTP/2 connections only; 0 = the peer's SETTINGS
    max_concurrent_streams: int = 0


class Cluster:
    """The balancer, circuit breaker and outlier detector of one cluster."""

    __slots__ = (
        "_ejected",
        "_ejected_until",
        "_next_sweep",
        "balancer",
        "breaker",
        "counters",
        "detector",
        "name",
        "origination",
        "policy",
        "pool_options",
        "ref",
        "subset",
    )

    def __init__(
        self, ref: ServiceRef, subset: str, policy: TrafficPolicy, balancer: Balancer
    ) -> None:
        self.ref = ref
        self.subset = subset
        self.name = f"{ref.namespace}/{ref.name}" + (f"/{subset}" if subset else "")
        self.breaker = CircuitBreaker(policy.connection_pool)
        self.detector: OutlierDetector | None = None
        self.pool_options: PoolOptions | None = None
        # DestinationRule `tls` other than ISTIO_MUTUAL (set by the destination, which
        # knows the host): how this cluster's connections are secured instead
        self.origination: Origination | None = None
        # what this sidecar did for the cluster, for /clusters
        self.counters = {"retries": 0, "retries_exhausted": 0, "overflows": 0, "timeouts": 0}
        self._ejected = _NOTHING
        self._ejected_until = math.inf
        self._next_sweep = math.inf
        self.policy = policy
        self.balancer = balancer
        self.update(policy, balancer)

    def update(self, policy: TrafficPolicy, balancer: Balancer) -> None:
        """A new traffic policy and/or endpoint set: limits and detector settings
        change, what is in flight and ejections stay."""
        if policy.connection_pool != self.policy.connection_pool:
            self.breaker.update(policy.connection_pool)
        if policy.connection_pool is None:
            self.pool_options = None
        elif self.pool_options is None or policy.connection_pool != self.policy.connection_pool:
            self.pool_options = _pool_options(self.name, policy.connection_pool, self.breaker)
        od = policy.outlier_detection
        if od is None:
            self.detector = None
            self._next_sweep = math.inf
        elif self.detector is None:
            self.detector = OutlierDetector(od)
            self._next_sweep = -math.inf  # scheduled from the first request's clock
        elif od != self.detector.config:
            self.detector.update(od)
        if self.detector is not None:
            self.detector.set_endpoints(ep.instance for ep in balancer.endpoints)
        self.policy = policy
        self.balancer = balancer
        self._forget_ejected()

    # ------------------------------------------------------------ per attempt

    def choose(self, ctx: HashContext | None, tried: frozenset[str], now: float) -> Endpoint | None:
        """The endpoint for an attempt; None when there is none (no endpoints, or all
        of them ejected)."""
        balancer = self.balancer
        if self.detector is None:
            return balancer.choose(ctx, tried)
        ejected = self.ejected(now)
        if not ejected:
            return balancer.choose(ctx, tried)
        if all(ep.instance in ejected for ep in balancer.endpoints):
            return None
        endpoint = balancer.choose(ctx, tried | ejected)
        if endpoint is not None and endpoint.instance in ejected:
            # every healthy endpoint was tried already: repeat one of them
            endpoint = balancer.choose(ctx, ejected)
        return endpoint

    def report(self, instance: str, result: int | LocalOrigin, now: float) -> None:
        """One attempt's result (an HTTP status or a local-origin failure), for the
        outlier detector."""
        detector = self.detector
        if detector is not None and detector.on_result(instance, result, now):
            self._forget_ejected()

    def ejected(self, now: float) -> frozenset[str]:
        """Endpoints out of rotation now (memoised until the earliest one returns)."""
        detector = self.detector
        if detector is None:
            return _NOTHING
        if now >= self._next_sweep:
            self._sweep(now)
        if now < self._ejected_until:
            return self._ejected
        ejected = detector.ejected(now)
        ends = [
            h.ejected_until
            for h in detector.snapshot(now)
            if h.ejected and h.ejected_until is not None
        ]
        self._ejected = ejected
        self._ejected_until = min(ends) if ends else math.inf
        return ejected

    # ------------------------------------------------------------ reporting

    def snapshot(self, now: float) -> dict[str, Any]:
        """For `/clusters`: breaker thresholds and counts, counters, and per endpoint
        the detector's view (None without outlier detection)."""
        detector = self.detector
        health: dict[str, dict[str, Any]] = {}
        if detector is not None:
            wall = time.time()
            for h in detector.snapshot(now):
                until = h.ejected_until if h.ejected else None
                health[h.endpoint] = {
                    "ejected": h.ejected,
                    "ejected_until": None if until is None else wall + (until - now),
                    "ejected_for_s": None if until is None else round(until - now, 3),
                    "times_ejected": h.times_ejected,
                    "consecutive_5xx": h.consecutive_5xx,
                    "consecutive_gateway_errors": h.consecutive_gateway_errors,
                    "consecutive_local_origin_failures": h.consecutive_local_origin_failures,
                }
        return {
            "circuit_breakers": self.breaker.snapshot(),
            "counters": dict(self.counters),
            "outlier_detection": detector is not None,
            "ejections_overflow": detector.overflows if detector is not None else 0,
            "endpoint_health": health,
        }

    # ------------------------------------------------------------ internals

    def _forget_ejected(self) -> None:
        self._ejected_until = -math.inf

    def _sweep(self, now: float) -> None:
        detector = self.detector
        assert detector is not None
        interval = detector.interval_s
        if self._next_sweep == -math.inf:
            self._next_sweep = now + interval
            return
        sweeps = 0
        while self._next_sweep <= now and sweeps < _MAX_CATCH_UP_SWEEPS:
            detector.tick(self._next_sweep)
            self._next_sweep += interval
            sweeps += 1
        if self._next_sweep <= now:
            self._next_sweep = now + interval
        self._forget_ejected()


def _pool_options(name: str, pool: ConnectionPool, limit: ConnectionLimit) -> PoolOptions:
    return PoolOptions(
        owner=name,
        connect_timeout_s=pool.connect_timeout_ms / 1000,
        idle_timeout_s=pool.idle_timeout_ms / 1000,
        max_requests_per_connection=pool.max_requests_per_connection,
        limit=limit,
        max_concurrent_streams=pool.max_concurrent_streams,
    )
