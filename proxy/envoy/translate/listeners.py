"""Listeners: the app's outbound HTTP proxy, the inbound mTLS listener, TCP relays
and gateway listeners, each with its filter chain."""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.listener.v3 import listener_pb2

from proxy.response_flags import ResponseFlag

from . import access_log
from .protos import (
    ADS,
    FAULT,
    FAULT_FILTER,
    HCM,
    OPENTELEMETRY,
    PARENT_BASED_SAMPLER,
    ROUTER,
    TCP_PROXY,
    TLS_INSPECTOR,
    TRACE_ID_RATIO_SAMPLER,
    UUID_REQUEST_ID,
    Json,
    parse,
    percent,
    typed,
)


def address(host: str, port: int) -> Json:
    return {"socketAddress": {"address": host, "portValue": port}}


# Every socket listener binds without SO_REUSEPORT (Envoy's default sets it): a port
# another process holds (another Envoy included) then fails the bind, as on the Python
# data plane, instead of two listeners silently sharing connections. Envoy's workers
# share the one socket (duplicated), and an in-place update of a listener keeps it
# (architecture §5.2, "Listener sockets").
NO_REUSE_PORT: Json = {"enableReusePort": False}


def router_filter() -> Json:
    return {"name": "envoy.filters.http.router", "typedConfig": typed(ROUTER)}


def fault_filter() -> Json:
    """The fault filter with no fault of its own: routes carry theirs."""
    return {"name": FAULT_FILTER, "typedConfig": typed(FAULT)}


# A gRPC request whose route timeout expired (flag UT) ends DEADLINE_EXCEEDED (4), as
# on the Python data plane (`proxy/http/local_reply.py`); Envoy's own mapping of its
# 504 would say UNAVAILABLE. Envoy keeps a grpc-status a mapper set on its trailers-only
# local reply; every other local reply keeps Envoy's HTTP-to-gRPC mapping, which is
# the Python proxy's.
_UPSTREAM_TIMEOUT = ResponseFlag.UPSTREAM_REQUEST_TIMEOUT.value
GRPC_LOCAL_REPLIES: Json = {
    "mappers": [
        {
            "filter": {
                "andFilter": {
                    "filters": [
                        {"responseFlagFilter": {"flags": [_UPSTREAM_TIMEOUT]}},
                        {
                            "headerFilter": {
                                "header": {
                                    "name": "content-type",
                                    "stringMatch": {"prefix": "application/grpc"},
                                }
                            }
                        },
                    ]
                }
            },
            "headersToAdd": [
                {
                    "header": {"key": "grpc-status", "value": "4"},
                    "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }
    ]
}


def http_connection_manager(
    stat_prefix: str,
    *,
    route_config_name: str = "",
    route_config: Json | None = None,
    http_filters: Sequence[Json] = (),
    access_log_name: str,
    access_log_cluster: str,
    telemetry_mode: access_log.TelemetryMode = "access-log",
    tracing: Json | None = None,
    extra: Json | None = None,
) -> Json:
    """An HCM normalising paths the way the Python sidecar does (RFC 3986 dot
    segments, merged slashes, encoded slashes rejected, a trailing Host dot stripped)
    and accepting absolute-form
    requests (the app's HTTP_PROXY). Routes come over RDS (ADS) by name, or inline."""
    body: Json = {
        "statPrefix": stat_prefix,
        "codecType": "AUTO",
        # trailers reach HTTP/1.1 clients in the last chunk (gRPC status for an h1
        # caller), as the Python engine does (architecture §5.3: it sends them only
        # to a client that sent `TE: trailers`)
        "httpProtocolOptions": {"allowAbsoluteUrl": True, "enableTrailers": True},
        "normalizePath": True,
        "mergeSlashes": True,
        "pathWithEscapedSlashesAction": "REJECT_REQUEST",
        # `reviews.default.` is `reviews.default` to routing and authorization, and is
        # forwarded without the dot, as by the Python engine (architecture §6)
        "stripTrailingHostDot": True,
        # the Python proxies relay upgraded connections (WebSocket) too
        "upgradeConfigs": [{"upgradeType": "websocket"}],
        "httpFilters": [*http_filters, router_filter()],
        "localReplyConfig": GRPC_LOCAL_REPLIES,
    }
    if route_config is not None:
        body["routeConfig"] = route_config
    else:
        body["rds"] = {"configSource": ADS, "routeConfigName": route_config_name}
    logs = access_log.http_access_log(access_log_name, access_log_cluster, telemetry_mode)
    if logs:
        body["accessLog"] = logs
    if tracing:
        body["tracing"] = tracing
        body["requestIdExtension"] = REQUEST_ID_NOT_FOR_SAMPLING
    body.update(extra or {})
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typedConfig": typed(HCM, body),
    }


# Tracing samples by the W3C trace context, not by Envoy's request id: the request
# id's trace status is reset wherever Envoy takes a request as external (the app's
# connection to the outbound listener is one), which would drop a sampled trace at a
# middle hop whose app forwards only `traceparent` (all the Python proxy needs)
REQUEST_ID_NOT_FOR_SAMPLING: Json = {
    "typedConfig": typed(UUID_REQUEST_ID, {"useRequestIdForTraceSampling": False})
}


def sampler(sampling: float) -> Json:
    """OpenTelemetry's parent-based sampler: a request whose `traceparent` carries a
    decision keeps it; one without is sampled with probability `sampling` percent
    (by trace id), as the Python proxy decides (`proxy.telemetry.tracing`)."""
    ratio: Json = {
        "name": "envoy.tracers.opentelemetry.samplers.trace_id_ratio_based",
        "typedConfig": typed(TRACE_ID_RATIO_SAMPLER, {"samplingPercentage": percent(sampling)}),
    }
    return {
        "name": "envoy.tracers.opentelemetry.samplers.parent_based",
        "typedConfig": typed(PARENT_BASED_SAMPLER, {"wrappedSampler": ratio}),
    }


def tracing(
    cluster: str, service: str, sampling: float, *, peer_tag: tuple[str, str, str] | None = None
) -> Json | None:
    """HCM `tracing` with Envoy's OpenTelemetry tracer (W3C trace context), exporting
    over OTLP gRPC to `cluster` (the sidecar's trace receiver, None when it runs none).
    The sampler decides (`sampler`); the HCM's own sampling lets every request reach it
    (`http_connection_manager` turns off request-id sampling). Each HCM opens one span
    per request (no separate upstream span): its kind follows the listener's traffic
    direction. `peer_tag`: (tag, metadata namespace, key): a span tag filled from the
    request's dynamic metadata (the caller's peer metadata on the inbound)."""
    if not cluster:
        return None
    config: Json = {
        "randomSampling": {"value": 100.0},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typedConfig": typed(
                OPENTELEMETRY,
                {
                    "grpcService": {"envoyGrpc": {"clusterName": cluster}},
                    "serviceName": service,
                    "sampler": sampler(sampling),
                },
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
    hash_source_ip: bool = False,
) -> Json:
    """To `cluster`, or with `weighted` (cluster, weight) pairs to one of them per
    connection (`weighted_clusters`, VirtualService `tcp` weights). `hash_source_ip`:
    the cluster's consistent hash keys on the client's address (a DestinationRule's
    `consistentHash.useSourceIp`, the only key a TCP connection has, as in Istio)."""
    body: Json = {"statPrefix": stat_prefix}
    if hash_source_ip:
        body["hashPolicy"] = [{"sourceIp": {}}]
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
    body: Json = {
        "name": name,
        "address": address(*bind),
        "filterChains": filter_chains,
        **NO_REUSE_PORT,
    }
    if listener_filters:
        body["listenerFilters"] = list(listener_filters)
    if continue_after_filter_timeout:
        body["continueOnListenerFiltersTimeout"] = True
    if direction:
        body["trafficDirection"] = direction
    return parse(listener_pb2.Listener, body)  # type: ignore[return-value]
