"""Route selection: compile a route table once, then pick the first matching rule.

Compilation does everything that does not depend on the request: regexes are compiled
(Istio regexes are RE2 full matches: `re.fullmatch`), case-insensitive URIs are
lower-cased, label and header conditions become tuples, and every (rule, match) pair
is flattened into one ordered tuple whose `RouteMatch` result is built up front, so
`select_route` allocates nothing but the URI slice it compares.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

from mesh.compiled import (
    Destination,
    GatewayConfig,
    HTTPMatch,
    HTTPRoute,
    RouteTable,
    StringMatch,
    VirtualHost,
    WeightedDestination,
)
from mesh.hosts import canonical_host

from .errors import InvalidRouteConfig
from .request import RequestAttrs, authority_without_port, parse_query

StringMatcher = Callable[[str], bool]

# Istio's reserved gateway name for "sidecars in the mesh".
MESH_GATEWAY = "mesh"

_NO_QUERY: Mapping[str, str] = MappingProxyType({})


class RouteMatch(NamedTuple):
    """The rule that won and the `HTTPMatch` that fired (None: the rule has no match
    conditions). `rewrite_path` needs the match to know which prefix to replace."""

    route: HTTPRoute
    match: HTTPMatch | None


def compile_string_match(sm: StringMatch, field: str, *, lower: bool = False) -> StringMatcher:
    """A predicate for one StringMatch. `lower` folds exact/prefix values (the caller
    then passes a lower-cased subject); Istio's ignoreUriCase leaves regexes alone."""
    value = sm.value.lower() if lower else sm.value
    if sm.kind == "exact":
        return value.__eq__
    if sm.kind == "prefix":
        return lambda s: s.startswith(value)
    try:
        pattern = re.compile(sm.value)
    except re.error as exc:
        raise InvalidRouteConfig(f"{field}.regex", f"invalid regex {sm.value!r}: {exc}") from exc
    return lambda s: pattern.fullmatch(s) is not None


class _CompiledMatch:
    """One HTTPMatch, ready to test. Conditions are checked cheapest first."""

    __slots__ = (
        "authority",
        "gateways",
        "headers",
        "method",
        "port",
        "port_implicit",
        "query",
        "scheme",
        "source_labels",
        "source_namespace",
        "uri",
        "uri_folded",
        "without_headers",
    )

    def __init__(self, m: HTTPMatch, field: str) -> None:
        self.port = m.port
        self.port_implicit = m.port_implicit
        self.gateways = frozenset(m.gateways) if m.gateways else None
        self.source_namespace = m.source_namespace
        self.source_labels = tuple(m.source_labels.items())
        self.method = _optional(m.method, f"{field}.method")
        self.scheme = _optional(m.scheme, f"{field}.scheme")
        self.authority = _optional(m.authority, f"{field}.authority")
        self.uri_folded = m.ignore_uri_case and m.uri is not None and m.uri.kind != "regex"
        self.uri = (
            compile_string_match(m.uri, f"{field}.uri", lower=self.uri_folded)
            if m.uri is not None
            else None
        )
        self.headers = tuple(
            (name.lower(), compile_string_match(sm, f"{field}.headers.{name}"))
            for name, sm in m.headers.items()
        )
        self.without_headers = tuple(
            (name.lower(), _without_header_matcher(sm, f"{field}.withoutHeaders.{name}"))
            for name, sm in m.without_headers.items()
        )
        self.query = tuple(
            (name, compile_string_match(sm, f"{field}.queryParams.{name}"))
            for name, sm in m.query_params.items()
        )

    def test(self, req: RequestAttrs, uri: str, uri_lower: str, query: Mapping[str, str]) -> bool:
        if self.port and req.port != self.port and not (self.port_implicit and req.port == 0):
            return False
        if self.gateways is not None and not _at_gateway(self.gateways, req.gateway):
            return False
        if self.source_namespace and req.source_namespace != self.source_namespace:
            return False
        if self.source_labels:
            labels = req.source_labels
            for key, wanted in self.source_labels:
                if labels.get(key) != wanted:
                    return False
        if self.method is not None and not self.method(req.method):
            return False
        if self.scheme is not None and not self.scheme(req.scheme):
            return False
        if self.uri is not None and not self.uri(uri_lower if self.uri_folded else uri):
            return False
        if self.authority is not None and not self.authority(req.authority):
            # Envoy compares :authority as sent; a Host with a port also gets a second
            # chance without it, so `authority: {exact: reviews}` matches `reviews:9080`.
            bare = authority_without_port(req.authority)
            if bare == req.authority or not self.authority(bare):
                return False
        headers = req.headers
        for name, matcher in self.headers:
            value = headers.get(name)
            if value is None or not matcher(value):
                return False
        for name, without in self.without_headers:
            value = headers.get(name)
            if value is not None and (without is None or without(value)):
                return False
        for name, matcher in self.query:
            value = query.get(name)
            if value is None or not matcher(value):
                return False
        return True


def _at_gateway(gateways: frozenset[str], gateway: str) -> bool:
    if gateway in gateways:
        return True
    if not gateway:
        return MESH_GATEWAY in gateways
    # A gateway proxy selected by several Gateway resources is all of them at once.
    return "," in gateway and not gateways.isdisjoint(gateway.split(","))


def _optional(sm: StringMatch | None, field: str) -> StringMatcher | None:
    return compile_string_match(sm, field) if sm is not None else None


def _without_header_matcher(sm: StringMatch, field: str) -> StringMatcher | None:
    # Istio accepts `regex: "*"` in withoutHeaders to mean "header present" (it is
    # not a valid RE2); None here means "any value", i.e. the header must be absent.
    if sm.kind == "regex" and sm.value == "*":
        return None
    return compile_string_match(sm, field)


# (compiled conditions or None for a catch-all rule, the precomputed result)
_Rule = tuple[_CompiledMatch | None, RouteMatch]


class _RuleList(NamedTuple):
    rules: tuple[_Rule, ...]
    needs_lower_uri: bool
    needs_query: bool


def _compile_rules(routes: Sequence[HTTPRoute], field: str) -> _RuleList:
    rules: list[_Rule] = []
    needs_lower = needs_query = False
    for i, route in enumerate(routes):
        if not route.match:
            rules.append((None, RouteMatch(route, None)))
            continue
        for j, m in enumerate(route.match):
            compiled = _CompiledMatch(m, f"{field}[{i}].match[{j}]")
            needs_lower = needs_lower or compiled.uri_folded
            needs_query = needs_query or bool(compiled.query)
            rules.append((compiled, RouteMatch(route, m)))
    return _RuleList(tuple(rules), needs_lower, needs_query)


class CompiledRoutes:
    """An immutable, ready-to-match route table (one destination, or one gateway).

    Build with `compile_routes` or `compile_virtual_hosts`; share freely between
    requests and swap in one assignment when a new table arrives.
    """

    __slots__ = ("_any", "_by_host", "_exact", "_namespace", "_suffixes", "revision")

    def __init__(
        self,
        *,
        any_host: _RuleList | None,
        exact: dict[str, _RuleList] | None = None,
        suffixes: tuple[tuple[str, _RuleList], ...] = (),
        namespace: str = "",
        revision: int = 0,
    ) -> None:
        self._any = any_host
        self._exact = exact or {}
        self._suffixes = suffixes
        self._by_host = bool(self._exact or self._suffixes)
        self._namespace = namespace
        self.revision = revision

    def _rules_for(self, authority: str) -> _RuleList | None:
        if not self._by_host:
            return self._any
        host = authority_without_port(authority).lower().rstrip(".")
        rules = self._exact.get(host)
        if rules is None and self._namespace:
            fqdn = canonical_host(host, self._namespace)
            if fqdn != host:
                rules = self._exact.get(fqdn)
        if rules is not None:
            return rules
        for suffix, rules in self._suffixes:
            if host.endswith(suffix):
                return rules
        return self._any

    def select(self, req: RequestAttrs) -> RouteMatch | None:
        table = self._rules_for(req.authority)
        if table is None:
            return None
        path = req.path
        q = path.find("?")
        uri = path if q < 0 else path[:q]
        uri_lower = uri.lower() if table.needs_lower_uri else uri
        query = parse_query(path) if table.needs_query and q >= 0 else _NO_QUERY
        for compiled, result in table.rules:
            if compiled is None or compiled.test(req, uri, uri_lower, query):
                return result
        return None


def compile_routes(table: RouteTable) -> CompiledRoutes:
    """Compile one destination's table. Without a VirtualService, Istio's default route
    (all of the service's endpoints) is synthesised so a sidecar always gets a route;
    with one, a request matching no rule gets None (the caller answers 404 NR)."""
    routes = table.http
    if not routes and not table.has_virtual_service:
        default = HTTPRoute(
            name="default",
            route=(WeightedDestination(destination=Destination(host=table.host)),),
            origin="default",
        )
        routes = (default,)
    return CompiledRoutes(any_host=_compile_rules(routes, "http"), revision=table.revision)


def compile_virtual_hosts(
    virtual_hosts: Sequence[VirtualHost], namespace: str, revision: int = 0
) -> CompiledRoutes:
    """Compile a gateway's virtual hosts. A request picks its virtual host by Host
    (port ignored, case-insensitive) in Envoy's order: exact name, then the longest
    `*.suffix`, then `*`; the first virtual host listing a name wins. A short Host such
    as `reviews` or `reviews.default` is also tried as resolved in the gateway's
    `namespace`, as a sidecar there would (Istio's gateways want the full name)."""
    exact: dict[str, _RuleList] = {}
    suffixes: dict[str, _RuleList] = {}
    any_host: _RuleList | None = None
    for i, vh in enumerate(virtual_hosts):
        rules = _compile_rules(vh.http, f"virtual_hosts[{i}].http")
        for pattern in vh.hosts:
            host = pattern.lower()
            if host == "*":
                any_host = any_host or rules
            elif host.startswith("*."):
                suffixes.setdefault(host[1:], rules)
            else:
                exact.setdefault(host, rules)
    # Longest suffix first: `*.api.example.com` beats `*.example.com`.
    ordered = tuple(sorted(suffixes.items(), key=lambda kv: len(kv[0]), reverse=True))
    return CompiledRoutes(
        any_host=any_host,
        exact=exact,
        suffixes=ordered,
        namespace=namespace,
        revision=revision,
    )


def compile_gateway(config: GatewayConfig) -> CompiledRoutes:
    """`compile_virtual_hosts` for a published `GatewayConfig`."""
    return compile_virtual_hosts(config.virtual_hosts, config.namespace, config.revision)


def select_route(compiled: CompiledRoutes, req: RequestAttrs) -> RouteMatch | None:
    """The first rule whose match conditions hold (a rule without conditions matches
    everything), or None: no route, answer 404 (response flag NR)."""
    return compiled.select(req)
