"""Pure compiler: validated resources -> the tables proxies apply (`mesh.compiled`).

The config service's leader calls these on an immutable snapshot of every stored
resource after each change and publishes the result per destination / gateway. They
do no I/O and are deterministic (same input, equal Structs), so the caller can skip a
publish when a recompiled table equals the previous one.

Istio semantics kept here:
- a VirtualService applies to sidecars when `gateways` is empty or lists `mesh`; a
  match limited by its own `gateways` applies only where those gateways are;
- hosts (`reviews`, `reviews.default`, FQDN) are resolved in the namespace of the
  resource that names them;
- several VirtualServices for one host contribute rules oldest first;
- a subset's traffic policy replaces the destination-level one field by field
  (`loadBalancer`, `connectionPool`, `outlierDetection`: each the subset's if set,
  else the top-level one, as Istio's `MergeTrafficPolicy` does).

Retries, faults, mirrors, connection pools and outlier detection compile in
`compile_resilience`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal

from mesh import compiled
from mesh.hosts import ServiceRef, canonical_host, host_matches, service_of_host
from mesh.resources import (
    MESH_GATEWAY,
    DestinationRuleSpec,
    GatewaySpec,
    HeaderOperations,
    Headers,
    HTTPMatchRequest,
    HTTPRoute,
    HTTPRouteDestination,
    LoadBalancerSettings,
    PortTrafficPolicy,
    Resource,
    StringMatch,
    TrafficPolicy,
    VirtualServiceSpec,
    parse_duration_ms,
)
from services.config.compile_gateway_api import (
    gateway_api_routes,
    gateway_api_routing,
    services_named_by_gateway_api,
)
from services.config.compile_kubernetes import (
    kubernetes_aliases,
    kubernetes_default_route,
    kubernetes_subsets,
)
from services.config.compile_l4 import compile_l4_routes
from services.config.compile_resilience import (
    compile_connection_pool,
    compile_fault,
    compile_mirror,
    compile_outlier_detection,
    compile_retries,
)
from services.config.compile_tls import compile_client_tls, with_port_levels

__all__ = [
    "compile_gateway_config",
    "compile_host_table",
    "compile_route_table",
    "services_named",
]

# canonical match gateways -> the gateways to keep on the match, or None to drop it
GatewayFilter = Callable[[tuple[str, ...]], tuple[str, ...] | None]

_SimpleLB = Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"]
_SIMPLE_LB: Mapping[str, _SimpleLB] = {
    "ROUND_ROBIN": "ROUND_ROBIN",
    "LEAST_REQUEST": "LEAST_REQUEST",
    "LEAST_CONN": "LEAST_REQUEST",  # Istio's deprecated name for the same algorithm
    "RANDOM": "RANDOM",
}
_DEFAULT_RING_SIZE = compiled.ConsistentHash().minimum_ring_size
_DEFAULT_REDIRECT_CODE = compiled.Redirect().redirect_code


# ---------------------------------------------------------------- sidecars


def compile_route_table(
    resources: Sequence[Resource], service: ServiceRef, revision: int
) -> compiled.RouteTable:
    """What a client sidecar needs to send to `service`.

    `resources` must be in creation order (oldest first): it decides rule order when
    several VirtualServices name the service, and which DestinationRule wins a tie.
    """
    return compile_host_table(resources, service.fqdn, service.namespace, service.name, revision)


def compile_host_table(
    resources: Sequence[Resource], fqdn: str, namespace: str, name: str, revision: int
) -> compiled.RouteTable:
    """The route table of one canonical host: a mesh service's FQDN, or a ServiceEntry
    host (then `name` is the host and `namespace` the ServiceEntry's)."""
    rules: list[compiled.HTTPRoute] = []
    tcp_rules: list[compiled.L4Route] = []
    tls_rules: list[compiled.L4Route] = []
    for resource, spec in _virtual_services(resources):
        vs_namespace = resource.metadata.namespace
        if spec.gateways and MESH_GATEWAY not in spec.gateways:
            continue
        if any(host_matches(canonical_host(h, vs_namespace), fqdn) for h in spec.hosts):
            rules.extend(_http_routes(resource, spec, _keep_for_mesh))
            tcp, tls = compile_l4_routes(resource, spec, _keep_for_mesh)
            tcp_rules.extend(tcp)
            tls_rules.extend(tls)
    # a mesh service (not a ServiceEntry host): Gateway API routes and Kubernetes
    # Services name it (docs/architecture.md §8)
    service: ServiceRef | None = ServiceRef(namespace, name)
    if service is not None and service.fqdn != fqdn:
        service = None
    if service is not None:
        # Gateway API routes attached to the service come after its VirtualService rules
        rules.extend(gateway_api_routes(resources, service))
        if not rules and (k8s := kubernetes_default_route(resources, service)) is not None:
            rules.append(k8s)
    subsets, traffic_policy = _destination_policy(resources, fqdn, namespace)
    if service is not None:
        subsets += kubernetes_subsets(resources, service, traffic_policy)
    return compiled.RouteTable(
        namespace=namespace,
        service=name,
        host=fqdn,
        revision=revision,
        http=tuple(rules),
        subsets=subsets,
        traffic_policy=traffic_policy,
        has_virtual_service=bool(rules),
        tcp=tuple(tcp_rules),
        tls=tuple(tls_rules),
        aliases=kubernetes_aliases(resources, service) if service is not None else (),
    )


def _keep_for_mesh(gateways: tuple[str, ...]) -> tuple[str, ...] | None:
    if gateways and MESH_GATEWAY not in gateways:
        return None
    return gateways


def _destination_policy(
    resources: Sequence[Resource], fqdn: str, namespace: str
) -> tuple[tuple[compiled.Subset, ...], compiled.TrafficPolicy]:
    """Subsets and policy from the one DestinationRule that applies to host `fqdn` of
    `namespace`.

    Preference: a rule in the service's own namespace, then an exact host over a
    wildcard (longer wildcard first), then the oldest.
    """
    best: tuple[tuple[bool, bool, int, int], DestinationRuleSpec] | None = None
    for position, resource in enumerate(resources):
        spec = resource.spec
        if not isinstance(spec, DestinationRuleSpec):
            continue
        pattern = canonical_host(spec.host, resource.metadata.namespace)
        if not host_matches(pattern, fqdn):
            continue
        rank = (
            resource.metadata.namespace != namespace,
            pattern != fqdn,
            -len(pattern),
            position,
        )
        if best is None or rank < best[0]:
            best = (rank, spec)
    if best is None:
        return (), compiled.TrafficPolicy()
    rule = best[1]
    top = _traffic_policy(rule.traffic_policy, compiled.TrafficPolicy())
    subsets = tuple(
        compiled.Subset(
            name=s.name,
            labels=dict(s.labels),
            traffic_policy=_traffic_policy(s.traffic_policy, top),
        )
        for s in rule.subsets
    )
    return subsets, top


def _traffic_policy(
    policy: TrafficPolicy | None, inherited: compiled.TrafficPolicy
) -> compiled.TrafficPolicy:
    if policy is None:
        return inherited
    base = _policy_fields(policy, inherited)
    return with_port_levels(policy, base, inherited.port_level, _policy_fields)


def _policy_fields(
    policy: TrafficPolicy | PortTrafficPolicy, inherited: compiled.TrafficPolicy
) -> compiled.TrafficPolicy:
    """The fields `policy` sets, over `inherited` (no port-level entries)."""
    return compiled.TrafficPolicy(
        tls=inherited.tls if policy.tls is None else compile_client_tls(policy.tls),
        load_balancer=(
            inherited.load_balancer
            if policy.load_balancer is None
            else _load_balancer(policy.load_balancer)
        ),
        connection_pool=(
            inherited.connection_pool
            if policy.connection_pool is None
            else compile_connection_pool(policy.connection_pool)
        ),
        outlier_detection=(
            inherited.outlier_detection
            if policy.outlier_detection is None
            else compile_outlier_detection(policy.outlier_detection)
        ),
    )


def _load_balancer(lb: LoadBalancerSettings) -> compiled.LoadBalancer:
    ch = lb.consistent_hash
    if ch is None:
        return compiled.LoadBalancer(simple=_SIMPLE_LB[lb.simple or "ROUND_ROBIN"])
    cookie = None
    if ch.http_cookie is not None:
        ttl = ch.http_cookie.ttl
        cookie = compiled.HTTPCookie(
            name=ch.http_cookie.name,
            path=ch.http_cookie.path,
            ttl_ms=parse_duration_ms(ttl) if ttl is not None else 0,
        )
    return compiled.LoadBalancer(
        consistent_hash=compiled.ConsistentHash(
            http_header_name=ch.http_header_name.lower(),
            http_cookie=cookie,
            use_source_ip=ch.use_source_ip,
            http_query_parameter_name=ch.http_query_parameter_name,
            minimum_ring_size=ch.minimum_ring_size or _DEFAULT_RING_SIZE,
        )
    )


# ---------------------------------------------------------------- gateways


def compile_gateway_config(
    resources: Sequence[Resource], namespace: str, labels: Mapping[str, str], revision: int
) -> compiled.GatewayConfig:
    """Config for a gateway proxy in `namespace` with workload `labels`.

    Every Gateway whose selector is a subset of `labels` applies (any namespace, as
    Istio does by default). `name` lists them as `<ns>/<name>`, comma-separated (the
    proxy treats itself as each of them), and `selector` merges their selectors.
    VirtualService hosts are narrowed to the hosts those Gateways expose (Istio's
    rule: a Gateway's owner decides which hosts enter the mesh); VirtualServices with
    identical host lists are merged into one virtual host, rules oldest first.
    """
    selected: list[str] = []
    selector: dict[str, str] = {}
    servers: list[compiled.GatewayServer] = []
    exposed: list[str] = []
    for resource in resources:
        spec = resource.spec
        if not isinstance(spec, GatewaySpec):
            continue
        if any(labels.get(k) != v for k, v in spec.selector.items()):
            continue
        gw_namespace = resource.metadata.namespace
        selected.append(f"{gw_namespace}/{resource.metadata.name}")
        selector.update(spec.selector)
        for server in spec.servers:
            hosts = tuple(_unique(canonical_host(h, gw_namespace) for h in server.hosts))
            protocol = server.port.protocol.upper() or "HTTP"
            entry = compiled.GatewayServer(port=server.port.number, protocol=protocol, hosts=hosts)
            if entry not in servers:
                servers.append(entry)
            exposed.extend(h for h in hosts if h not in exposed)

    names = frozenset(selected)

    def keep_for_gateway(gateways: tuple[str, ...]) -> tuple[str, ...] | None:
        if not gateways:
            return ()
        kept = tuple(g for g in gateways if g in names)
        return kept or None

    virtual_hosts: dict[tuple[str, ...], list[compiled.HTTPRoute]] = {}
    tcp_rules: list[compiled.L4Route] = []
    tls_rules: list[compiled.L4Route] = []
    for resource, spec in _virtual_services(resources):
        vs_namespace = resource.metadata.namespace
        if not names.intersection(_gateway_name(g, vs_namespace) for g in spec.gateways):
            continue
        hosts = _exposed_hosts((canonical_host(h, vs_namespace) for h in spec.hosts), exposed)
        rules = _http_routes(resource, spec, keep_for_gateway)
        if hosts and rules:
            virtual_hosts.setdefault(hosts, []).extend(rules)
        if hosts:
            tcp, tls = compile_l4_routes(resource, spec, keep_for_gateway)
            tcp_rules.extend(tcp)
            tls_rules.extend(tls)
    # Gateway API Gateways (docs/architecture.md §8): after the Istio Gateways' hosts
    api = gateway_api_routing(resources, namespace, labels)
    selected.extend(api.names)
    servers.extend(s for s in api.servers if s not in servers)
    return compiled.GatewayConfig(
        namespace=namespace,
        name=",".join(selected),
        revision=revision,
        selector=selector,
        servers=tuple(servers),
        virtual_hosts=tuple(
            compiled.VirtualHost(hosts=hosts, http=tuple(rules))
            for hosts, rules in virtual_hosts.items()
        )
        + tuple(api.virtual_hosts),
        tcp=tuple(tcp_rules),
        tls=tuple(tls_rules),
    )


def _exposed_hosts(vs_hosts: Iterable[str], exposed: Sequence[str]) -> tuple[str, ...]:
    """The part of a VirtualService's hosts that the selected Gateways expose.

    A VS host inside an exposed pattern is kept as written; a VS wildcard wider than
    an exposed host (`*` vs `bookinfo.example.com`) is narrowed to that host.
    """
    result: list[str] = []
    for host in vs_hosts:
        if any(host_matches(pattern, host) for pattern in exposed):
            result.append(host)
        else:
            result.extend(e for e in exposed if host_matches(host, e))
    return tuple(_unique(result))


# ---------------------------------------------------------------- discovery


def services_named(resources: Sequence[Resource]) -> set[ServiceRef]:
    """Every mesh service a resource names: VS hosts, destinations and mirrors, DR hosts.

    Wildcards and hosts outside the mesh domain name no single service and are left
    out; the caller recompiles those services' tables when they are first asked for.
    """
    hosts: list[str] = []
    for resource in resources:
        spec = resource.spec
        namespace = resource.metadata.namespace
        if isinstance(spec, VirtualServiceSpec):
            hosts.extend(canonical_host(h, namespace) for h in spec.hosts)
            hosts.extend(
                canonical_host(d.destination.host, namespace)
                for rule in spec.http
                for d in rule.route
            )
            hosts.extend(
                canonical_host(rule.mirror.host, namespace)
                for rule in spec.http
                if rule.mirror is not None
            )
            hosts.extend(canonical_host(h, namespace) for h in spec.l4_destination_hosts())
        elif isinstance(spec, DestinationRuleSpec):
            hosts.append(canonical_host(spec.host, namespace))
    # service_of_host would read `*.prod.svc.cluster.local` as a service named `*`
    named = (service_of_host(h) for h in hosts if not h.startswith("*"))
    return {ref for ref in named if ref is not None} | services_named_by_gateway_api(resources)


# ---------------------------------------------------------------- VirtualService rules


def _virtual_services(
    resources: Sequence[Resource],
) -> Iterator[tuple[Resource, VirtualServiceSpec]]:
    for resource in resources:
        if isinstance(resource.spec, VirtualServiceSpec):
            yield resource, resource.spec


def _gateway_name(ref: str, namespace: str) -> str:
    """`mesh` stays `mesh`; a bare Gateway name resolves in the referring namespace."""
    if ref == MESH_GATEWAY or "/" in ref:
        return ref
    return f"{namespace}/{ref}"


def _http_routes(
    resource: Resource, spec: VirtualServiceSpec, keep: GatewayFilter
) -> list[compiled.HTTPRoute]:
    namespace = resource.metadata.namespace
    origin = f"VirtualService/{namespace}/{resource.metadata.name}"
    routes: list[compiled.HTTPRoute] = []
    for rule in spec.http:
        matches: list[compiled.HTTPMatch] = []
        for match in rule.match:
            gateways = keep(tuple(_gateway_name(g, namespace) for g in match.gateways))
            if gateways is not None:
                matches.append(_match(match, gateways))
        if rule.match and not matches:
            continue  # every match is for somewhere else: the rule does not apply here
        routes.append(_http_route(rule, tuple(matches), namespace, origin))
    return routes


def _http_route(
    rule: HTTPRoute, matches: tuple[compiled.HTTPMatch, ...], namespace: str, origin: str
) -> compiled.HTTPRoute:
    redirect = None
    if rule.redirect is not None:
        r = rule.redirect
        redirect = compiled.Redirect(
            uri=r.uri,
            authority=r.authority,
            port=r.port or 0,
            scheme=r.scheme.lower() if r.scheme is not None else None,
            redirect_code=r.redirect_code or _DEFAULT_REDIRECT_CODE,
        )
    direct = None
    if rule.direct_response is not None:
        body = rule.direct_response.body
        direct = compiled.DirectResponse(
            status=rule.direct_response.status, body=body.string if body is not None else None
        )
    rewrite = None
    if rule.rewrite is not None:
        rewrite = compiled.Rewrite(uri=rule.rewrite.uri, authority=rule.rewrite.authority)
    return compiled.HTTPRoute(
        name=rule.name,
        match=matches,
        route=tuple(_destination(d, namespace, single=len(rule.route) == 1) for d in rule.route),
        redirect=redirect,
        direct_response=direct,
        rewrite=rewrite,
        headers=_headers(rule.headers),
        timeout_ms=parse_duration_ms(rule.timeout) if rule.timeout is not None else 0,
        origin=origin,
        retries=compile_retries(rule.retries),
        fault=compile_fault(rule.fault),
        mirror=compile_mirror(rule.mirror, rule.mirror_percentage, namespace),
    )


def _match(match: HTTPMatchRequest, gateways: tuple[str, ...]) -> compiled.HTTPMatch:
    return compiled.HTTPMatch(
        name=match.name,
        uri=_string_match(match.uri),
        scheme=_string_match(match.scheme),
        method=_string_match(match.method),
        authority=_string_match(match.authority),
        # header names are case-insensitive; the proxy looks them up lower-cased
        headers={k.lower(): _required_match(v) for k, v in match.headers.items()},
        without_headers={k.lower(): _required_match(v) for k, v in match.without_headers.items()},
        query_params={k: _required_match(v) for k, v in match.query_params.items()},
        ignore_uri_case=match.ignore_uri_case,
        source_labels=dict(match.source_labels),
        source_namespace=match.source_namespace,
        port=match.port or 0,
        gateways=gateways,
    )


def _string_match(value: StringMatch | None) -> compiled.StringMatch | None:
    return None if value is None else _required_match(value)


def _required_match(value: StringMatch) -> compiled.StringMatch:
    # validation guarantees exactly one is set
    if value.exact is not None:
        return compiled.StringMatch(kind="exact", value=value.exact)
    if value.prefix is not None:
        return compiled.StringMatch(kind="prefix", value=value.prefix)
    return compiled.StringMatch(kind="regex", value=value.regex or "")


def _destination(
    dest: HTTPRouteDestination, namespace: str, *, single: bool
) -> compiled.WeightedDestination:
    d = dest.destination
    return compiled.WeightedDestination(
        destination=compiled.Destination(
            host=canonical_host(d.host, namespace),
            subset=d.subset,
            port=d.port.number if d.port is not None else 0,
        ),
        # Istio ignores the weight of a lone destination: it gets all the traffic
        weight=100 if single else dest.weight,
        headers=_headers(dest.headers),
    )


def _headers(headers: Headers | None) -> compiled.Headers:
    if headers is None:
        return compiled.Headers()
    return compiled.Headers(
        request=_header_ops(headers.request), response=_header_ops(headers.response)
    )


def _header_ops(ops: HeaderOperations | None) -> compiled.HeaderOps:
    if ops is None:
        return compiled.HeaderOps()
    return compiled.HeaderOps(
        set={k.lower(): v for k, v in ops.set.items()},
        add={k.lower(): v for k, v in ops.add.items()},
        remove=tuple(h.lower() for h in ops.remove),
    )


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))
