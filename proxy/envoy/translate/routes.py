"""VirtualService rules (`RouteTable.http`, gateway virtual hosts) -> Envoy routes.

Match conditions about the caller (`sourceLabels`, `sourceNamespace`, `gateways`) are
decided here, since the proxy being configured is the caller: a match that cannot
apply to it is left out, and a rule all of whose matches are left out disappears.
Conditions about the request become Envoy route matches with the Python proxy's
semantics (see `proxy.routing.match`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.compiled import (
    RETRY_ON_CONDITIONS,
    ConsistentHash,
    Destination,
    FaultInjection,
    HeaderOps,
    HTTPMatch,
    HTTPRoute,
    Mirror,
    Redirect,
    RetryPolicy,
    RouteTable,
    TrafficPolicy,
    WeightedDestination,
)
from mesh.hosts import service_of_host
from proxy.routing.balancer import resolve_subset
from proxy.telemetry.peer_metadata import PEER_METADATA_HEADER

from . import matchers
from .model import TranslationError
from .names import outbound_cluster
from .protos import FAULT, FAULT_FILTER, PREVIOUS_HOSTS, Json, duration, percent, typed

# Istio's gateway name for "the sidecars of the mesh"
MESH_GATEWAY = "mesh"
# Istio's `host_selection_retry_max_attempts` with the previous_hosts predicate
HOST_SELECTION_RETRY_MAX_ATTEMPTS = 5
# Envoy's backoff cap is 10x the base interval
BACKOFF_CAP_FACTOR = 10
_REDIRECT_CODES = {
    301: "MOVED_PERMANENTLY",
    302: "FOUND",
    303: "SEE_OTHER",
    307: "TEMPORARY_REDIRECT",
    308: "PERMANENT_REDIRECT",
}


@dataclass
class RouteContext:
    """The caller (this proxy) and the mesh it sees, plus what the routes refer to."""

    namespace: str
    labels: Mapping[str, str]
    # "" for a sidecar; the GatewayConfig's name ("<ns>/<name>", comma-joined when
    # several Gateways select the proxy) for a gateway
    gateway: str
    tables: Mapping[str, RouteTable | None]
    # (fqdn, subset) of every cluster a route or mirror names
    referenced: set[tuple[str, str]] = field(default_factory=set)
    # ServiceEntry hosts (`translate.egress`): requests to them leave the mesh
    external_hosts: frozenset[str] = frozenset()
    # the port a Host without one stands for in `port` matches (0: none)
    default_port: int = 0
    # (ServiceEntry host, subset, port) of every route naming a port of such a host
    external_ports: set[tuple[str, str, int]] = field(default_factory=set)
    # routes built for requests to this port only (a copy of a virtual host's routes
    # for a port some destination has `portLevelSettings` for; 0: any port)
    route_port: int = 0
    # (mesh host, subset, port) of every route using a port's own cluster
    port_clusters: set[tuple[str, str, int]] = field(default_factory=set)
    # how many routes built with this context went to a port's own cluster
    port_cluster_uses: int = 0

    def has_port_policy(self, host: str, subset: str, port: int) -> bool:
        policy = self.policy_of(host, subset)
        return policy is not None and any(p.port == port for p in policy.port_level)

    def at_gateway(self, gateways: tuple[str, ...]) -> bool:
        if not self.gateway:
            return MESH_GATEWAY in gateways
        return not set(gateways).isdisjoint(self.gateway.split(","))

    def applies(self, m: HTTPMatch) -> bool:
        """Can this match hold for requests from this proxy at all?"""
        if m.gateways and not self.at_gateway(m.gateways):
            return False
        if m.source_namespace and m.source_namespace != self.namespace:
            return False
        return all(self.labels.get(k) == v for k, v in m.source_labels.items())

    def policy_of(self, fqdn: str, subset: str) -> TrafficPolicy | None:
        table = self.tables.get(fqdn)
        if table is None:
            return TrafficPolicy() if not subset else None
        resolved = resolve_subset(table, subset)
        return resolved.traffic_policy if resolved is not None else None


def default_route(fqdn: str) -> HTTPRoute:
    """Istio's route for a service without VirtualService: all of its endpoints."""
    return HTTPRoute(
        name="default",
        route=(WeightedDestination(destination=Destination(host=fqdn)),),
        origin="default",
    )


def table_routes(table: RouteTable | None, fqdn: str) -> tuple[HTTPRoute, ...]:
    """The rules of a destination, the default route synthesised as the Python proxy
    does (`compile_routes`)."""
    if table is None or (not table.http and not table.has_virtual_service):
        return (default_route(fqdn),)
    return table.http


def http_routes(routes: tuple[HTTPRoute, ...], ctx: RouteContext, resource: str) -> list[Json]:
    out: list[Json] = []
    for i, route in enumerate(routes):
        where = f"{resource}.http[{i}]"
        name = route.name or f"{i}"
        if not route.match:
            out.append(_route(route, None, ctx, where, name))
            continue
        for j, m in enumerate(route.match):
            if ctx.applies(m):
                out.append(_route(route, m, ctx, f"{where}.match[{j}]", m.name or name))
    return out


def _route(route: HTTPRoute, m: HTTPMatch | None, ctx: RouteContext, where: str, name: str) -> Json:
    out: Json = {"name": name, "match": route_match(m, ctx.default_port)}
    if ctx.route_port:
        port_match = matchers.port_matcher(
            ctx.route_port, implicit=ctx.route_port == ctx.default_port
        )
        out["match"].setdefault("headers", []).append(port_match)
    if route.direct_response is not None:
        dr = route.direct_response
        body: Json = {"status": dr.status}
        if dr.body:
            body["body"] = {"inlineString": dr.body}
        out["directResponse"] = body
        return out
    if route.redirect is not None:
        out["redirect"] = _redirect(route.redirect, f"{where}.redirect")
        return out
    if not route.route:
        raise TranslationError(
            where, "route", (), "a rule needs destinations, a redirect or a direct response"
        )
    if len(route.route) > 1 and not any(d.weight > 0 for d in route.route):
        # the Python proxy answers 503 (NC); Envoy refuses weights summing to 0
        out["directResponse"] = {
            "status": 503,
            "body": {"inlineString": f"route {route.name or '<unnamed>'} has no positive weight"},
        }
        return out
    out["route"] = _route_action(route, m, ctx, where)
    _header_ops(out, route.headers.request, route.headers.response)
    if all(d.destination.host in ctx.external_hosts for d in route.route):
        # our peer metadata never leaves the mesh (a gateway passes on what it got)
        removals = out.setdefault("requestHeadersToRemove", [])
        if PEER_METADATA_HEADER not in removals:
            removals.append(PEER_METADATA_HEADER)
    if route.fault is not None:
        out["typedPerFilterConfig"] = {FAULT_FILTER: _fault(route.fault)}
    return out


def route_match(m: HTTPMatch | None, default_port: int = 0) -> Json:
    """`default_port`: the port a Host without one stands for (80 at a gateway and
    for ServiceEntry hosts, as the Python proxy reads it; 0: none, no port match)."""
    out: Json = {}
    if m is None or m.uri is None:
        out["prefix"] = "/"
    elif m.uri.kind == "exact":
        out["path"] = m.uri.value
    elif m.uri.kind == "prefix":
        out["prefix"] = m.uri.value
    else:
        out["safeRegex"] = {"regex": m.uri.value}
    if m is None:
        return out
    if m.ignore_uri_case and m.uri is not None and m.uri.kind != "regex":
        out["caseSensitive"] = False
    headers: list[Json] = []
    if m.method is not None:
        headers.append(matchers.header_matcher(":method", m.method))
    if m.scheme is not None:
        headers.append(matchers.header_matcher(":scheme", m.scheme))
    if m.authority is not None:
        headers.append(matchers.authority_matcher(m.authority))
    if m.port:
        headers.append(
            matchers.port_matcher(m.port, implicit=m.port_implicit or m.port == default_port)
        )
    for name, sm in m.headers.items():
        if name.lower() == "host":
            headers.append(matchers.authority_matcher(sm))
        else:
            headers.append(matchers.header_matcher(name.lower(), sm))
    for name, sm in m.without_headers.items():
        lowered = name.lower()
        headers.append(
            matchers.without_header_matcher(":authority" if lowered == "host" else lowered, sm)
        )
    if headers:
        out["headers"] = headers
    if m.query_params:
        out["queryParameters"] = [matchers.query_matcher(n, sm) for n, sm in m.query_params.items()]
    return out


def _mesh_host(host: str, where: str) -> str:
    if service_of_host(host) is None:
        raise TranslationError(
            where, "host", host, "not a mesh service (only mesh services can be routed to)"
        )
    return host


def _cluster_of(dest: Destination, ctx: RouteContext, where: str) -> str:
    # a ServiceEntry host is in `ctx.tables` too (`translate.egress`)
    host = dest.host if dest.host in ctx.tables else _mesh_host(dest.host, f"{where}.destination")
    if dest.port and host in ctx.external_hosts:
        # a ServiceEntry port named by the route: a cluster of that port
        ctx.external_ports.add((host, dest.subset, dest.port))
        return outbound_cluster(host, dest.subset, dest.port)
    port = dest.port or ctx.route_port
    if port and ctx.has_port_policy(host, dest.subset, port):
        # the port the route names, else the one asked for: its own policy
        ctx.port_clusters.add((host, dest.subset, port))
        ctx.port_cluster_uses += 1
        return outbound_cluster(host, dest.subset, port)
    ctx.referenced.add((host, dest.subset))
    return outbound_cluster(host, dest.subset)


def _route_action(route: HTTPRoute, m: HTTPMatch | None, ctx: RouteContext, where: str) -> Json:
    action: Json = {"timeout": duration(route.timeout_ms)}
    destinations = route.route
    single = destinations[0] if len(destinations) == 1 else None
    if single is not None and not _has_ops(single.headers.request, single.headers.response):
        action["cluster"] = _cluster_of(single.destination, ctx, f"{where}.route[0]")
    else:
        clusters = []
        for k, wd in enumerate(destinations):
            if single is None and wd.weight <= 0:
                continue
            entry: Json = {
                "name": _cluster_of(wd.destination, ctx, f"{where}.route[{k}]"),
                # a single destination takes all traffic whatever its weight (Istio)
                "weight": 1 if single is not None else wd.weight,
            }
            _header_ops(entry, wd.headers.request, wd.headers.response)
            authority = _authority_from_ops(wd.headers.request)
            if authority:
                entry["hostRewriteLiteral"] = authority
            clusters.append(entry)
        action["weightedClusters"] = {"clusters": clusters}
    rewrite = route.rewrite
    if rewrite is not None and rewrite.uri:
        if m is not None and m.uri is not None and m.uri.kind == "prefix":
            action["prefixRewrite"] = rewrite.uri
        else:
            # any other match, or none: the whole path (the query string is kept)
            action["regexRewrite"] = {"pattern": {"regex": "^.*$"}, "substitution": rewrite.uri}
    authority = (rewrite.authority if rewrite is not None else None) or _authority_from_ops(
        route.headers.request
    )
    if authority:
        action["hostRewriteLiteral"] = authority
    retry = _retry_policy(
        route.retries if route.retries is not None else RetryPolicy(), f"{where}.retries"
    )
    if retry is not None:
        action["retryPolicy"] = retry
    if route.mirror is not None:
        action["requestMirrorPolicies"] = [_mirror(route.mirror, ctx, f"{where}.mirror")]
    hash_policy = _hash_policy(route, ctx, where)
    if hash_policy:
        action["hashPolicy"] = hash_policy
    return action


def _has_ops(*ops: HeaderOps) -> bool:
    return any(o.set or o.add or o.remove for o in ops)


def _is_authority(name: str) -> bool:
    return name.lower() in ("host", ":authority")


def _authority_from_ops(ops: HeaderOps) -> str | None:
    """Istio turns `host` in headers.request.set/add into an authority rewrite."""
    for table in (ops.set, ops.add):
        for name, value in table.items():
            if _is_authority(name):
                return value
    return None


def _header_values(ops: HeaderOps) -> list[Json]:
    out = []
    for table, action in (
        (ops.set, "OVERWRITE_IF_EXISTS_OR_ADD"),
        (ops.add, "APPEND_IF_EXISTS_OR_ADD"),
    ):
        for name, value in table.items():
            if name.startswith(":") or _is_authority(name):
                continue  # never touched as headers (see `request_authority`)
            out.append({"header": {"key": name, "value": value}, "appendAction": action})
    return out


def _removals(ops: HeaderOps) -> list[str]:
    return [n for n in ops.remove if not n.startswith(":") and not _is_authority(n)]


def _header_ops(out: Json, request: HeaderOps, response: HeaderOps) -> None:
    for prefix, ops in (("request", request), ("response", response)):
        add = _header_values(ops)
        remove = _removals(ops)
        if add:
            out[f"{prefix}HeadersToAdd"] = add
        if remove:
            out[f"{prefix}HeadersToRemove"] = remove


def _redirect(redirect: Redirect, where: str) -> Json:
    code = redirect.redirect_code or 301
    if code not in _REDIRECT_CODES:
        raise TranslationError(
            where, "redirect_code", code, f"Envoy redirects only with {sorted(_REDIRECT_CODES)}"
        )
    out: Json = {"responseCode": _REDIRECT_CODES[code]}
    if redirect.uri:
        out["pathRedirect"] = redirect.uri
    if redirect.prefix_rewrite is not None:
        out["prefixRewrite"] = redirect.prefix_rewrite
    if redirect.authority:
        out["hostRedirect"] = redirect.authority
    if redirect.port:
        out["portRedirect"] = redirect.port
    if redirect.scheme:
        out["schemeRedirect"] = redirect.scheme
    return out


def _retry_policy(policy: RetryPolicy, where: str) -> Json | None:
    """Istio's retry policy. `attempts=0` disables retries (no policy)."""
    if policy.attempts <= 0:
        return None
    unknown = [c for c in policy.retry_on if c not in RETRY_ON_CONDITIONS]
    if unknown:
        raise TranslationError(where, "retry_on", unknown, "unknown retry condition")
    out: Json = {
        "retryOn": ",".join(policy.retry_on),
        "numRetries": policy.attempts,
        "retryBackOff": {
            "baseInterval": duration(policy.backoff_base_ms),
            "maxInterval": duration(policy.backoff_base_ms * BACKOFF_CAP_FACTOR),
        },
    }
    if policy.per_try_timeout_ms:
        out["perTryTimeout"] = duration(policy.per_try_timeout_ms)
    if policy.retriable_status_codes:
        out["retriableStatusCodes"] = list(policy.retriable_status_codes)
    if policy.ignore_previous_hosts:
        out["retryHostPredicate"] = [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typedConfig": typed(PREVIOUS_HOSTS),
            }
        ]
        out["hostSelectionRetryMaxAttempts"] = str(HOST_SELECTION_RETRY_MAX_ATTEMPTS)
    return out


def _fault(fault: FaultInjection) -> Json:
    body: Json = {}
    if fault.delay is not None:
        body["delay"] = {
            "fixedDelay": duration(fault.delay.fixed_delay_ms),
            "percentage": percent(fault.delay.percentage),
        }
    if fault.abort is not None:
        abort = fault.abort
        # Envoy answers a grpc_status abort with HTTP 200 itself (FaultAbort's oneof)
        status = (
            {"httpStatus": abort.http_status}
            if abort.grpc_status is None
            else {"grpcStatus": abort.grpc_status}
        )
        body["abort"] = {**status, "percentage": percent(abort.percentage)}
    return typed(FAULT, body)


def _mirror(mirror: Mirror, ctx: RouteContext, where: str) -> Json:
    cluster = _cluster_of(Destination(host=mirror.host, subset=mirror.subset), ctx, where)
    return {"cluster": cluster, "runtimeFraction": {"defaultValue": percent(mirror.percentage)}}


def _hash_policy(route: HTTPRoute, ctx: RouteContext, where: str) -> list[Json]:
    """The consistent-hash key of the destinations' load balancer. Envoy hashes per
    route, so destinations hashing on different keys cannot share one rule."""
    keys: set[ConsistentHash] = set()
    for wd in route.route:
        policy = ctx.policy_of(wd.destination.host, wd.destination.subset)
        if policy is not None and policy.load_balancer.consistent_hash is not None:
            keys.add(_hash_key(policy.load_balancer.consistent_hash))
    if not keys:
        return []
    if len(keys) > 1:
        raise TranslationError(
            where,
            "route[].destination",
            [wd.destination.host for wd in route.route],
            "destinations of one rule hash on different keys; Envoy hashes once per route",
        )
    return [_hash_json(keys.pop())]


def _hash_key(ch: ConsistentHash) -> ConsistentHash:
    # the ring size is the cluster's business, not the route's
    return ConsistentHash(
        http_header_name=ch.http_header_name,
        http_cookie=ch.http_cookie,
        use_source_ip=ch.use_source_ip,
        http_query_parameter_name=ch.http_query_parameter_name,
    )


def _hash_json(ch: ConsistentHash) -> Json:
    if ch.http_header_name:
        return {"header": {"headerName": ch.http_header_name}}
    if ch.http_cookie is not None:
        cookie: Json = {"name": ch.http_cookie.name}
        if ch.http_cookie.path:
            cookie["path"] = ch.http_cookie.path
        if ch.http_cookie.ttl_ms:
            cookie["ttl"] = duration(ch.http_cookie.ttl_ms)
        return {"cookie": cookie}
    if ch.use_source_ip:
        return {"connectionProperties": {"sourceIp": True}}
    if ch.http_query_parameter_name:
        return {"queryParameter": {"name": ch.http_query_parameter_name}}
    raise TranslationError("consistentHash", "key", ch, "no hash key set")
