"""Listeners: the app's outbound HTTP proxy, the inbound mTLS listener, TCP relays
and gateway listeners, each with its filter chain."""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.listener.v3 import listener_pb2

from . import access_log
from .protos import (
    ADS,
    FAULT,
    FAULT_FILTER,
    HCM,
    OPENTELEMETRY,
    ROUTER,
    TCP_PROXY,
    TLS_INSPECTOR,
    Json,
    parse,
    typed,
)


def address(host: str, port: int) -> Json:
    return {"socketAddress": {"address": host, "portValue": port}}


def router_filter() -> Json:
    return {"name": "envoy.filters.http.router", "typedConfig": typed(ROUTER)}


def fault_filter() -> Json:
    """The fault filter with no fault of its own: routes carry theirs."""
    return {"name": FAULT_FILTER, "typedConfig": typed(FAULT)}


def http_connection_manager(
    stat_prefix: str,
    *,
    route_config_name: str = "",
    route_config: Json | None = None,
    http_filters: Sequence[Json] = (),
    access_log_name: str,
    access_log_cluster: str,
    tracing: Json | None = None,
    extra: Json | None = None,
) -> Json:
    """An HCM normalising paths the way the Python sidecar does (RFC 3986 dot
    segments, merged slashes, encoded slashes rejected) and accepting absolute-form
    requests (the app's HTTP_PROXY). Routes come over RDS (ADS) by name, or inline."""
    body: Json = {
        "statPrefix": stat_prefix,
        "codecType": "AUTO",
        "httpProtocolOptions": {"allowAbsoluteUrl": True},
        "normalizePath": True,
        "mergeSlashes": True,
        "pathWithEscapedSlashesAction": "REJECT_REQUEST",
        # the Python proxies relay upgraded connections (WebSocket) too
        "upgradeConfigs": [{"upgradeType": "websocket"}],
        "httpFilters": [*http_filters, router_filter()],
    }
    if route_config is not None:
        body["routeConfig"] = route_config
    else:
        body["rds"] = {"configSource": ADS, "routeConfigName": route_config_name}
    logs = access_log.http_access_log(access_log_name, access_log_cluster)
    if logs:
        body["accessLog"] = logs
    if tracing:
        body["tracing"] = tracing
    body.update(extra or {})
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typedConfig": typed(HCM, body),
    }


def tracing(
    cluster: str, service: str, sampling: float, *, peer_tag: tuple[str, str, str] | None = None
) -> Json | None:
    """HCM `tracing` with Envoy's OpenTelemetry tracer (W3C trace context), exporting
    over OTLP gRPC to `cluster` (the sidecar's trace receiver, None when it runs none).
    A request that arrives with a sampling decision keeps it; one without is traced
    with probability `sampling` percent. Each HCM opens one span per request (no
    separate upstream span): its kind follows the listener's traffic direction.
    `peer_tag`: (tag, metadata namespace, key): a span tag filled from the request's
    dynamic metadata (the caller's peer metadata on the inbound)."""
    if not cluster:
        return None
    config: Json = {
        "randomSampling": {"value": sampling},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typedConfig": typed(
                OPENTELEMETRY,
                {"grpcService": {"envoyGrpc": {"clusterName": cluster}}, "serviceName": service},
            ),
        },
    }
    if peer_tag is not None:
        tag, namespace, key = peer_tag
        config["customTags"] = [
            {
                "tag": tag,
                "metadata": {
                    "kind": {"request": {}},
                    "metadataKey": {"key": namespace, "path": [{"key": key}]},
                },
            }
        ]
    return config


def tcp_proxy(
    stat_prefix: str,
    cluster: str,
    log_name: str,
    log_cluster: str,
    *,
    weighted: Sequence[tuple[str, int]] = (),
) -> Json:
    """To `cluster`, or with `weighted` (cluster, weight) pairs to one of them per
    connection (`weighted_clusters`, VirtualService `tcp` weights)."""
    body: Json = {"statPrefix": stat_prefix}
    if weighted:
        body["weightedClusters"] = {"clusters": [{"name": n, "weight": w} for n, w in weighted]}
    else:
        body["cluster"] = cluster
    logs = access_log.tcp_access_log(log_name, log_cluster)
    if logs:
        body["accessLog"] = logs
    return {"name": "envoy.filters.network.tcp_proxy", "typedConfig": typed(TCP_PROXY, body)}


def tls_inspector() -> Json:
    return {"name": "envoy.filters.listener.tls_inspector", "typedConfig": typed(TLS_INSPECTOR)}


def listener(
    name: str,
    bind: tuple[str, int],
    filter_chains: list[Json],
    *,
    listener_filters: Sequence[Json] = (),
    direction: str = "",
    continue_after_filter_timeout: bool = False,
) -> listener_pb2.Listener:
    """`direction`: `INBOUND` or `OUTBOUND`, Envoy's traffic direction (the kind of
    the spans its HCM opens: server or client). `continue_after_filter_timeout`: a
    connection the listener filters could not inspect in time (a server-first
    protocol) goes on to the chains instead of being closed."""
    body: Json = {"name": name, "address": address(*bind), "filterChains": filter_chains}
    if listener_filters:
        body["listenerFilters"] = list(listener_filters)
    if continue_after_filter_timeout:
        body["continueOnListenerFiltersTimeout"] = True
    if direction:
        body["trafficDirection"] = direction
    return parse(listener_pb2.Listener, body)  # type: ignore[return-value]
