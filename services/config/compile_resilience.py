"""Pure compiler for the resilience fields of VirtualService and DestinationRule.

Semantics are Istio's, so a rule behaves as it would under Istio:
- a rule without `retries` keeps `retries=None` (the proxy applies Istio's default
  policy); `retries` with `attempts` absent or 0 disables retries; `retryOn` without
  numeric codes drops the default 503, numeric codes add `retriable-status-codes`
  (Istio's `retry.ConvertPolicy`);
- a fault or mirror percentage that is absent is 0 for faults and 100 for mirroring,
  and the deprecated integer `delay.percent` is used when `percentage` is absent;
- resource values of 0 in `connectionPool`, `maxEjectionPercent` and
  `consecutiveLocalOriginFailures` mean Istio's default, as Istio passes them to Envoy
  only when positive, while 0 in `consecutive5xxErrors` / `consecutiveGatewayErrors`
  disables that detector (Istio passes those on as they are).
"""

from __future__ import annotations

from mesh import compiled
from mesh.grpc_status import GRPC_STATUS_CODES
from mesh.hosts import canonical_host
from mesh.resources import (
    ConnectionPoolSettings,
    Destination,
    HTTPFaultInjection,
    HTTPRetry,
    HTTPSettings,
    OutlierDetection,
    Percent,
    TCPSettings,
    parse_duration_ms,
)

__all__ = [
    "compile_connection_pool",
    "compile_fault",
    "compile_mirror",
    "compile_outlier_detection",
    "compile_retries",
]

_DEFAULT_RETRY = compiled.RetryPolicy()
_DEFAULT_POOL = compiled.ConnectionPool()
_DEFAULT_OUTLIER = compiled.OutlierDetection()


# ---------------------------------------------------------------- VirtualService


def compile_retries(retries: HTTPRetry | None) -> compiled.RetryPolicy | None:
    if retries is None:
        return None
    if not retries.attempts:
        return compiled.RetryPolicy(attempts=0)
    retry_on, codes = _DEFAULT_RETRY.retry_on, _DEFAULT_RETRY.retriable_status_codes
    if retries.retry_on:
        tokens = [t for t in retries.retry_on.split(",") if t]
        codes = tuple(dict.fromkeys(int(t) for t in tokens if t.isdigit()))
        conditions = [t for t in dict.fromkeys(tokens) if not t.isdigit()]
        if codes and "retriable-status-codes" not in conditions:
            conditions.append("retriable-status-codes")
        retry_on = tuple(conditions)
    ignore = retries.retry_ignore_previous_hosts
    return compiled.RetryPolicy(
        attempts=retries.attempts,
        per_try_timeout_ms=_ms(retries.per_try_timeout),
        retry_on=retry_on,
        retriable_status_codes=codes,
        ignore_previous_hosts=True if ignore is None else ignore,
        backoff_base_ms=_ms(retries.backoff) or _DEFAULT_RETRY.backoff_base_ms,
    )


def compile_fault(fault: HTTPFaultInjection | None) -> compiled.FaultInjection | None:
    if fault is None:
        return None
    delay = abort = None
    if fault.delay is not None and fault.delay.fixed_delay is not None:
        d = fault.delay
        # Istio: `percentage` wins, else the deprecated integer `percent`, else 0
        share = d.percentage.value if d.percentage is not None else float(d.percent or 0)
        delay = compiled.FaultDelay(fixed_delay_ms=_ms(d.fixed_delay), percentage=share)
    spec = fault.abort
    if spec is not None and spec.grpc_status is not None:
        # Envoy's fault filter answers a gRPC status abort with HTTP 200
        abort = compiled.FaultAbort(
            http_status=200,
            grpc_status=GRPC_STATUS_CODES[spec.grpc_status],
            percentage=_percentage(spec.percentage),
        )
    elif spec is not None and spec.http_status is not None:
        abort = compiled.FaultAbort(
            http_status=spec.http_status, percentage=_percentage(spec.percentage)
        )
    return compiled.FaultInjection(delay=delay, abort=abort)


def compile_mirror(
    mirror: Destination | None, percentage: Percent | None, namespace: str
) -> compiled.Mirror | None:
    if mirror is None:
        return None
    return compiled.Mirror(
        host=canonical_host(mirror.host, namespace),
        subset=mirror.subset,
        port=mirror.port.number if mirror.port is not None else 0,
        # Istio: without mirrorPercentage every request is mirrored
        percentage=100.0 if percentage is None else percentage.value,
    )


# ---------------------------------------------------------------- DestinationRule


def compile_connection_pool(pool: ConnectionPoolSettings) -> compiled.ConnectionPool:
    tcp = pool.tcp or TCPSettings()
    http = pool.http or HTTPSettings()
    d = _DEFAULT_POOL
    return compiled.ConnectionPool(
        max_connections=tcp.max_connections or d.max_connections,
        connect_timeout_ms=_ms(tcp.connect_timeout) or d.connect_timeout_ms,
        http1_max_pending_requests=http.http1_max_pending_requests or d.http1_max_pending_requests,
        http2_max_requests=http.http2_max_requests or d.http2_max_requests,
        max_requests_per_connection=http.max_requests_per_connection
        or d.max_requests_per_connection,
        max_retries=http.max_retries or d.max_retries,
        idle_timeout_ms=_ms(http.idle_timeout) or d.idle_timeout_ms,
        max_concurrent_streams=http.max_concurrent_streams or d.max_concurrent_streams,
    )


def compile_outlier_detection(outlier: OutlierDetection) -> compiled.OutlierDetection:
    d = _DEFAULT_OUTLIER

    def explicit(value: int | None, default: int) -> int:
        # Istio passes 0 on to Envoy for these: 0 disables the detector
        return default if value is None else value

    return compiled.OutlierDetection(
        consecutive_5xx_errors=explicit(outlier.consecutive_5xx_errors, d.consecutive_5xx_errors),
        consecutive_gateway_errors=explicit(
            outlier.consecutive_gateway_errors, d.consecutive_gateway_errors
        ),
        consecutive_local_origin_failures=(
            outlier.consecutive_local_origin_failures or d.consecutive_local_origin_failures
        ),
        split_external_local_origin_errors=outlier.split_external_local_origin_errors,
        interval_ms=_ms(outlier.interval) or d.interval_ms,
        base_ejection_time_ms=_ms(outlier.base_ejection_time) or d.base_ejection_time_ms,
        max_ejection_percent=outlier.max_ejection_percent or d.max_ejection_percent,
        min_health_percent=outlier.min_health_percent or d.min_health_percent,
    )


# ---------------------------------------------------------------- values


def _ms(text: str | None) -> int:
    return parse_duration_ms(text) if text else 0


def _percentage(percent: Percent | None) -> float:
    return 0.0 if percent is None else percent.value
