"""Typed models of the Gateway API kinds we support (`gateway.networking.k8s.io`).

`HTTPRoute` and `GRPCRoute` attach to a mesh `Service` (the GAMMA mesh profile) with
`parentRefs`; see docs/architecture.md "Gateway API routes". As for the Istio kinds,
only the fields Meshwork implements exist and unknown fields are refused with their
path. Field names are the Gateway API's camelCase; defaults are the spec's (a
missing path match is `PathPrefix /`, a missing weight is 1, a redirect is 302).
"""

from __future__ import annotations

import msgspec

from mesh.resources.networking import Model

GATEWAY_API_GROUP = "gateway.networking.k8s.io"


class ParentReference(Model, frozen=True):
    # the spec's defaults: a Gateway of the Gateway API group
    group: str = GATEWAY_API_GROUP
    kind: str = "Gateway"
    namespace: str = ""
    name: str = ""
    section_name: str = ""
    port: int | None = None


class BackendRef(Model, frozen=True):
    """A Service in the core group ("") is the only backend kind; `port` is required
    for it, as the spec says."""

    group: str = ""
    kind: str = "Service"
    name: str = ""
    namespace: str = ""
    port: int | None = None
    weight: int = 1
    filters: tuple[HTTPRouteFilter, ...] = ()


class HTTPHeader(Model, frozen=True):
    name: str
    value: str


class HeaderModifier(Model, frozen=True):
    set: tuple[HTTPHeader, ...] = ()
    add: tuple[HTTPHeader, ...] = ()
    remove: tuple[str, ...] = ()


class PathModifier(Model, frozen=True):
    type: str = ""
    replace_full_path: str | None = None
    replace_prefix_match: str | None = None


class RequestRedirect(Model, frozen=True):
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    # the spec's default is 302
    status_code: int = 302


class URLRewrite(Model, frozen=True):
    hostname: str | None = None
    path: PathModifier | None = None


class MirrorBackendRef(Model, frozen=True):
    group: str = ""
    kind: str = "Service"
    name: str = ""
    namespace: str = ""
    port: int | None = None


class Fraction(Model, frozen=True):
    numerator: int
    denominator: int = 100


class RequestMirror(Model, frozen=True):
    backend_ref: MirrorBackendRef
    percent: int | None = None
    fraction: Fraction | None = None


class HTTPRouteFilter(Model, frozen=True):
    type: str
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None
    request_redirect: RequestRedirect | None = None
    url_rewrite: URLRewrite | None = None
    request_mirror: RequestMirror | None = None


class PathMatch(Model, frozen=True):
    type: str = "PathPrefix"
    value: str = "/"


class HeaderMatch(Model, frozen=True):
    """A header or query parameter match (the spec's two types share this shape)."""

    name: str
    value: str
    type: str = "Exact"


class HTTPRouteMatch(Model, frozen=True):
    path: PathMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[HeaderMatch, ...] = ()
    method: str | None = None


class HTTPRouteTimeouts(Model, frozen=True):
    request: str | None = None
    backend_request: str | None = None


class HTTPRouteRule(Model, frozen=True):
    name: str = ""
    matches: tuple[HTTPRouteMatch, ...] = ()
    filters: tuple[HTTPRouteFilter, ...] = ()
    backend_refs: tuple[BackendRef, ...] = ()
    timeouts: HTTPRouteTimeouts | None = None


class HTTPRouteSpec(Model, frozen=True):
    parent_refs: tuple[ParentReference, ...] = ()
    hostnames: tuple[str, ...] = ()
    rules: tuple[HTTPRouteRule, ...] = ()


# ---------------------------------------------------------------- GRPCRoute


class GRPCMethodMatch(Model, frozen=True):
    type: str = "Exact"
    service: str | None = None
    method: str | None = None


class GRPCRouteMatch(Model, frozen=True):
    method: GRPCMethodMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()


class GRPCRouteFilter(Model, frozen=True):
    type: str
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None
    request_mirror: RequestMirror | None = None


class GRPCBackendRef(Model, frozen=True):
    group: str = ""
    kind: str = "Service"
    name: str = ""
    namespace: str = ""
    port: int | None = None
    weight: int = 1
    filters: tuple[GRPCRouteFilter, ...] = ()


class GRPCRouteRule(Model, frozen=True):
    name: str = ""
    matches: tuple[GRPCRouteMatch, ...] = ()
    filters: tuple[GRPCRouteFilter, ...] = ()
    backend_refs: tuple[GRPCBackendRef, ...] = ()


class GRPCRouteSpec(Model, frozen=True):
    parent_refs: tuple[ParentReference, ...] = ()
    hostnames: tuple[str, ...] = ()
    rules: tuple[GRPCRouteRule, ...] = ()


# ---------------------------------------------------------------- Gateway

# the registry's name for the Gateway API's `Gateway` (Istio's `Gateway` has the plain
# name): a registry name `<Kind>.<group>` is written `<Kind>` in documents
GATEWAY_KIND = f"Gateway.{GATEWAY_API_GROUP}"
# the classes `meshctl gateway` serves: Istio's, so Istio's files work, and ours
GATEWAY_CLASSES = ("istio", "meshwork")
# the label that binds a `meshctl gateway` to a Gateway (Istio's deployed gateways
# carry it)
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


class RouteNamespaces(Model, frozen=True):
    # the spec's default: routes in the Gateway's namespace only
    from_: str = msgspec.field(default="Same", name="from")


class RouteGroupKind(Model, frozen=True):
    kind: str
    group: str = GATEWAY_API_GROUP


class AllowedRoutes(Model, frozen=True):
    namespaces: RouteNamespaces | None = None
    kinds: tuple[RouteGroupKind, ...] = ()


class Listener(Model, frozen=True):
    name: str
    port: int
    protocol: str
    hostname: str | None = None
    allowed_routes: AllowedRoutes | None = None


class GatewayAPIGatewaySpec(Model, frozen=True):
    gateway_class_name: str = ""
    listeners: tuple[Listener, ...] = ()
