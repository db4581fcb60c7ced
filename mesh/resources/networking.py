"""Typed models of the `networking.istio.io` kinds we support, field for field.

Only the fields Meshwork implements exist here. Every model forbids unknown fields,
so a field Istio has and we do not (`corsPolicy`, `retries`, `connectionPool`, ...)
is rejected with its path instead of being dropped: an ignored policy field would
silently weaken what the user asked for.

Attribute names are snake_case; the YAML names are Istio's camelCase (`rename`).
Optional scalars whose zero value is not valid (ports, codes) default to None so
validation can tell "absent" from an explicit 0.
"""

from __future__ import annotations

import msgspec


class Model(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
    rename="camel",
    kw_only=True,
):
    """Base of every resource model: immutable, strict, Istio field names."""


# ---------------------------------------------------------------- VirtualService


class StringMatch(Model, frozen=True):
    """Exactly one of the three must be set (checked in validation)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


class HTTPMatchRequest(Model, frozen=True):
    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = {}
    without_headers: dict[str, StringMatch] = {}
    query_params: dict[str, StringMatch] = {}
    ignore_uri_case: bool = False
    source_labels: dict[str, str] = {}
    source_namespace: str = ""
    port: int | None = None
    gateways: tuple[str, ...] = ()


class PortSelector(Model, frozen=True):
    number: int


class Destination(Model, frozen=True):
    host: str
    subset: str = ""
    port: PortSelector | None = None


class HeaderOperations(Model, frozen=True):
    set: dict[str, str] = {}
    add: dict[str, str] = {}
    remove: tuple[str, ...] = ()


class Headers(Model, frozen=True):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class HTTPRouteDestination(Model, frozen=True):
    destination: Destination
    # Istio: an omitted weight is 0; with a single destination it is ignored
    weight: int = 0
    headers: Headers | None = None


class HTTPRedirect(Model, frozen=True):
    uri: str | None = None
    authority: str | None = None
    port: int | None = None
    scheme: str | None = None
    # None = Istio's default, 301
    redirect_code: int | None = None


class HTTPBody(Model, frozen=True):
    string: str


class HTTPDirectResponse(Model, frozen=True):
    status: int
    body: HTTPBody | None = None


class HTTPRewrite(Model, frozen=True):
    uri: str | None = None
    authority: str | None = None


class HTTPRoute(Model, frozen=True):
    name: str = ""
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    rewrite: HTTPRewrite | None = None
    headers: Headers | None = None
    # Go-style duration string, kept as written so `meshctl get` shows what was applied
    timeout: str | None = None


class VirtualServiceSpec(Model, frozen=True):
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()


# ---------------------------------------------------------------- DestinationRule


class HTTPCookie(Model, frozen=True):
    name: str
    path: str = ""
    ttl: str | None = None


class ConsistentHashLB(Model, frozen=True):
    http_header_name: str = ""
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool = False
    http_query_parameter_name: str = ""
    minimum_ring_size: int | None = None


class LoadBalancerSettings(Model, frozen=True):
    # ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN (alias of LEAST_REQUEST) or RANDOM
    simple: str | None = None
    consistent_hash: ConsistentHashLB | None = None


class TrafficPolicy(Model, frozen=True):
    load_balancer: LoadBalancerSettings | None = None


class Subset(Model, frozen=True):
    name: str
    labels: dict[str, str] = {}
    traffic_policy: TrafficPolicy | None = None


class DestinationRuleSpec(Model, frozen=True):
    host: str = ""
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()


# ---------------------------------------------------------------- Gateway


class Port(Model, frozen=True):
    number: int
    name: str = ""
    # empty = HTTP; kept as written so `meshctl get` shows what was applied
    protocol: str = ""


class Server(Model, frozen=True):
    port: Port
    hosts: tuple[str, ...] = ()
    name: str = ""


class GatewaySpec(Model, frozen=True):
    selector: dict[str, str] = {}
    servers: tuple[Server, ...] = ()
