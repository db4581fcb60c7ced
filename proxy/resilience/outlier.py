"""Outlier detection for one destination (+ subset): Envoy's consecutive-error ejection.

Pure state machine with an injected clock: the data path reports each attempt's
result with `on_result`, skips `ejected(now)` when picking endpoints, calls `tick(now)`
every `interval_s`, and tells the detector about endpoint changes (`set_endpoints`).

Semantics (Envoy `outlier_detection_impl.cc` as Istio configures it):
- an HTTP response of 500-599 counts towards `consecutive5xxErrors`, 502/503/504 also
  towards `consecutiveGatewayErrors`; any other response resets both counters;
- locally originated failures (`LocalOrigin`): without
  `splitExternalLocalOriginErrors` a connect failure or reset counts as a 503 and a
  timeout as a 504 (Envoy's `resultToHttpCode`); with it they count only towards
  `consecutiveLocalOriginFailures`, and a response or a successful connect resets that
  counter;
- reaching a threshold ejects the endpoint (a threshold of 0 never does) and resets
  that counter, whether or not the ejection was allowed;
- an ejection is allowed while the share of ejected endpoints is below
  `maxEjectionPercent`, so one endpoint can always be ejected (Envoy's documented
  "defaults to 10% but will eject at least one host regardless of the value", the
  check `100 * ejected / total < max` before the ejection);
- ejection time is `baseEjectionTime` times a multiplier that grows by one with each
  ejection and shrinks by one at each sweep the endpoint spends healthy, never beyond
  300 s (Envoy's `max_ejection_time` default, or `baseEjectionTime` when larger);
- when fewer than `minHealthPercent` % of the endpoints are healthy, `ejected` is
  empty and every endpoint takes traffic again (Envoy's panic threshold, which Istio
  sets from `minHealthPercent`; 0 disables it).

One deliberate difference: an endpoint takes traffic again as soon as its ejection
time is over (`ejected(now)` compares times), not at the next sweep as in Envoy, so a
late tick never keeps a recovered endpoint out; `tick` still does the bookkeeping.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from mesh.compiled import OutlierDetection

MAX_EJECTION_TIME_MS = 300_000
_GATEWAY_ERRORS = frozenset({502, 503, 504})


class LocalOrigin(enum.StrEnum):
    """Results the sidecar itself observes, rather than a status the upstream sent."""

    CONNECT_FAILED = "connect-failed"
    # the connection was reset or closed before a complete response (Envoy reports
    # upstream resets as connect failures to the detector)
    RESET = "reset"
    TIMEOUT = "timeout"
    CONNECT_SUCCESS = "connect-success"
    # a connect that is the whole outcome (a relayed TCP connection: no response
    # follows), Envoy's LocalOriginConnectSuccessFinal: counted as a 200 when errors
    # are not split
    CONNECT_SUCCESS_FINAL = "connect-success-final"


# how each local-origin result counts when errors are not split (Envoy resultToHttpCode)
_AS_STATUS = {
    LocalOrigin.CONNECT_FAILED: 503,
    LocalOrigin.RESET: 503,
    LocalOrigin.TIMEOUT: 504,
}


class EndpointHealth(NamedTuple):
    """One endpoint's detector state, for `/clusters` and `proxy-config endpoints`."""

    endpoint: str
    ejected: bool
    # monotonic time the current ejection ends (None when not ejected)
    ejected_until: float | None
    times_ejected: int
    ejection_multiplier: int
    consecutive_5xx: int
    consecutive_gateway_errors: int
    consecutive_local_origin_failures: int


@dataclass(slots=True)
class _Monitor:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    consecutive_local: int = 0
    ejected_until: float | None = None
    multiplier: int = 0
    times_ejected: int = 0


class OutlierDetector:
    """Per-endpoint error counters and ejections of one upstream cluster."""

    def __init__(self, config: OutlierDetection, endpoints: Iterable[str] = ()) -> None:
        self.config = config
        self._monitors: dict[str, _Monitor] = {}
        # ejections refused by maxEjectionPercent (Envoy's ejections_overflow)
        self.overflows = 0
        self.set_endpoints(endpoints)

    @property
    def interval_s(self) -> float:
        return self.config.interval_ms / 1000

    def update(self, config: OutlierDetection) -> None:
        """New settings from a new DestinationRule; counters and ejections stay."""
        self.config = config

    def set_endpoints(self, endpoints: Iterable[str]) -> None:
        """The cluster's endpoints now: new ones start healthy, removed ones are
        forgotten (with their ejection)."""
        wanted = dict.fromkeys(endpoints)
        self._monitors = {e: self._monitors.get(e) or _Monitor() for e in wanted}

    # ------------------------------------------------------------ events

    def on_result(self, endpoint: str, result: int | LocalOrigin, now: float) -> bool:
        """Count one attempt's result (an HTTP status or a `LocalOrigin`); True when it
        ejected `endpoint`. Results for unknown endpoints are ignored."""
        monitor = self._monitors.get(endpoint)
        if monitor is None:
            return False
        config = self.config
        if isinstance(result, LocalOrigin):
            if config.split_external_local_origin_errors:
                return self._local_origin(endpoint, monitor, result, now)
            if result is LocalOrigin.CONNECT_SUCCESS:
                return False
            result = 200 if result is LocalOrigin.CONNECT_SUCCESS_FINAL else _AS_STATUS[result]
        elif config.split_external_local_origin_errors:
            # a response means the connection worked (Envoy reports connect success
            # for every request that got a connection)
            monitor.consecutive_local = 0
        if not 500 <= result <= 599:
            monitor.consecutive_5xx = 0
            monitor.consecutive_gateway = 0
            return False
        ejected = False
        if result in _GATEWAY_ERRORS:
            monitor.consecutive_gateway += 1
            if monitor.consecutive_gateway == config.consecutive_gateway_errors:
                ejected = self._eject(monitor, now)
                monitor.consecutive_gateway = 0
        else:
            monitor.consecutive_gateway = 0
        monitor.consecutive_5xx += 1
        if monitor.consecutive_5xx == config.consecutive_5xx_errors:
            ejected = self._eject(monitor, now) or ejected
            monitor.consecutive_5xx = 0
        return ejected

    def tick(self, now: float) -> list[str]:
        """The interval sweep: the endpoints whose ejection ended, returned to service
        (their counters reset); healthy endpoints' multipliers shrink by one."""
        returned: list[str] = []
        for endpoint, monitor in self._monitors.items():
            if monitor.ejected_until is None:
                if monitor.multiplier:
                    monitor.multiplier -= 1
            elif now >= monitor.ejected_until:
                monitor.ejected_until = None
                # avoid re-ejecting on a few new errors after a counter stayed close
                monitor.consecutive_5xx = 0
                monitor.consecutive_gateway = 0
                returned.append(endpoint)
        return returned

    # ------------------------------------------------------------ queries

    def ejected(self, now: float) -> frozenset[str]:
        """Endpoints to skip now; empty below `minHealthPercent` healthy (panic)."""
        out = frozenset(
            e
            for e, m in self._monitors.items()
            if m.ejected_until is not None and now < m.ejected_until
        )
        total = len(self._monitors)
        if out and 100.0 * (total - len(out)) / total < self.config.min_health_percent:
            return frozenset()
        return out

    def snapshot(self, now: float) -> list[EndpointHealth]:
        return [
            EndpointHealth(
                endpoint=e,
                ejected=m.ejected_until is not None and now < m.ejected_until,
                ejected_until=m.ejected_until,
                times_ejected=m.times_ejected,
                ejection_multiplier=m.multiplier,
                consecutive_5xx=m.consecutive_5xx,
                consecutive_gateway_errors=m.consecutive_gateway,
                consecutive_local_origin_failures=m.consecutive_local,
            )
            for e, m in sorted(self._monitors.items())
        ]

    # ------------------------------------------------------------ internals

    def _local_origin(
        self, endpoint: str, monitor: _Monitor, result: LocalOrigin, now: float
    ) -> bool:
        if result is LocalOrigin.CONNECT_SUCCESS or result is LocalOrigin.CONNECT_SUCCESS_FINAL:
            monitor.consecutive_local = 0
            return False
        monitor.consecutive_local += 1
        if monitor.consecutive_local != self.config.consecutive_local_origin_failures:
            return False
        monitor.consecutive_local = 0
        return self._eject(monitor, now)

    def _eject(self, monitor: _Monitor, now: float) -> bool:
        if monitor.ejected_until is not None:
            return False  # already out (Envoy ignores errors charged while ejected)
        ejected_now = sum(1 for m in self._monitors.values() if m.ejected_until is not None)
        if 100.0 * ejected_now / len(self._monitors) >= self.config.max_ejection_percent:
            self.overflows += 1
            return False
        base = self.config.base_ejection_time_ms
        longest = max(MAX_EJECTION_TIME_MS, base)
        if monitor.multiplier * base < longest + base:
            monitor.multiplier += 1
        monitor.times_ejected += 1
        monitor.ejected_until = now + min(base * monitor.multiplier, longest) / 1000
        return True
