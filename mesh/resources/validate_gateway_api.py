"""Semantic validation of HTTPRoute and GRPCRoute, with the Gateway API's rules.

What the Gateway API allows and Meshwork does not serve yet (a `Gateway` parent, a
redirect that replaces a path prefix, `extensionRef` filters, ...) is refused with its
path, never ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mesh.resources import checks
from mesh.resources.durations import parse_duration_ms
from mesh.resources.errors import Issue, field, item, required, unsupported
from mesh.resources.gateway_api import (
    GATEWAY_API_GROUP,
    GATEWAY_CLASSES,
    BackendRef,
    GatewayAPIGatewaySpec,
    GRPCBackendRef,
    GRPCRouteFilter,
    GRPCRouteSpec,
    HeaderMatch,
    HeaderModifier,
    HTTPRouteFilter,
    HTTPRouteRule,
    HTTPRouteSpec,
    MirrorBackendRef,
    ParentReference,
    PathModifier,
    RequestMirror,
)

CORE_GROUPS = ("", "core")
PATH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
MATCH_TYPES = ("Exact", "RegularExpression")
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
REDIRECT_CODES = (301, 302, 303, 307, 308)
HTTP_FILTERS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
}
BACKEND_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier")
GRPC_FILTERS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror",
}
# the spec's limit on rules of one route
MAX_RULES = 16
_GRPC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def is_service_parent(ref: ParentReference) -> bool:
    return ref.group in CORE_GROUPS and ref.kind == "Service"


def is_gateway_parent(ref: ParentReference) -> bool:
    return ref.group == GATEWAY_API_GROUP and ref.kind == "Gateway"


LISTENER_PROTOCOLS = ("HTTP",)
ROUTES_FROM = ("Same", "All")
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")


def validate_gateway_api_gateway(spec: GatewayAPIGatewaySpec, path: str = "spec") -> list[Issue]:
    out: list[Issue] = []
    class_path = field(path, "gatewayClassName")
    if not spec.gateway_class_name:
        out.append(required(class_path))
    elif spec.gateway_class_name not in GATEWAY_CLASSES:
        message = (
            f"gatewayClassName {spec.gateway_class_name} is not served here "
            f"(served: {', '.join(GATEWAY_CLASSES)})"
        )
        out.append(Issue(class_path, message))
    listeners_path = field(path, "listeners")
    if not spec.listeners:
        out.append(Issue(listeners_path, "must list at least one listener"))
    seen: set[str] = set()
    for i, listener in enumerate(spec.listeners):
        l_path = item(listeners_path, i)
        _add(out, field(l_path, "name"), checks.dns_label(listener.name))
        if listener.name in seen:
            out.append(Issue(field(l_path, "name"), f"duplicate listener name {listener.name!r}"))
        seen.add(listener.name)
        _add(out, field(l_path, "port"), checks.port(listener.port))
        if listener.protocol not in LISTENER_PROTOCOLS:
            message = f"protocol {listener.protocol} is not supported (supported: HTTP)"
            out.append(Issue(field(l_path, "protocol"), message))
        if listener.hostname is not None:
            _add(out, field(l_path, "hostname"), checks.host(listener.hostname))
        allowed = listener.allowed_routes
        if allowed is None:
            continue
        a_path = field(l_path, "allowedRoutes")
        if allowed.namespaces is not None and allowed.namespaces.from_ not in ROUTES_FROM:
            message = (
                f"from {allowed.namespaces.from_} is not supported (supported: Same, All; "
                "there are no Namespace objects to select)"
            )
            out.append(Issue(field(a_path, "namespaces.from"), message))
        for j, kind in enumerate(allowed.kinds):
            if kind.group != GATEWAY_API_GROUP or kind.kind not in ROUTE_KINDS:
                message = f"must be HTTPRoute or GRPCRoute of {GATEWAY_API_GROUP}, got {kind.kind}"
                out.append(Issue(item(field(a_path, "kinds"), j), message))
    return out


def validate_http_route(spec: HTTPRouteSpec, path: str = "spec") -> list[Issue]:
    out: list[Issue] = []
    _parents(spec.parent_refs, spec.hostnames, path, out)
    rules_path = field(path, "rules")
    if len(spec.rules) > MAX_RULES:
        out.append(Issue(rules_path, f"must list at most {MAX_RULES} rules, got {len(spec.rules)}"))
    for i, rule in enumerate(spec.rules):
        _http_rule(rule, item(rules_path, i), out)
    return out


def validate_grpc_route(spec: GRPCRouteSpec, path: str = "spec") -> list[Issue]:
    out: list[Issue] = []
    _parents(spec.parent_refs, spec.hostnames, path, out)
    rules_path = field(path, "rules")
    for i, rule in enumerate(spec.rules):
        rule_path = item(rules_path, i)
        for j, match in enumerate(rule.matches):
            match_path = item(field(rule_path, "matches"), j)
            if match.method is not None:
                m_path = field(match_path, "method")
                m = match.method
                if m.type not in MATCH_TYPES:
                    out.append(Issue(field(m_path, "type"), _one_of(MATCH_TYPES, m.type)))
                if m.service is None and m.method is None:
                    out.append(Issue(m_path, "must set service or method"))
                for name, value in (("service", m.service), ("method", m.method)):
                    if value is None:
                        continue
                    if m.type == "Exact" and not _GRPC_NAME.fullmatch(value):
                        message = f"must be a gRPC {name} name, got {value!r}"
                        out.append(Issue(field(m_path, name), message))
                    elif m.type == "RegularExpression":
                        _regex(value, field(m_path, name), out)
            _header_matches(match.headers, field(match_path, "headers"), out)
        _grpc_filters(rule.filters, field(rule_path, "filters"), out)
        _backends(rule.backend_refs, field(rule_path, "backendRefs"), out)
    return out


# ---------------------------------------------------------------- parents


def _parents(
    parents: tuple[ParentReference, ...], hostnames: tuple[str, ...], path: str, out: list[Issue]
) -> None:
    parents_path = field(path, "parentRefs")
    if not parents:
        out.append(Issue(parents_path, "must list at least one parent (a mesh Service)"))
    for i, ref in enumerate(parents):
        ref_path = item(parents_path, i)
        gateway = is_gateway_parent(ref)
        if not gateway and not is_service_parent(ref):
            out.append(
                Issue(
                    field(ref_path, "kind"),
                    f"parent {ref.group or 'core'}/{ref.kind} is not supported "
                    f'(supported: group "", kind Service; group {GATEWAY_API_GROUP}, '
                    "kind Gateway)",
                )
            )
            continue
        if not ref.name:
            out.append(required(field(ref_path, "name")))
        else:
            _add(out, field(ref_path, "name"), checks.dns_label(ref.name))
        if ref.namespace:
            _add(out, field(ref_path, "namespace"), checks.dns_label(ref.namespace))
        if ref.section_name:
            if gateway:
                _add(out, field(ref_path, "sectionName"), checks.dns_label(ref.section_name))
            else:
                out.append(unsupported(field(ref_path, "sectionName")))
        if ref.port is not None:
            _add(out, field(ref_path, "port"), checks.port(ref.port))
    for i, host in enumerate(hostnames):
        _add(out, item(field(path, "hostnames"), i), checks.host(host))
    if hostnames and any(is_service_parent(ref) for ref in parents):
        out.append(
            Issue(
                field(path, "hostnames"),
                "hostnames with a Service parent is not supported: the mesh profile gives "
                "it no meaning (GEP-1294), the route applies to the Service's own host; "
                "match the Host header instead",
            )
        )


# ---------------------------------------------------------------- HTTPRoute rules


def _http_rule(rule: HTTPRouteRule, path: str, out: list[Issue]) -> None:
    for j, match in enumerate(rule.matches):
        match_path = item(field(path, "matches"), j)
        if match.path is not None:
            p_path = field(match_path, "path")
            if match.path.type not in PATH_TYPES:
                out.append(Issue(field(p_path, "type"), _one_of(PATH_TYPES, match.path.type)))
            elif match.path.type == "RegularExpression":
                _regex(match.path.value, field(p_path, "value"), out)
            elif not match.path.value.startswith("/"):
                message = f"must be an absolute path, got {match.path.value!r}"
                out.append(Issue(field(p_path, "value"), message))
            else:
                _add(out, field(p_path, "value"), _uri(match.path.value))
        _header_matches(match.headers, field(match_path, "headers"), out)
        _header_matches(match.query_params, field(match_path, "queryParams"), out, query=True)
        if match.method is not None and match.method not in METHODS:
            out.append(Issue(field(match_path, "method"), _one_of(METHODS, match.method)))
    filters_path = field(path, "filters")
    kinds = [f.type for f in rule.filters]
    _http_filters(rule.filters, filters_path, out)
    if "RequestRedirect" in kinds and "URLRewrite" in kinds:
        out.append(Issue(filters_path, "must not set both RequestRedirect and URLRewrite"))
    if "RequestRedirect" in kinds and rule.backend_refs:
        message = "must not be set with a RequestRedirect filter"
        out.append(Issue(field(path, "backendRefs"), message))
    for f_index, f in enumerate(rule.filters):
        modifier, where = None, ""
        if f.url_rewrite is not None:
            modifier, where = f.url_rewrite.path, "urlRewrite.path"
        elif f.request_redirect is not None:
            modifier, where = f.request_redirect.path, "requestRedirect.path"
        if modifier is not None and modifier.type == "ReplacePrefixMatch":
            prefixes = [m for m in rule.matches if m.path is None or m.path.type == "PathPrefix"]
            if len(prefixes) != len(rule.matches):
                out.append(
                    Issue(
                        field(item(filters_path, f_index), where),
                        "ReplacePrefixMatch needs every match to be a PathPrefix match",
                    )
                )
    _backends(rule.backend_refs, field(path, "backendRefs"), out)
    if rule.timeouts is not None:
        t_path = field(path, "timeouts")
        request_ms = _duration(rule.timeouts.request, field(t_path, "request"), out)
        backend_ms = _duration(rule.timeouts.backend_request, field(t_path, "backendRequest"), out)
        if request_ms and backend_ms and backend_ms > request_ms:
            message = "must not be longer than timeouts.request"
            out.append(Issue(field(t_path, "backendRequest"), message))


def _http_filters(filters: tuple[HTTPRouteFilter, ...], path: str, out: list[Issue]) -> None:
    seen: set[str] = set()
    for i, f in enumerate(filters):
        f_path = item(path, i)
        config_name = HTTP_FILTERS.get(f.type)
        if config_name is None:
            message = f"filter type {f.type} is not supported ({', '.join(HTTP_FILTERS)})"
            out.append(Issue(field(f_path, "type"), message))
            continue
        if f.type in seen:
            # one mirror per rule is what both data planes carry (the spec allows more)
            out.append(Issue(field(f_path, "type"), f"{f.type} may appear only once per rule"))
        seen.add(f.type)
        _filter_config(f, f_path, config_name, out)
        if f.request_header_modifier is not None:
            _modifier(f.request_header_modifier, field(f_path, "requestHeaderModifier"), out)
        if f.response_header_modifier is not None:
            _modifier(f.response_header_modifier, field(f_path, "responseHeaderModifier"), out)
        if f.request_redirect is not None:
            r = f.request_redirect
            r_path = field(f_path, "requestRedirect")
            if r.scheme is not None and r.scheme not in ("http", "https"):
                out.append(
                    Issue(field(r_path, "scheme"), f"must be http or https, got {r.scheme!r}")
                )
            if r.hostname is not None:
                _add(out, field(r_path, "hostname"), checks.host(r.hostname, wildcard=False))
            if r.port is not None:
                _add(out, field(r_path, "port"), checks.port(r.port))
            if r.status_code not in REDIRECT_CODES:
                message = f"must be one of 301, 302, 303, 307, 308, got {r.status_code}"
                out.append(Issue(field(r_path, "statusCode"), message))
            if r.path is not None:
                _path_modifier(r.path, field(r_path, "path"), out)
        if f.url_rewrite is not None:
            w_path = field(f_path, "urlRewrite")
            if f.url_rewrite.hostname is not None:
                host_problem = checks.host(f.url_rewrite.hostname, wildcard=False)
                _add(out, field(w_path, "hostname"), host_problem)
            if f.url_rewrite.path is not None:
                _path_modifier(f.url_rewrite.path, field(w_path, "path"), out)
        if f.request_mirror is not None:
            _mirror(f.request_mirror, field(f_path, "requestMirror"), out)


def _grpc_filters(filters: tuple[GRPCRouteFilter, ...], path: str, out: list[Issue]) -> None:
    seen: set[str] = set()
    for i, f in enumerate(filters):
        f_path = item(path, i)
        config_name = GRPC_FILTERS.get(f.type)
        if config_name is None:
            message = f"filter type {f.type} is not supported ({', '.join(GRPC_FILTERS)})"
            out.append(Issue(field(f_path, "type"), message))
            continue
        if f.type in seen:
            out.append(Issue(field(f_path, "type"), f"{f.type} may appear only once per rule"))
        seen.add(f.type)
        _filter_config(f, f_path, config_name, out)
        if f.request_header_modifier is not None:
            _modifier(f.request_header_modifier, field(f_path, "requestHeaderModifier"), out)
        if f.response_header_modifier is not None:
            _modifier(f.response_header_modifier, field(f_path, "responseHeaderModifier"), out)
        if f.request_mirror is not None:
            _mirror(f.request_mirror, field(f_path, "requestMirror"), out)


def _filter_config(
    f: HTTPRouteFilter | GRPCRouteFilter, path: str, config_name: str, out: list[Issue]
) -> None:
    """Exactly the configuration field its `type` names (the spec's CEL rule)."""
    present = [
        name
        for name, attr in (
            ("requestHeaderModifier", "request_header_modifier"),
            ("responseHeaderModifier", "response_header_modifier"),
            ("requestRedirect", "request_redirect"),
            ("urlRewrite", "url_rewrite"),
            ("requestMirror", "request_mirror"),
        )
        if getattr(f, attr, None) is not None
    ]
    if config_name not in present:
        out.append(required(field(path, config_name)))
    for name in present:
        if name != config_name:
            message = f"must not be set for a filter of type {f.type}"
            out.append(Issue(field(path, name), message))


def _path_modifier(modifier: PathModifier, path: str, out: list[Issue]) -> None:
    if modifier.type == "ReplaceFullPath":
        value, other = modifier.replace_full_path, modifier.replace_prefix_match
        name = "replaceFullPath"
    elif modifier.type == "ReplacePrefixMatch":
        value, other = modifier.replace_prefix_match, modifier.replace_full_path
        name = "replacePrefixMatch"
    else:
        out.append(
            Issue(
                field(path, "type"),
                _one_of(("ReplaceFullPath", "ReplacePrefixMatch"), modifier.type),
            )
        )
        return
    if value is None:
        out.append(required(field(path, name)))
    elif not value.startswith("/"):
        out.append(Issue(field(path, name), f"must be an absolute path, got {value!r}"))
    else:
        _add(out, field(path, name), _uri(value))
    if other is not None:
        out.append(Issue(path, f"must set only {name} for type {modifier.type}"))


def _modifier(modifier: HeaderModifier, path: str, out: list[Issue]) -> None:
    names: set[str] = set()
    for op in ("set", "add"):
        for i, header in enumerate(getattr(modifier, op)):
            h_path = item(field(path, op), i)
            problem = checks.header_name(header.name) or checks.header_value(header.value)
            _add(out, h_path, problem)
            if header.name.lower() in names:
                out.append(Issue(h_path, f"header {header.name} appears twice"))
            names.add(header.name.lower())
    for i, name in enumerate(modifier.remove):
        _add(out, item(field(path, "remove"), i), checks.header_name(name))


def _mirror(mirror: RequestMirror, path: str, out: list[Issue]) -> None:
    _backend_target(mirror.backend_ref, field(path, "backendRef"), out)
    if mirror.percent is not None and mirror.fraction is not None:
        out.append(Issue(path, "must set only one of percent or fraction"))
    if mirror.percent is not None and not 0 <= mirror.percent <= 100:
        message = f"must be between 0 and 100, got {mirror.percent}"
        out.append(Issue(field(path, "percent"), message))
    if mirror.fraction is not None:
        fr = mirror.fraction
        if fr.denominator <= 0 or not 0 <= fr.numerator <= fr.denominator:
            message = f"must be 0 <= numerator <= denominator, denominator > 0, got {fr}"
            out.append(Issue(field(path, "fraction"), message))


# ---------------------------------------------------------------- backends


def _backends(refs: Sequence[BackendRef | GRPCBackendRef], path: str, out: list[Issue]) -> None:
    for i, ref in enumerate(refs):
        ref_path = item(path, i)
        _backend_target(ref, ref_path, out)
        if not 0 <= ref.weight <= 1_000_000:
            message = f"must be between 0 and 1000000, got {ref.weight}"
            out.append(Issue(field(ref_path, "weight"), message))
        filters: Sequence[HTTPRouteFilter | GRPCRouteFilter] = ref.filters
        for j, f in enumerate(filters):
            f_path = item(field(ref_path, "filters"), j)
            if f.type not in BACKEND_FILTERS:
                message = (
                    f"filter type {f.type} on a backend is not supported "
                    f"({', '.join(BACKEND_FILTERS)})"
                )
                out.append(Issue(field(f_path, "type"), message))
                continue
            _filter_config(f, f_path, HTTP_FILTERS[f.type], out)
            if f.request_header_modifier is not None:
                _modifier(f.request_header_modifier, field(f_path, "requestHeaderModifier"), out)
            if f.response_header_modifier is not None:
                _modifier(f.response_header_modifier, field(f_path, "responseHeaderModifier"), out)


def _backend_target(
    ref: MirrorBackendRef | BackendRef | GRPCBackendRef, path: str, out: list[Issue]
) -> None:
    if ref.group not in CORE_GROUPS or ref.kind != "Service":
        message = f"backend {ref.group or 'core'}/{ref.kind} is not supported (supported: Service)"
        out.append(Issue(field(path, "kind"), message))
        return
    if not ref.name:
        out.append(required(field(path, "name")))
    else:
        _add(out, field(path, "name"), checks.dns_label(ref.name))
    if ref.namespace:
        _add(out, field(path, "namespace"), checks.dns_label(ref.namespace))
    if ref.port is None:
        out.append(Issue(field(path, "port"), "is required for a Service backend"))
    else:
        _add(out, field(path, "port"), checks.port(ref.port))


# ---------------------------------------------------------------- shared


def _header_matches(
    matches: tuple[HeaderMatch, ...], path: str, out: list[Issue], *, query: bool = False
) -> None:
    seen: set[str] = set()
    for i, m in enumerate(matches):
        m_path = item(path, i)
        if m.type not in MATCH_TYPES:
            out.append(Issue(field(m_path, "type"), _one_of(MATCH_TYPES, m.type)))
        if not query:
            _add(out, field(m_path, "name"), checks.header_name(m.name))
        elif not m.name:
            out.append(Issue(field(m_path, "name"), "must not be empty"))
        # names are case-insensitive for headers, exact for query parameters
        name = m.name if query else m.name.lower()
        if name in seen:
            # the spec: only the first entry with a name is considered; refusing the
            # rest is clearer than ignoring them
            out.append(Issue(field(m_path, "name"), f"{m.name} is matched twice"))
        seen.add(name)
        if m.type == "RegularExpression":
            _regex(m.value, field(m_path, "value"), out)


def _regex(pattern: str, path: str, out: list[Issue]) -> None:
    _add(out, path, checks.regex(pattern))


def _uri(value: str) -> str | None:
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return f"must not contain whitespace or control characters, got {value!r}"
    return None


def _duration(text: str | None, path: str, out: list[Issue]) -> int:
    if text is None:
        return 0
    try:
        return parse_duration_ms(text)
    except ValueError as exc:
        out.append(Issue(path, str(exc)))
        return 0


def _one_of(allowed: tuple[str, ...], got: str) -> str:
    return f"must be one of {', '.join(allowed)}, got {got!r}"


def _add(out: list[Issue], path: str, problem: str | None) -> None:
    if problem is not None:
        out.append(Issue(path, problem))
