"""Semantic validation of the networking kinds: rules the type system cannot express.

Each `validate_*` function takes a decoded spec and returns every problem found, as
`Issue(path, message)`, so one apply can report all mistakes of a document at once.
The rules follow Istio's own validation where Istio has one (weights, exactly one
action per rule, 3xx redirects, unique subsets), so YAML that passes here also
passes in Istio. Retries, fault injection, mirroring, connection pools and outlier
detection are checked in `validate_resilience`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mesh.resources import checks
from mesh.resources.durations import parse_duration_ms
from mesh.resources.errors import Issue, field, item, key, required, unsupported
from mesh.resources.model import Metadata
from mesh.resources.networking import (
    DestinationRuleSpec,
    GatewaySpec,
    HeaderOperations,
    Headers,
    HTTPMatchRequest,
    HTTPRedirect,
    HTTPRoute,
    HTTPRouteDestination,
    LoadBalancerSettings,
    StringMatch,
    TrafficPolicy,
    VirtualServiceSpec,
)
from mesh.resources.validate_l4 import validate_l4_routes, validate_server_tls
from mesh.resources.validate_resilience import (
    validate_route_resilience,
    validate_traffic_policy_resilience,
)
from mesh.resources.validate_tls import validate_client_tls

MESH_GATEWAY = "mesh"
LB_SIMPLE = ("ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN", "RANDOM")
GATEWAY_PROTOCOLS = ("HTTP", "TCP", "TLS")
REDIRECT_SCHEMES = ("http", "https")
# Envoy's upper bound for ring-hash rings
MAX_RING_SIZE = 8_388_608


def validate_virtual_service(spec: VirtualServiceSpec, path: str = "spec") -> list[Issue]:
    out: list[Issue] = []
    hosts_path = field(path, "hosts")
    if not spec.hosts:
        out.append(Issue(hosts_path, "must list at least one host"))
    bound_to_mesh = not spec.gateways or MESH_GATEWAY in spec.gateways
    for i, host in enumerate(spec.hosts):
        problem = checks.host(host)
        if problem is None and host == "*" and bound_to_mesh:
            # Istio's rule: `*` would capture every destination of every sidecar
            problem = "'*' is only allowed when spec.gateways lists gateways and not mesh"
        _add(out, item(hosts_path, i), problem)
    _gateway_refs(spec.gateways, field(path, "gateways"), out)
    for i, rule in enumerate(spec.http):
        _http_route(rule, item(field(path, "http"), i), out)
    out.extend(validate_l4_routes(spec.tcp, spec.tls, spec.hosts, path))
    return out


def validate_destination_rule(spec: DestinationRuleSpec, path: str = "spec") -> list[Issue]:
    out: list[Issue] = []
    host_path = field(path, "host")
    _add(out, host_path, checks.host(spec.host))
    if spec.traffic_policy is not None:
        _traffic_policy(spec.traffic_policy, field(path, "trafficPolicy"), out)
    seen: dict[str, int] = {}
    for i, subset in enumerate(spec.subsets):
        sub_path = item(field(path, "subsets"), i)
        name_path = field(sub_path, "name")
        _add(out, name_path, checks.dns_label(subset.name))
        if subset.name in seen:
            message = f"duplicate subset name {subset.name!r}, see subsets[{seen[subset.name]}]"
            out.append(Issue(name_path, message))
        seen.setdefault(subset.name, i)
        _labels(subset.labels, field(sub_path, "labels"), out)
        if subset.traffic_policy is not None:
            _traffic_policy(subset.traffic_policy, field(sub_path, "trafficPolicy"), out)
    return out


def validate_gateway(spec: GatewaySpec, path: str = "spec") -> list[Issue]:
    out: list[Issue] = []
    _labels(spec.selector, field(path, "selector"), out)
    servers_path = field(path, "servers")
    if not spec.servers:
        out.append(Issue(servers_path, "must list at least one server"))
    for i, server in enumerate(spec.servers):
        srv_path = item(servers_path, i)
        port_path = field(srv_path, "port")
        _add(out, field(port_path, "number"), checks.port(server.port.number))
        if not server.port.name:
            # Istio refuses it too ("port name must be set")
            out.append(Issue(field(port_path, "name"), "must be set (Istio requires a port name)"))
        protocol = server.port.protocol.upper() or "HTTP"
        if protocol not in GATEWAY_PROTOCOLS:
            out.append(
                Issue(
                    field(port_path, "protocol"),
                    f"protocol {server.port.protocol} is not supported "
                    f"(supported: {', '.join(GATEWAY_PROTOCOLS)})",
                )
            )
        out.extend(validate_server_tls(server, protocol, srv_path))
        hosts_path = field(srv_path, "hosts")
        if not server.hosts:
            out.append(Issue(hosts_path, "must list at least one host"))
        for j, host in enumerate(server.hosts):
            _add(out, item(hosts_path, j), checks.host(host))
    return out


# ---------------------------------------------------------------- VirtualService parts


def _http_route(rule: HTTPRoute, path: str, out: list[Issue]) -> None:
    actions = [
        name
        for name, is_set in (
            ("route", bool(rule.route)),
            ("redirect", rule.redirect is not None),
            ("directResponse", rule.direct_response is not None),
        )
        if is_set
    ]
    if len(actions) != 1:
        got = ", ".join(actions) if actions else "none"
        out.append(
            Issue(path, f"must set exactly one of route, redirect or directResponse, got {got}")
        )
    for i, match in enumerate(rule.match):
        _match(match, item(field(path, "match"), i), out)
    _route_destinations(rule.route, field(path, "route"), out)
    if rule.redirect is not None:
        _redirect(rule.redirect, field(path, "redirect"), out)
    if rule.direct_response is not None:
        status = rule.direct_response.status
        if not 200 <= status <= 599:
            status_path = field(path, "directResponse.status")
            out.append(Issue(status_path, f"must be between 200 and 599, got {status}"))
    if rule.rewrite is not None:
        rewrite_path = field(path, "rewrite")
        if not rule.route:
            out.append(Issue(rewrite_path, "can only be used with route"))
        if rule.rewrite.uri is None and rule.rewrite.authority is None:
            out.append(Issue(rewrite_path, "must set uri or authority"))
        if rule.rewrite.uri is not None:
            _add(out, field(rewrite_path, "uri"), _uri(rule.rewrite.uri))
        if rule.rewrite.authority is not None:
            _add(out, field(rewrite_path, "authority"), _authority(rule.rewrite.authority))
    if rule.headers is not None:
        _headers(rule.headers, field(path, "headers"), out)
    if rule.timeout is not None:
        _duration(rule.timeout, field(path, "timeout"), out)
    validate_route_resilience(rule, path, out)


def _match(match: HTTPMatchRequest, path: str, out: list[Issue]) -> None:
    for name, value in (
        ("uri", match.uri),
        ("scheme", match.scheme),
        ("method", match.method),
        ("authority", match.authority),
    ):
        if value is not None:
            _string_match(value, field(path, name), out)
    for name, table in (("headers", match.headers), ("withoutHeaders", match.without_headers)):
        for header, value in table.items():
            header_path = key(field(path, name), header)
            _add(out, header_path, checks.header_name(header))
            _string_match(value, header_path, out)
    for param, value in match.query_params.items():
        param_path = key(field(path, "queryParams"), param)
        if value.prefix is not None:
            # Istio has no prefix matching for query parameters either
            out.append(unsupported(field(param_path, "prefix")))
        else:
            _string_match(value, param_path, out)
    _labels(match.source_labels, field(path, "sourceLabels"), out)
    if match.source_namespace:
        _add(out, field(path, "sourceNamespace"), checks.dns_label(match.source_namespace))
    if match.port is not None:
        _add(out, field(path, "port"), checks.port(match.port))
    _gateway_refs(match.gateways, field(path, "gateways"), out)


def _string_match(value: StringMatch, path: str, out: list[Issue]) -> None:
    chosen = [n for n in ("exact", "prefix", "regex") if getattr(value, n) is not None]
    if len(chosen) != 1:
        got = ", ".join(chosen) if chosen else "none"
        out.append(Issue(path, f"must set exactly one of exact, prefix or regex, got {got}"))
    if value.regex is not None:
        _add(out, field(path, "regex"), checks.regex(value.regex))


def _route_destinations(
    routes: tuple[HTTPRouteDestination, ...], path: str, out: list[Issue]
) -> None:
    for i, dest in enumerate(routes):
        dest_path = item(path, i)
        d_path = field(dest_path, "destination")
        _add(out, field(d_path, "host"), checks.host(dest.destination.host, wildcard=False))
        if dest.destination.subset:
            _add(out, field(d_path, "subset"), checks.dns_label(dest.destination.subset))
        if dest.destination.port is not None:
            _add(out, field(d_path, "port.number"), checks.port(dest.destination.port.number))
        if not 0 <= dest.weight <= 100:
            out.append(
                Issue(field(dest_path, "weight"), f"must be between 0 and 100, got {dest.weight}")
            )
        if dest.headers is not None:
            _headers(dest.headers, field(dest_path, "headers"), out)
    total = sum(d.weight for d in routes)
    if len(routes) > 1 and total != 100:
        out.append(Issue(path, f"weights must add up to 100, got {total}"))


def _redirect(redirect: HTTPRedirect, path: str, out: list[Issue]) -> None:
    if all(v is None for v in (redirect.uri, redirect.authority, redirect.port, redirect.scheme)):
        out.append(Issue(path, "must set at least one of uri, authority, port or scheme"))
    if redirect.port is not None:
        _add(out, field(path, "port"), checks.port(redirect.port))
    if redirect.scheme is not None and redirect.scheme.lower() not in REDIRECT_SCHEMES:
        out.append(Issue(field(path, "scheme"), f"must be http or https, got {redirect.scheme!r}"))
    if redirect.authority is not None:
        _add(out, field(path, "authority"), _authority(redirect.authority))
    if redirect.uri is not None:
        _add(out, field(path, "uri"), _uri(redirect.uri))
    code = redirect.redirect_code
    if code is not None and not 300 <= code <= 399:
        out.append(Issue(field(path, "redirectCode"), f"must be a 3xx status code, got {code}"))


def _authority(value: str) -> str | None:
    # becomes a Host header or a Location: anything beyond host[:port] is an injection
    if not value or any(c in value for c in "/ \t\r\n\0?#@"):
        return f"must be host or host:port, got {value!r}"
    return None


def _uri(value: str) -> str | None:
    # becomes a request line or a Location header: no whitespace or control characters
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return f"must not contain whitespace or control characters, got {value!r}"
    return None


def _headers(headers: Headers, path: str, out: list[Issue]) -> None:
    for name, ops in (("request", headers.request), ("response", headers.response)):
        if ops is not None:
            _header_ops(ops, field(path, name), out)


def _header_ops(ops: HeaderOperations, path: str, out: list[Issue]) -> None:
    for name, table in (("set", ops.set), ("add", ops.add)):
        for header, value in table.items():
            header_path = key(field(path, name), header)
            _add(out, header_path, checks.header_name(header) or checks.header_value(value))
    for i, header in enumerate(ops.remove):
        _add(out, item(field(path, "remove"), i), checks.header_name(header))


# ---------------------------------------------------------------- DestinationRule parts


def _traffic_policy(policy: TrafficPolicy, path: str, out: list[Issue]) -> None:
    if policy.load_balancer is not None:
        _load_balancer(policy.load_balancer, field(path, "loadBalancer"), out)
    validate_traffic_policy_resilience(policy.connection_pool, policy.outlier_detection, path, out)
    if policy.tls is not None:
        validate_client_tls(policy.tls, field(path, "tls"), out)
    seen_ports: dict[int, int] = {}
    for i, port_policy in enumerate(policy.port_level_settings):
        p_path = item(field(path, "portLevelSettings"), i)
        if port_policy.port is None:
            out.append(required(field(p_path, "port")))
        else:
            number = port_policy.port.number
            n_path = field(p_path, "port.number")
            _add(out, n_path, checks.port(number))
            if number in seen_ports:
                message = f"duplicate port {number}, see portLevelSettings[{seen_ports[number]}]"
                out.append(Issue(n_path, message))
            seen_ports.setdefault(number, i)
        if port_policy.load_balancer is not None:
            _load_balancer(port_policy.load_balancer, field(p_path, "loadBalancer"), out)
        validate_traffic_policy_resilience(
            port_policy.connection_pool, port_policy.outlier_detection, p_path, out
        )
        if port_policy.tls is not None:
            validate_client_tls(port_policy.tls, field(p_path, "tls"), out)


def _load_balancer(lb: LoadBalancerSettings, path: str, out: list[Issue]) -> None:
    if lb.simple is not None and lb.consistent_hash is not None:
        out.append(Issue(path, "must set only one of simple or consistentHash"))
    if lb.simple == "PASSTHROUGH":
        # a valid Istio value (the caller's destination address as is) that we lack:
        # refused as unsupported, not as a typo
        simple_path = field(path, "simple")
        out.append(
            Issue(
                simple_path,
                f"{simple_path} PASSTHROUGH is not supported (endpoints always come from the "
                f"registry; supported: {', '.join(LB_SIMPLE)})",
            )
        )
    elif lb.simple is not None and lb.simple not in LB_SIMPLE:
        out.append(
            Issue(
                field(path, "simple"),
                f"must be one of {', '.join(LB_SIMPLE)}, got {lb.simple!r}",
            )
        )
    ch = lb.consistent_hash
    if ch is None:
        return
    ch_path = field(path, "consistentHash")
    sources = [
        name
        for name, is_set in (
            ("httpHeaderName", bool(ch.http_header_name)),
            ("httpCookie", ch.http_cookie is not None),
            ("useSourceIp", ch.use_source_ip),
            ("httpQueryParameterName", bool(ch.http_query_parameter_name)),
        )
        if is_set
    ]
    if len(sources) != 1:
        got = ", ".join(sources) if sources else "none"
        out.append(
            Issue(
                ch_path,
                "must set exactly one of httpHeaderName, httpCookie, useSourceIp or "
                f"httpQueryParameterName, got {got}",
            )
        )
    if ch.http_header_name:
        _add(out, field(ch_path, "httpHeaderName"), checks.header_name(ch.http_header_name))
    if ch.http_cookie is not None:
        cookie_path = field(ch_path, "httpCookie")
        if not ch.http_cookie.name:
            out.append(Issue(field(cookie_path, "name"), "must not be empty"))
        if ch.http_cookie.ttl is not None:
            _duration(ch.http_cookie.ttl, field(cookie_path, "ttl"), out)
    ring = ch.minimum_ring_size
    if ring is not None and not 1 <= ring <= MAX_RING_SIZE:
        # the proxy allocates the ring: bound it as Envoy does
        ring_path = field(ch_path, "minimumRingSize")
        out.append(Issue(ring_path, f"must be between 1 and {MAX_RING_SIZE}, got {ring}"))


# ---------------------------------------------------------------- shared


def validate_metadata(meta: Metadata, path: str = "metadata") -> list[Issue]:
    out: list[Issue] = []
    name_path = field(path, "name")
    if not meta.name:
        out.append(Issue(name_path, "must not be empty"))
    else:
        _add(out, name_path, checks.dns_subdomain(meta.name))
    _add(out, field(path, "namespace"), checks.dns_label(meta.namespace))
    _labels(meta.labels, field(path, "labels"), out)
    return out


def _gateway_refs(refs: Iterable[str], path: str, out: list[Issue]) -> None:
    for i, ref in enumerate(refs):
        _add(out, item(path, i), checks.gateway_ref(ref))


def _labels(labels: Mapping[str, str], path: str, out: list[Issue]) -> None:
    for name, value in labels.items():
        label_path = key(path, name)
        _add(out, label_path, checks.label_key(name) or checks.label_value(value))


def _duration(text: str, path: str, out: list[Issue]) -> None:
    try:
        parse_duration_ms(text)
    except ValueError as exc:
        out.append(Issue(path, str(exc)))


def _add(out: list[Issue], path: str, problem: str | None) -> None:
    if problem is not None:
        out.append(Issue(path, problem))
