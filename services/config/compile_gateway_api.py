"""Pure compiler of the Gateway API mesh profile (GAMMA) into the same `RouteTable`
rules as VirtualServices (docs/architecture.md §8).

- An HTTPRoute / GRPCRoute whose parentRef is a mesh Service contributes rules to that
  service's RouteTable. A *producer* route (in the Service's namespace) applies to
  every client; a *consumer* route (in another namespace) only to clients in its own
  namespace, and for them it replaces the producer routes: its rules come first,
  limited with `source_namespace`, and a request they do not match gets 404.
- Within one namespace, the rules of every route attached to the Service are merged
  and ordered as the Gateway API defines it (Istio's order for path kinds): Exact
  path, then the longest PathPrefix, then RegularExpression; then a method match;
  then more header matches; then more query-parameter matches; ties keep creation
  order (oldest route first), then rule and match order.
- A PathPrefix matches whole path elements (`/v2` matches `/v2` and `/v2/x`, not
  `/v2x`): it compiles to an exact match and a prefix match on `<prefix>/`.
- A backendRef to a Kubernetes Service resource resolves as
  `compile_kubernetes.resolve_backend` says.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

from mesh import compiled
from mesh.hosts import ServiceRef, host_matches
from mesh.resources import Resource, parse_duration_ms
from mesh.resources.gateway_api import (
    GATEWAY_NAME_LABEL,
    BackendRef,
    GatewayAPIGatewaySpec,
    GRPCBackendRef,
    GRPCRouteFilter,
    GRPCRouteMatch,
    GRPCRouteRule,
    GRPCRouteSpec,
    HeaderMatch,
    HeaderModifier,
    HTTPRouteFilter,
    HTTPRouteMatch,
    HTTPRouteRule,
    HTTPRouteSpec,
    Listener,
    MirrorBackendRef,
    ParentReference,
    PathModifier,
    RequestMirror,
)
from mesh.resources.kubernetes import ServiceSpec, backing_service
from mesh.resources.validate_gateway_api import is_gateway_parent, is_service_parent
from services.config.compile_kubernetes import k8s_services, resolve_backend

__all__ = [
    "GatewayAPIRouting",
    "attached_listeners",
    "gateway_api_routes",
    "gateway_api_routing",
    "names_gateway",
    "route_hostnames",
    "services_named_by_gateway_api",
]

HTTP_DEFAULT_PORT = 80
# the Gateway API's answer when a rule has no backend that can take the request
_NO_BACKEND = compiled.DirectResponse(status=500, body="no backend for this route")

RouteSpec = HTTPRouteSpec | GRPCRouteSpec


class _Entry(NamedTuple):
    """One compiled rule with its Gateway API precedence."""

    rank: tuple[int, int, int, int, int]
    position: int
    route: compiled.HTTPRoute


# ---------------------------------------------------------------- discovery


def _parent_services(resource: Resource, spec: RouteSpec) -> Iterator[tuple[ServiceRef, int]]:
    for ref in spec.parent_refs:
        if is_service_parent(ref):
            yield ServiceRef(ref.namespace or resource.metadata.namespace, ref.name), ref.port or 0


def services_named_by_gateway_api(resources: Sequence[Resource]) -> set[ServiceRef]:
    """Parents, backends and mirrors of routes, and Kubernetes Services."""
    named: set[ServiceRef] = set()
    for resource in resources:
        spec = resource.spec
        ns = resource.metadata.namespace
        if isinstance(spec, ServiceSpec):
            named.add(ServiceRef(ns, resource.metadata.name))
            named.add(ServiceRef(ns, backing_service(spec)))
        elif isinstance(spec, HTTPRouteSpec | GRPCRouteSpec):
            named.update(parent for parent, _port in _parent_services(resource, spec))
            for rule in spec.rules:
                for backend in rule.backend_refs:
                    named.add(ServiceRef(backend.namespace or ns, backend.name))
                for f in rule.filters:
                    if f.request_mirror is not None:
                        target = f.request_mirror.backend_ref
                        named.add(ServiceRef(target.namespace or ns, target.name))
    return named


# ---------------------------------------------------------------- routes


def gateway_api_routes(
    resources: Sequence[Resource], service: ServiceRef
) -> tuple[compiled.HTTPRoute, ...]:
    """The rules HTTPRoutes and GRPCRoutes attached to `service` give its RouteTable,
    consumer routes first (see the module docstring). `resources` in creation order."""
    services = k8s_services(resources)
    by_namespace: dict[str, list[_Entry]] = {}
    ports_of: dict[str, set[int]] = {}
    for resource in resources:
        spec = resource.spec
        if not isinstance(spec, HTTPRouteSpec | GRPCRouteSpec):
            continue
        ports = [port for parent, port in _parent_services(resource, spec) if parent == service]
        if not ports:
            continue
        namespace = resource.metadata.namespace
        entries = by_namespace.setdefault(namespace, [])
        # a route attached twice (two ports) is served on each; no port: every port
        attached = [0] if 0 in ports else sorted(set(ports))
        ports_of.setdefault(namespace, set()).update(attached)
        for port in attached:
            entries.extend(_route_entries(resource, spec, port, services, len(entries)))
    out: list[compiled.HTTPRoute] = []
    for namespace in sorted(by_namespace):
        if namespace == service.namespace:
            continue
        ordered = _ordered(by_namespace[namespace])
        out.extend(_for_consumers(r, namespace) for r in ordered)
        out.extend(_not_found(ports_of[namespace], namespace))
    if service.namespace in by_namespace:
        producer_ports = ports_of[service.namespace]
        out.extend(_ordered(by_namespace[service.namespace]))
        out.extend(_not_found(producer_ports, "") if 0 not in producer_ports else [])
    if out and 0 not in ports_of.get(service.namespace, set()):
        # a port (or client namespace) no route is attached to: the service as if
        # there were no routes
        host, subset = resolve_backend(services, service.name, service.namespace)
        out.append(
            compiled.HTTPRoute(
                name="default",
                route=(
                    compiled.WeightedDestination(destination=compiled.Destination(host, subset)),
                ),
                origin=f"Service/{service.namespace}/{service.name}",
            )
        )
    return tuple(out)


def _ordered(entries: list[_Entry]) -> list[compiled.HTTPRoute]:
    return [e.route for e in sorted(entries, key=lambda e: (e.rank, e.position))]


def _for_consumers(route: compiled.HTTPRoute, namespace: str) -> compiled.HTTPRoute:
    matches = route.match or (compiled.HTTPMatch(),)
    return _replace_matches(route, tuple(_with(m, source_namespace=namespace) for m in matches))


def _not_found(ports: set[int], source_namespace: str) -> list[compiled.HTTPRoute]:
    """What a request for the ports routes are attached to gets when none of their
    rules matched: 404, as for any Gateway API parent. For a consumer namespace, its
    routes replace the producer's, so the 404 holds for its clients only."""
    return [
        compiled.HTTPRoute(
            name="no-route-matched",
            match=(compiled.HTTPMatch(source_namespace=source_namespace, **_port_condition(port)),),
            direct_response=compiled.DirectResponse(status=404),
            origin=f"HTTPRoute/{source_namespace or '*'}/*",
        )
        for port in sorted(ports)
    ]


def _route_entries(
    resource: Resource,
    spec: RouteSpec,
    port: int,
    services: dict[ServiceRef, ServiceSpec],
    first_position: int,
) -> list[_Entry]:
    namespace = resource.metadata.namespace
    kind = "HTTPRoute" if isinstance(spec, HTTPRouteSpec) else "GRPCRoute"
    origin = f"{kind}/{namespace}/{resource.metadata.name}"
    entries: list[_Entry] = []
    rules: Sequence[HTTPRouteRule | GRPCRouteRule] = spec.rules
    for index, rule in enumerate(rules):
        name = rule.name or f"{resource.metadata.name}.{index}"
        if isinstance(rule, HTTPRouteRule):
            compiled_rules = _http_rule(rule, name, origin, namespace, port, services)
        else:
            compiled_rules = _grpc_rule(rule, name, origin, namespace, port, services)
        for rank, route in compiled_rules:
            entries.append(_Entry(rank, first_position + len(entries), route))
    return entries


# ---------------------------------------------------------------- HTTPRoute


def _http_rule(
    rule: HTTPRouteRule,
    name: str,
    origin: str,
    namespace: str,
    port: int,
    services: dict[ServiceRef, ServiceSpec],
) -> list[tuple[tuple[int, int, int, int, int], compiled.HTTPRoute]]:
    base = _http_action(rule, name, origin, namespace, services)
    rewrite = next((f.url_rewrite for f in rule.filters if f.url_rewrite is not None), None)
    redirect = next(
        (f.request_redirect for f in rule.filters if f.request_redirect is not None), None
    )
    # validation: at most one of the two
    modifier = (rewrite.path if rewrite is not None else None) or (
        redirect.path if redirect is not None else None
    )
    out = []
    for match in rule.matches or (HTTPRouteMatch(),):
        rest = _http_conditions(match, port)
        for uri, new_path in _path_matches(match, modifier):
            m = _with(rest, uri=uri)
            route = base
            if base.redirect is not None and new_path is not None:
                # a prefix match replaces the prefix; any other replaces the path
                by_prefix = uri is not None and uri.kind == "prefix"
                route = msgspec.structs.replace(
                    base,
                    redirect=msgspec.structs.replace(
                        base.redirect,
                        uri=None if by_prefix else new_path,
                        prefix_rewrite=new_path if by_prefix else None,
                    ),
                )
            elif new_path is not None or (rewrite is not None and rewrite.hostname):
                route = _with_rewrite(
                    base,
                    compiled.Rewrite(uri=new_path, authority=rewrite.hostname if rewrite else None),
                )
            out.append((_rank(match), _replace_matches(route, (m,))))
    return out


def _path_matches(
    match: HTTPRouteMatch, modifier: PathModifier | None
) -> list[tuple[compiled.StringMatch | None, str | None]]:
    """(uri match, rewrite uri) pairs a Gateway API path match compiles to."""
    path = match.path
    kind = path.type if path is not None else "PathPrefix"
    value = path.value if path is not None else "/"
    full = replace_prefix = None
    if modifier is not None:
        full = modifier.replace_full_path if modifier.type == "ReplaceFullPath" else None
        if modifier.type == "ReplacePrefixMatch":
            replace_prefix = modifier.replace_prefix_match
    if kind == "Exact":
        return [(compiled.StringMatch(kind="exact", value=value), full or replace_prefix)]
    if kind == "RegularExpression":
        return [(compiled.StringMatch(kind="regex", value=value), full)]
    prefix = value.rstrip("/")
    if full is not None:
        # the whole path is replaced: one regex match keeps the element-wise prefix
        pattern = re.escape(prefix) + "(/.*)?" if prefix else "/.*"
        return [(compiled.StringMatch(kind="regex", value=pattern), full)]
    if not prefix:
        rewrite = None if replace_prefix is None else replace_prefix.rstrip("/") + "/"
        return [(compiled.StringMatch(kind="prefix", value="/"), rewrite)]
    exact_rewrite = prefix_rewrite = None
    if replace_prefix is not None:
        exact_rewrite = replace_prefix
        prefix_rewrite = replace_prefix.rstrip("/") + "/"
    return [
        (compiled.StringMatch(kind="exact", value=prefix), exact_rewrite),
        (compiled.StringMatch(kind="prefix", value=prefix + "/"), prefix_rewrite),
    ]


def _http_conditions(match: HTTPRouteMatch, port: int) -> compiled.HTTPMatch:
    return compiled.HTTPMatch(
        method=(
            compiled.StringMatch(kind="exact", value=match.method)
            if match.method is not None
            else None
        ),
        headers={h.name.lower(): _value_match(h) for h in match.headers},
        query_params={q.name: _value_match(q) for q in match.query_params},
        **_port_condition(port),
    )


def _http_action(
    rule: HTTPRouteRule,
    name: str,
    origin: str,
    namespace: str,
    services: dict[ServiceRef, ServiceSpec],
) -> compiled.HTTPRoute:
    request_ops = compiled.HeaderOps()
    response_ops = compiled.HeaderOps()
    redirect = None
    mirror = None
    for f in rule.filters:
        request_ops = _merge_ops(request_ops, f.request_header_modifier)
        response_ops = _merge_ops(response_ops, f.response_header_modifier)
        if f.request_redirect is not None:
            r = f.request_redirect
            redirect = compiled.Redirect(
                # the path is set per match (`_http_rule`)
                authority=r.hostname,
                port=r.port or 0,
                scheme=r.scheme,
                redirect_code=r.status_code,
            )
        if f.request_mirror is not None and mirror is None:
            mirror = _mirror(f.request_mirror, namespace, services)
    timeout_ms = 0
    retries = None
    if rule.timeouts is not None:
        if rule.timeouts.request is not None:
            timeout_ms = parse_duration_ms(rule.timeouts.request)
        if rule.timeouts.backend_request is not None:
            retries = compiled.RetryPolicy(
                per_try_timeout_ms=parse_duration_ms(rule.timeouts.backend_request)
            )
    destinations = _destinations(rule.backend_refs, namespace, services)
    return compiled.HTTPRoute(
        name=name,
        route=destinations if redirect is None else (),
        redirect=redirect,
        direct_response=None if redirect is not None or destinations else _NO_BACKEND,
        headers=compiled.Headers(request=request_ops, response=response_ops),
        timeout_ms=timeout_ms,
        origin=origin,
        retries=retries,
        mirror=mirror,
    )


def _destinations(
    refs: Sequence[BackendRef | GRPCBackendRef],
    namespace: str,
    services: dict[ServiceRef, ServiceSpec],
) -> tuple[compiled.WeightedDestination, ...]:
    out = []
    for ref in refs:
        if ref.weight == 0 and len(refs) > 1:
            continue  # the spec: a weight of 0 takes no traffic
        host, subset = resolve_backend(services, ref.name, ref.namespace or namespace)
        request_ops = response_ops = compiled.HeaderOps()
        filters: Sequence[HTTPRouteFilter | GRPCRouteFilter] = ref.filters
        for f in filters:
            request_ops = _merge_ops(request_ops, f.request_header_modifier)
            response_ops = _merge_ops(response_ops, f.response_header_modifier)
        out.append(
            compiled.WeightedDestination(
                destination=compiled.Destination(host=host, subset=subset, port=ref.port or 0),
                weight=ref.weight if len(refs) > 1 else 100,
                headers=compiled.Headers(request=request_ops, response=response_ops),
            )
        )
    if len(refs) == 1 and refs[0].weight == 0:
        return ()  # a lone backend of weight 0: nothing may be sent (500)
    return tuple(out)


def _mirror(
    mirror: RequestMirror, namespace: str, services: dict[ServiceRef, ServiceSpec]
) -> compiled.Mirror:
    target: MirrorBackendRef = mirror.backend_ref
    host, subset = resolve_backend(services, target.name, target.namespace or namespace)
    if mirror.fraction is not None:
        percentage = 100.0 * mirror.fraction.numerator / mirror.fraction.denominator
    else:
        percentage = float(mirror.percent if mirror.percent is not None else 100)
    return compiled.Mirror(host=host, subset=subset, port=target.port or 0, percentage=percentage)


def _merge_ops(ops: compiled.HeaderOps, modifier: HeaderModifier | None) -> compiled.HeaderOps:
    if modifier is None:
        return ops
    return compiled.HeaderOps(
        set={**ops.set, **{h.name.lower(): h.value for h in modifier.set}},
        add={**ops.add, **{h.name.lower(): h.value for h in modifier.add}},
        remove=(*ops.remove, *(n.lower() for n in modifier.remove)),
    )


# ---------------------------------------------------------------- GRPCRoute


def _grpc_rule(
    rule: GRPCRouteRule,
    name: str,
    origin: str,
    namespace: str,
    port: int,
    services: dict[ServiceRef, ServiceSpec],
) -> list[tuple[tuple[int, int, int, int, int], compiled.HTTPRoute]]:
    request_ops = response_ops = compiled.HeaderOps()
    mirror = None
    for f in rule.filters:
        request_ops = _merge_ops(request_ops, f.request_header_modifier)
        response_ops = _merge_ops(response_ops, f.response_header_modifier)
        if f.request_mirror is not None and mirror is None:
            mirror = _mirror(f.request_mirror, namespace, services)
    destinations = _destinations(rule.backend_refs, namespace, services)
    base = compiled.HTTPRoute(
        name=name,
        route=destinations,
        direct_response=None if destinations else _NO_BACKEND,
        headers=compiled.Headers(request=request_ops, response=response_ops),
        origin=origin,
        mirror=mirror,
    )
    out = []
    for match in rule.matches or (GRPCRouteMatch(),):
        m = compiled.HTTPMatch(
            uri=_grpc_path(match),
            headers={h.name.lower(): _value_match(h) for h in match.headers},
            **_port_condition(port),
        )
        # the spec's GRPCRoute precedence: a method match, then more header matches
        kind = "Exact" if match.method is not None and match.method.type == "Exact" else "Other"
        method_rank = 0 if m.uri is None else (3 if kind == "Exact" else 1)
        rank = (-method_rank, 0, 0, -len(m.headers), 0)
        out.append((rank, _replace_matches(base, (m,))))
    return out


def _grpc_path(match: GRPCRouteMatch) -> compiled.StringMatch | None:
    """A gRPC method match is a match on the request path `/<service>/<method>`."""
    method = match.method
    if method is None:
        return None
    if method.type == "Exact":
        if method.service is not None and method.method is not None:
            return compiled.StringMatch(kind="exact", value=f"/{method.service}/{method.method}")
        if method.service is not None:
            return compiled.StringMatch(kind="prefix", value=f"/{method.service}/")
        return compiled.StringMatch(kind="regex", value=f"/[^/]+/{re.escape(method.method or '')}")
    service = method.service or "[^/]+"
    name = method.method or "[^/]+"
    return compiled.StringMatch(kind="regex", value=f"/{service}/{name}")


# ---------------------------------------------------------------- shared


def _port_condition(port: int) -> dict[str, Any]:
    """A parentRef's `port` as match conditions. A Host without a port is a request
    for the scheme's port (the client connected to 80), so port 80 is implicit."""
    if port == 0:
        return {}
    return {"port": port, "port_implicit": port == HTTP_DEFAULT_PORT}


def _value_match(m: HeaderMatch) -> compiled.StringMatch:
    if m.type == "Exact":
        return compiled.StringMatch(kind="exact", value=m.value)
    return compiled.StringMatch(kind="regex", value=m.value)


def _rank(match: HTTPRouteMatch) -> tuple[int, int, int, int, int]:
    """Sort key (ascending = first) of one Gateway API match: Exact path, longest
    PathPrefix, RegularExpression; method; header count; query-parameter count."""
    path = match.path
    kind = path.type if path is not None else "PathPrefix"
    value = path.value if path is not None else "/"
    if kind == "PathPrefix":
        value = value.rstrip("/") + "/"
    kind_rank = {"Exact": 3, "PathPrefix": 2}.get(kind, 1)
    return (
        -kind_rank,
        -len(value) if kind != "RegularExpression" else 0,
        0 if match.method is not None else 1,
        -len(match.headers),
        -len(match.query_params),
    )


def _with(m: compiled.HTTPMatch, **changes: object) -> compiled.HTTPMatch:
    return msgspec.structs.replace(m, **changes)


def _replace_matches(
    route: compiled.HTTPRoute, matches: tuple[compiled.HTTPMatch, ...]
) -> compiled.HTTPRoute:
    return msgspec.structs.replace(route, match=matches)


def _with_rewrite(route: compiled.HTTPRoute, rewrite: compiled.Rewrite) -> compiled.HTTPRoute:
    return msgspec.structs.replace(route, rewrite=rewrite)


# ---------------------------------------------------------------- Gateway API Gateways


class GatewayAPIRouting(NamedTuple):
    """What the Gateway API Gateways selecting one gateway proxy add to its config."""

    names: list[str]
    servers: list[compiled.GatewayServer]
    virtual_hosts: list[compiled.VirtualHost]


def selects(gateway: Resource, namespace: str, labels: Mapping[str, str]) -> bool:
    """A Gateway API Gateway is served by the `meshctl gateway` proxies of its
    namespace labelled `gateway.networking.k8s.io/gateway-name: <its name>` (the label
    Istio gives the gateway it deploys for a Gateway)."""
    return (
        gateway.metadata.namespace == namespace
        and labels.get(GATEWAY_NAME_LABEL) == gateway.metadata.name
    )


def attached_listeners(
    gateway: Resource, route: Resource, ref: ParentReference
) -> tuple[list[Listener], list[Listener]]:
    """(listeners the parentRef names, those of them whose allowedRoutes admit the
    route) for a parentRef that names `gateway`."""
    spec = gateway.spec
    assert isinstance(spec, GatewayAPIGatewaySpec)
    named = [
        listener
        for listener in spec.listeners
        if (not ref.section_name or ref.section_name == listener.name)
        and (ref.port is None or ref.port == listener.port)
    ]
    kind = "HTTPRoute" if isinstance(route.spec, HTTPRouteSpec) else "GRPCRoute"
    allowed = []
    for listener in named:
        rules = listener.allowed_routes
        source = rules.namespaces.from_ if rules and rules.namespaces else "Same"
        if source == "Same" and route.metadata.namespace != gateway.metadata.namespace:
            continue
        if rules and rules.kinds and kind not in {k.kind for k in rules.kinds}:
            continue
        allowed.append(listener)
    return named, allowed


def names_gateway(route: Resource, ref: ParentReference, gateway: Resource) -> bool:
    return (
        is_gateway_parent(ref)
        and ref.name == gateway.metadata.name
        and (ref.namespace or route.metadata.namespace) == gateway.metadata.namespace
    )


def gateway_api_routing(
    resources: Sequence[Resource], namespace: str, labels: Mapping[str, str]
) -> GatewayAPIRouting:
    """Servers and virtual hosts of the Gateway API Gateways that select a gateway proxy
    in `namespace` with `labels`: one virtual host per hostname, holding the rules of
    every route attached to a listener with that hostname, in the Gateway API's order."""
    services = k8s_services(resources)
    names: list[str] = []
    servers: list[compiled.GatewayServer] = []
    by_host: dict[str, list[_Entry]] = {}
    for gateway in resources:
        if not isinstance(gateway.spec, GatewayAPIGatewaySpec):
            continue
        if not selects(gateway, namespace, labels):
            continue
        names.append(f"{gateway.metadata.namespace}/{gateway.metadata.name}")
        for listener in gateway.spec.listeners:
            server = compiled.GatewayServer(
                port=listener.port, protocol=listener.protocol, hosts=(listener.hostname or "*",)
            )
            if server not in servers:
                servers.append(server)
        for route in resources:
            spec = route.spec
            if not isinstance(spec, HTTPRouteSpec | GRPCRouteSpec):
                continue
            hosts: list[str] = []
            for ref in spec.parent_refs:
                if names_gateway(route, ref, gateway):
                    _named, allowed = attached_listeners(gateway, route, ref)
                    for listener in allowed:
                        hosts.extend(route_hostnames(spec.hostnames, listener.hostname))
            if not hosts:
                continue
            entries = _route_entries(route, spec, 0, services, 0)
            for host in dict.fromkeys(hosts):
                bucket = by_host.setdefault(host, [])
                bucket.extend(e._replace(position=len(bucket) + i) for i, e in enumerate(entries))
    virtual_hosts = [
        compiled.VirtualHost(hosts=(host,), http=tuple(_ordered(entries)))
        for host, entries in by_host.items()
    ]
    return GatewayAPIRouting(names, servers, virtual_hosts)


def route_hostnames(route_hosts: Sequence[str], listener_host: str | None) -> list[str]:
    """The hostnames a route serves on a listener: the intersection of the two (a
    listener without a hostname takes the route's; a route without any takes the
    listener's; a wildcard on one side narrows to the other side's name)."""
    if not route_hosts:
        return [listener_host or "*"]
    if listener_host is None:
        return [h.lower() for h in route_hosts]
    out = []
    for host in (h.lower() for h in route_hosts):
        if host_matches(listener_host.lower(), host):
            out.append(host)
        elif host_matches(host, listener_host.lower()):
            out.append(listener_host.lower())
    return out
