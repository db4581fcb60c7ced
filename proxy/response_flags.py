"""Envoy's response flags (`%RESPONSE_FLAGS%`, the `response_flags` metric label), by
name. The values are Envoy's short codes, so a flag is written, joined, compared and
recorded exactly as the string it replaces (`ResponseFlag.UPSTREAM_OVERFLOW == "UO"`).

Declared in Envoy's order (its `CoreResponseFlag` enum), the order in which joined
flags are printed (`join_flags`). `RBAC_ACCESS_DENIED` is Meshwork's: an
authorization denial, which Envoy reports in its response code details instead.

Every module of `proxy` that produces or compares a flag names it here; the one
mapping from an upstream failure to its flag, status and details is
`proxy.upstream_failure.upstream_failure`.
"""

from __future__ import annotations

import enum


class ResponseFlag(enum.StrEnum):
    FAILED_LOCAL_HEALTH_CHECK = "LH"
    NO_HEALTHY_UPSTREAM = "UH"
    UPSTREAM_REQUEST_TIMEOUT = "UT"
    LOCAL_RESET = "LR"
    UPSTREAM_REMOTE_RESET = "UR"
    UPSTREAM_CONNECTION_FAILURE = "UF"
    UPSTREAM_CONNECTION_TERMINATION = "UC"
    UPSTREAM_OVERFLOW = "UO"
    NO_ROUTE_FOUND = "NR"
    DELAY_INJECTED = "DI"
    FAULT_INJECTED = "FI"
    RATE_LIMITED = "RL"
    UNAUTHORIZED_EXTERNAL_SERVICE = "UAEX"
    RATE_LIMIT_SERVICE_ERROR = "RLSE"
    DOWNSTREAM_CONNECTION_TERMINATION = "DC"
    UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"
    STREAM_IDLE_TIMEOUT = "SI"
    INVALID_ENVOY_REQUEST_HEADERS = "IH"
    DOWNSTREAM_PROTOCOL_ERROR = "DPE"
    UPSTREAM_MAX_STREAM_DURATION_REACHED = "UMSDR"
    RESPONSE_FROM_CACHE_FILTER = "RFCF"
    NO_FILTER_CONFIG_FOUND = "NFCF"
    DURATION_TIMEOUT = "DT"
    UPSTREAM_PROTOCOL_ERROR = "UPE"
    NO_CLUSTER_FOUND = "NC"
    OVERLOAD_MANAGER = "OM"
    DNS_RESOLUTION_FAILED = "DF"
    DROP_OVERLOAD = "DO"
    DOWNSTREAM_REMOTE_RESET = "DR"
    UNCONDITIONAL_DROP_OVERLOAD = "UDO"
    RBAC_ACCESS_DENIED = "RBAC"


# a flag's rank in Envoy's order, for joined flags
_FLAG_ORDER: dict[str, int] = {flag.value: rank for rank, flag in enumerate(ResponseFlag)}


def join_flags(*flags: str) -> str:
    """Response flags as Envoy prints them: comma-joined, each once, in Envoy's order
    ("" when there are none). Arguments may themselves be joined flags."""
    found = {f for flag in flags if flag for f in flag.split(",")}
    if len(found) <= 1:
        return next(iter(found), "")
    return ",".join(sorted(found, key=lambda f: _FLAG_ORDER.get(f, len(_FLAG_ORDER))))
