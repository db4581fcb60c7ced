"""Clusters and their endpoints: one EDS cluster per destination service and one per
DestinationRule subset (Istio's `outbound|<port>|<subset>|<fqdn>`), policies from the
subset's merged TrafficPolicy, and the ClusterLoadAssignments the Python balancer would
choose from."""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from mesh.compiled import UNLIMITED, ConnectionPool, OutlierDetection, TrafficPolicy
from mesh.messages import Endpoint

from . import tls
from .model import TranslationError
from .protos import ADS, HTTP_PROTOCOL_OPTIONS, Json, duration, parse, typed

# Istio's default connect timeout (`connectionPool.tcp.connectTimeout`)
DEFAULT_CONNECT_TIMEOUT_MS = 10_000
# Envoy's retry budget as the Python breaker applies it without `maxRetries`
RETRY_BUDGET_PERCENT = 20.0
RETRY_BUDGET_MIN_CONCURRENCY = 3
# Towards peer sidecars: the protocol the request arrived in (HTTP/2 and gRPC stay
# HTTP/2, over ALPN h2; HTTP/1.1 stays HTTP/1.1, so connection-pool limits count
# connections as the Python sidecar's HTTP/1.1 pool does). Envoy offers that protocol
# as the TLS ALPN (the upstream contexts name none), which both data planes accept.
UPSTREAM_PROTOCOL: Json = {
    "useDownstreamProtocolConfig": {"httpProtocolOptions": {}, "http2ProtocolOptions": {}}
}
# Towards the local app: what it declared (`--app-protocol`)
APP_HTTP1: Json = {"explicitHttpConfig": {"httpProtocolOptions": {}}}
APP_H2C: Json = {"explicitHttpConfig": {"http2ProtocolOptions": {}}}
# endpoint metadata key a cluster's transport_socket_matches select on
SOCKET_MATCH = "envoy.transport_socket_match"


def has_labels(endpoint: Endpoint, labels: Mapping[str, str]) -> bool:
    """Does the endpoint carry every label of a subset? `version` falls back to the
    instance's registered version (as `proxy.routing.balancer` does)."""
    for key, want in labels.items():
        value = endpoint.labels.get(key)
        if value is None and key == "version":
            value = endpoint.version or None
        if value != want:
            return False
    return True


def lb_endpoints(
    endpoints: Iterable[Endpoint],
    address_of: Callable[[Endpoint], str],
    resource: str,
) -> list[Json]:
    """The LbEndpoints of one cluster, as the Python balancer picks among them:
    `starting` instances are left out; `draining` ones are listed with health status
    DRAINING (no new requests) unless every remaining one is draining, when they are
    all kept serving (a draining instance still answers; an empty set fails all)."""
    live = [ep for ep in endpoints if ep.status != "starting"]
    all_draining = all(ep.status == "draining" for ep in live)
    out = []
    for ep in live:
        host, port = _socket_address(address_of(ep), f"{resource}.endpoints[{ep.instance}]")
        lb: Json = {
            "endpoint": {
                "address": {"socketAddress": {"address": host, "portValue": port}},
                "hostname": ep.instance,
            },
            "healthStatus": "DRAINING"
            if ep.status == "draining" and not all_draining
            else "HEALTHY",
        }
        if ep.identity:
            lb["metadata"] = {"filterMetadata": {SOCKET_MATCH: {"identity": ep.identity}}}
        out.append(lb)
    return out


def load_assignment(cluster_name: str, endpoints: list[Json]) -> endpoint_pb2.ClusterLoadAssignment:
    body: Json = {"clusterName": cluster_name}
    if endpoints:
        body["endpoints"] = [{"lbEndpoints": endpoints}]
    return parse(endpoint_pb2.ClusterLoadAssignment, body)  # type: ignore[return-value]


def _socket_address(text: str, field: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise TranslationError(
            "endpoint", field, text, "an endpoint address must be IP:PORT"
        ) from None
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise TranslationError("endpoint", field, text, "an endpoint address must be IP:PORT")
    return host, int(port)


def transport_socket_matches(endpoints: Sequence[Json], alpn: list[str] | None) -> list[Json]:
    """One mTLS transport socket per identity among the endpoints, each checking that
    exact SPIFFE ID (the Python sidecar checks each endpoint's own identity). Endpoints
    without an identity (no sidecar) take the cluster's plaintext default."""
    identities = sorted(
        {
            ep["metadata"]["filterMetadata"][SOCKET_MATCH]["identity"]
            for ep in endpoints
            if "metadata" in ep
        }
    )
    return [
        {
            "name": f"mtls:{identity}",
            "match": {"identity": identity},
            "transportSocket": tls.upstream_mtls(identity, alpn),
        }
        for identity in identities
    ]


def eds_cluster(
    name: str,
    policy: TrafficPolicy,
    endpoints: Sequence[Json],
    *,
    http: bool,
) -> cluster_pb2.Cluster:
    """An EDS (over ADS) cluster under `policy`. `endpoints` only decide which mTLS
    identities the cluster must be ready to check."""
    pool = policy.connection_pool
    body: Json = {
        "name": name,
        "type": "EDS",
        "edsClusterConfig": {"edsConfig": ADS, "serviceName": name},
        "connectTimeout": duration(pool.connect_timeout_ms if pool else DEFAULT_CONNECT_TIMEOUT_MS),
        "circuitBreakers": {"thresholds": [_thresholds(pool)]},
        # no explicit ALPN: Envoy offers the protocol `UPSTREAM_PROTOCOL` picked
        "transportSocketMatches": transport_socket_matches(endpoints, None),
        "transportSocket": tls.raw_buffer(),
        "commonLbConfig": {"healthyPanicThreshold": {"value": _panic_threshold(policy)}},
    }
    body.update(_lb_policy(policy))
    if http:
        body["typedExtensionProtocolOptions"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
                HTTP_PROTOCOL_OPTIONS, _http_options(pool)
            )
        }
    if policy.outlier_detection is not None:
        body["outlierDetection"] = _outlier(policy.outlier_detection)
    return parse(cluster_pb2.Cluster, body)  # type: ignore[return-value]


def static_cluster(
    name: str, host: str, port: int, *, http: bool, h2c: bool = False
) -> cluster_pb2.Cluster:
    """The local app (inbound clusters): one fixed plaintext endpoint, spoken to in
    HTTP/2 cleartext when `h2c` (the app declared `--app-protocol grpc|http2`)."""
    body: Json = {
        "name": name,
        "type": "STATIC",
        "connectTimeout": duration(DEFAULT_CONNECT_TIMEOUT_MS),
        "loadAssignment": {
            "clusterName": name,
            "endpoints": [
                {
                    "lbEndpoints": [
                        {
                            "endpoint": {
                                "address": {"socketAddress": {"address": host, "portValue": port}}
                            }
                        }
                    ]
                }
            ],
        },
        "circuitBreakers": {"thresholds": [_thresholds(None)]},
    }
    if http:
        body["typedExtensionProtocolOptions"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
                HTTP_PROTOCOL_OPTIONS, _http_options(None, APP_H2C if h2c else APP_HTTP1)
            )
        }
    return parse(cluster_pb2.Cluster, body)  # type: ignore[return-value]


def _lb_policy(policy: TrafficPolicy) -> Json:
    lb = policy.load_balancer
    if lb.consistent_hash is not None:  # takes precedence over `simple`, as in Istio
        return {
            "lbPolicy": "RING_HASH",
            "ringHashLbConfig": {"minimumRingSize": str(lb.consistent_hash.minimum_ring_size)},
        }
    return {"lbPolicy": lb.simple}


def _thresholds(pool: ConnectionPool | None) -> Json:
    """Connection-pool limits as circuit breakers. Envoy ignores `max_retries` once a
    retry budget is set, so the budget (the Python breaker's default) is given only
    while `maxRetries` is not."""
    pool = pool or ConnectionPool()
    out: Json = {
        "maxConnections": pool.max_connections,
        "maxPendingRequests": pool.http1_max_pending_requests,
        "maxRequests": pool.http2_max_requests,
    }
    if pool.max_retries == UNLIMITED:
        out["retryBudget"] = {
            "budgetPercent": {"value": RETRY_BUDGET_PERCENT},
            "minRetryConcurrency": RETRY_BUDGET_MIN_CONCURRENCY,
        }
    else:
        out["maxRetries"] = pool.max_retries
    return out


def _http_options(pool: ConnectionPool | None, protocol: Json | None = None) -> Json:
    pool = pool or ConnectionPool()
    common: Json = {"idleTimeout": duration(pool.idle_timeout_ms)}
    if pool.max_requests_per_connection:
        common["maxRequestsPerConnection"] = pool.max_requests_per_connection
    chosen: Json = copy.deepcopy(protocol or UPSTREAM_PROTOCOL)
    if pool.max_concurrent_streams:
        # DestinationRule `connectionPool.http.maxConcurrentStreams`: streams per h2
        # connection, as the Python h2 pool limits them (proxy/http/h2/streams.py)
        for config in chosen.values():
            if "http2ProtocolOptions" in config:
                config["http2ProtocolOptions"]["maxConcurrentStreams"] = pool.max_concurrent_streams
    return {**chosen, "commonHttpProtocolOptions": common}


def _enforcing(threshold: int) -> int:
    return 100 if threshold > 0 else 0


def _outlier(od: OutlierDetection) -> Json:
    """Istio's mapping: a threshold of 0 disables that detector (enforcing 0); success
    rate detection, on by default in Envoy, is off."""
    out: Json = {
        "interval": duration(od.interval_ms),
        "baseEjectionTime": duration(od.base_ejection_time_ms),
        "maxEjectionPercent": od.max_ejection_percent,
        "enforcingConsecutive5xx": _enforcing(od.consecutive_5xx_errors),
        "enforcingConsecutiveGatewayFailure": _enforcing(od.consecutive_gateway_errors),
        "enforcingSuccessRate": 0,
        "splitExternalLocalOriginErrors": od.split_external_local_origin_errors,
    }
    if od.consecutive_5xx_errors:
        out["consecutive5xx"] = od.consecutive_5xx_errors
    if od.consecutive_gateway_errors:
        out["consecutiveGatewayFailure"] = od.consecutive_gateway_errors
    if od.split_external_local_origin_errors:
        out["consecutiveLocalOriginFailure"] = od.consecutive_local_origin_failures
        out["enforcingConsecutiveLocalOriginFailure"] = _enforcing(
            od.consecutive_local_origin_failures
        )
    return out


def _panic_threshold(policy: TrafficPolicy) -> float:
    """`minHealthPercent`; without outlier detection 0: the Python balancer never
    spreads traffic over draining or ejected endpoints while a healthy one is left."""
    od = policy.outlier_detection
    return float(od.min_health_percent) if od is not None else 0.0


def black_hole(name: str) -> cluster_pb2.Cluster:
    """A cluster without endpoints: a tcp_proxy to it closes the connection (Istio's
    `BlackHoleCluster`)."""
    body: Json = {"name": name, "type": "STATIC", "connectTimeout": "10s"}
    return parse(cluster_pb2.Cluster, body)  # type: ignore[return-value]
