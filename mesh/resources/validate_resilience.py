"""Semantic validation of the resilience fields of VirtualService and DestinationRule.

Follows Istio's `pkg/config/validation` (`validateHTTPRetry`, `validateHTTPFaultInjection`,
`validatePercentage`, `ValidateConnectionPool`, `validateOutlierDetection`): durations of
at least 1ms with millisecond precision, percentages in range, `retryOn` tokens from
Envoy's documented set or HTTP status codes, fault statuses in 200-599 or a gRPC
status name. Where Istio
would accept a field that then has no effect, it is refused here with the reason, since
an ignored field is never silent in Meshwork: settings next to `attempts: 0`,
`mirrorPercentage` without `mirror`, `consecutiveLocalOriginFailures` without
`splitExternalLocalOriginErrors`, resilience settings on a rule without `route`, and
both the deprecated `percent` and `percentage` on one delay.
"""

from __future__ import annotations

import math
from http import HTTPStatus

from mesh.compiled import RETRY_ON_CONDITIONS
from mesh.grpc_status import GRPC_STATUS_CODES
from mesh.resources import checks
from mesh.resources.durations import parse_duration_exact_ms
from mesh.resources.errors import Issue, field, required
from mesh.resources.networking import (
    ConnectionPoolSettings,
    Destination,
    HTTPFaultInjection,
    HTTPRetry,
    HTTPRoute,
    OutlierDetection,
    Percent,
)

# Istio's proto fields are int32 / UInt32Value
MAX_INT32 = 2_147_483_647
MAX_UINT32 = 4_294_967_295
_STATUS_CODES = frozenset(int(s) for s in HTTPStatus)
_RETRY_ON_HINT = ", ".join(sorted(RETRY_ON_CONDITIONS))


def validate_route_resilience(rule: HTTPRoute, path: str, out: list[Issue]) -> None:
    """`retries`, `fault`, `mirror` and `mirrorPercentage` of one `http[]` rule."""
    for name, is_set in (
        ("retries", rule.retries is not None),
        ("fault", rule.fault is not None),
        ("mirror", rule.mirror is not None),
    ):
        if is_set and not rule.route:
            # Istio refuses fault with redirect/directResponse; retries and mirror
            # would have nothing to act on either
            out.append(Issue(field(path, name), "can only be used with route"))
    if rule.retries is not None:
        _retries(rule.retries, field(path, "retries"), out)
    if rule.fault is not None:
        _fault(rule.fault, field(path, "fault"), out)
    if rule.mirror is not None:
        mirror_destination(rule.mirror, field(path, "mirror"), out)
    if rule.mirror_percentage is not None:
        pct_path = field(path, "mirrorPercentage")
        if rule.mirror is None:
            out.append(Issue(pct_path, f"{pct_path} requires {field(path, 'mirror')}"))
        _percent(rule.mirror_percentage, pct_path, out)


def validate_traffic_policy_resilience(
    connection_pool: ConnectionPoolSettings | None,
    outlier: OutlierDetection | None,
    path: str,
    out: list[Issue],
) -> None:
    """`connectionPool` and `outlierDetection` of one `trafficPolicy` (top or subset)."""
    if connection_pool is not None:
        _connection_pool(connection_pool, field(path, "connectionPool"), out)
    if outlier is not None:
        _outlier_detection(outlier, field(path, "outlierDetection"), out)


def mirror_destination(dest: Destination, path: str, out: list[Issue]) -> None:
    _add(out, field(path, "host"), checks.host(dest.host, wildcard=False))
    if dest.subset:
        _add(out, field(path, "subset"), checks.dns_label(dest.subset))
    if dest.port is not None:
        _add(out, field(path, "port.number"), checks.port(dest.port.number))


# ---------------------------------------------------------------- VirtualService


def _retries(retries: HTTPRetry, path: str, out: list[Issue]) -> None:
    attempts_path = field(path, "attempts")
    if retries.attempts is not None and retries.attempts < 0:
        out.append(Issue(attempts_path, f"must not be negative, got {retries.attempts}"))
    if not retries.attempts:
        configured = [
            name
            for name, value in (
                ("perTryTimeout", retries.per_try_timeout),
                ("retryOn", retries.retry_on),
                ("retryIgnorePreviousHosts", retries.retry_ignore_previous_hosts),
                ("backoff", retries.backoff),
            )
            if value is not None
        ]
        if configured:
            # Istio refuses this too: attempts absent or 0 disables retries
            out.append(
                Issue(
                    attempts_path,
                    f"must be at least 1 when {' and '.join(configured)} "
                    f"{'is' if len(configured) == 1 else 'are'} set "
                    "(attempts absent or 0 disables retries)",
                )
            )
    for name, value in (("perTryTimeout", retries.per_try_timeout), ("backoff", retries.backoff)):
        if value is not None:
            _duration(value, field(path, name), out)
    if retries.retry_on is not None:
        retry_on_path = field(path, "retryOn")
        for token in retries.retry_on.split(","):
            problem = _retry_on_token(token)
            if problem is not None:
                out.append(Issue(retry_on_path, problem))


def _retry_on_token(token: str) -> str | None:
    if token in RETRY_ON_CONDITIONS:
        return None
    if token.isascii() and token.isdigit() and int(token) in _STATUS_CODES:
        return None
    # Istio splits on "," without trimming, so "5xx, reset" is refused there too
    return (
        f"{token!r} is not a valid retryOn condition (use a comma-separated list, "
        f"without spaces, of HTTP status codes or: {_RETRY_ON_HINT})"
    )


def _fault(fault: HTTPFaultInjection, path: str, out: list[Issue]) -> None:
    if fault.delay is None and fault.abort is None:
        out.append(Issue(path, "must set delay, abort or both"))
    if fault.delay is not None:
        delay = fault.delay
        delay_path = field(path, "delay")
        if delay.fixed_delay is None:
            out.append(required(field(delay_path, "fixedDelay")))
        else:
            _duration(delay.fixed_delay, field(delay_path, "fixedDelay"), out)
        if delay.percentage is not None:
            _percent(delay.percentage, field(delay_path, "percentage"), out)
            if delay.percent is not None:
                out.append(
                    Issue(
                        field(delay_path, "percent"),
                        "must not be set together with percentage (percent is deprecated)",
                    )
                )
        percent = delay.percent
        if percent is not None and not 0 <= percent <= 100:
            out.append(
                Issue(field(delay_path, "percent"), f"must be between 0 and 100, got {percent}")
            )
    if fault.abort is not None:
        abort = fault.abort
        abort_path = field(path, "abort")
        status_path = field(abort_path, "httpStatus")
        grpc_path = field(abort_path, "grpcStatus")
        if abort.http_status is not None and abort.grpc_status is not None:
            # one field of Istio's `error_type` oneof
            out.append(Issue(grpc_path, "must not be set together with httpStatus"))
        elif abort.grpc_status is not None:
            if abort.grpc_status not in GRPC_STATUS_CODES:
                out.append(
                    Issue(
                        grpc_path,
                        f"{abort.grpc_status!r} is not a gRPC status name "
                        f"(one of: {', '.join(GRPC_STATUS_CODES)})",
                    )
                )
        elif abort.http_status is None:
            out.append(required(status_path))
        elif not 200 <= abort.http_status <= 599:
            out.append(Issue(status_path, f"must be between 200 and 599, got {abort.http_status}"))
        if abort.percentage is not None:
            _percent(abort.percentage, field(abort_path, "percentage"), out)


def _percent(percent: Percent, path: str, out: list[Issue]) -> None:
    value = percent.value
    value_path = field(path, "value")
    if not math.isfinite(value) or not 0 <= value <= 100:
        out.append(Issue(value_path, f"must be between 0 and 100, got {value}"))
    elif 0 < value < 0.0001:
        # Envoy counts in millionths: a smaller share would silently become 0
        out.append(Issue(value_path, f"must be 0 or at least 0.0001, got {value}"))


# ---------------------------------------------------------------- DestinationRule


def _connection_pool(pool: ConnectionPoolSettings, path: str, out: list[Issue]) -> None:
    if pool.tcp is None and pool.http is None:
        out.append(Issue(path, "must set tcp, http or both"))
    if pool.tcp is not None:
        tcp_path = field(path, "tcp")
        _count(pool.tcp.max_connections, field(tcp_path, "maxConnections"), MAX_INT32, out)
        if pool.tcp.connect_timeout is not None:
            _duration(pool.tcp.connect_timeout, field(tcp_path, "connectTimeout"), out)
    if pool.http is not None:
        http = pool.http
        http_path = field(path, "http")
        for name, value in (
            ("http1MaxPendingRequests", http.http1_max_pending_requests),
            ("http2MaxRequests", http.http2_max_requests),
            ("maxRequestsPerConnection", http.max_requests_per_connection),
            ("maxRetries", http.max_retries),
            ("maxConcurrentStreams", http.max_concurrent_streams),
        ):
            _count(value, field(http_path, name), MAX_INT32, out)
        if http.idle_timeout is not None:
            _duration(http.idle_timeout, field(http_path, "idleTimeout"), out)


def _outlier_detection(outlier: OutlierDetection, path: str, out: list[Issue]) -> None:
    for name, value in (
        ("consecutive5xxErrors", outlier.consecutive_5xx_errors),
        ("consecutiveGatewayErrors", outlier.consecutive_gateway_errors),
        ("consecutiveLocalOriginFailures", outlier.consecutive_local_origin_failures),
    ):
        _count(value, field(path, name), MAX_UINT32, out)
    if (
        outlier.consecutive_local_origin_failures is not None
        and not outlier.split_external_local_origin_errors
    ):
        local_path = field(path, "consecutiveLocalOriginFailures")
        out.append(
            Issue(
                local_path,
                f"{local_path} takes effect only with splitExternalLocalOriginErrors: true",
            )
        )
    for name, text in (
        ("interval", outlier.interval),
        ("baseEjectionTime", outlier.base_ejection_time),
    ):
        if text is not None:
            _duration(text, field(path, name), out)
    for name, value in (
        ("maxEjectionPercent", outlier.max_ejection_percent),
        ("minHealthPercent", outlier.min_health_percent),
    ):
        if value is not None and not 0 <= value <= 100:
            out.append(Issue(field(path, name), f"must be between 0 and 100, got {value}"))


# ---------------------------------------------------------------- values


def _duration(text: str, path: str, out: list[Issue]) -> None:
    """Istio's `ValidateDuration`: at least 1ms, whole milliseconds."""
    try:
        ms = parse_duration_exact_ms(text)
    except ValueError as exc:
        out.append(Issue(path, str(exc)))
        return
    if ms < 1:
        out.append(Issue(path, f"must be at least 1ms, got {text!r}"))
    elif ms != ms.to_integral_value():
        out.append(Issue(path, f"must be a whole number of milliseconds, got {text!r}"))


def _count(value: int | None, path: str, maximum: int, out: list[Issue]) -> None:
    if value is not None and not 0 <= value <= maximum:
        out.append(Issue(path, f"must be between 0 and {maximum}, got {value}"))


def _add(out: list[Issue], path: str, problem: str | None) -> None:
    if problem is not None:
        out.append(Issue(path, problem))
