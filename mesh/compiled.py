"""Compiled proxy configuration: what the config service publishes and proxies apply.

These are the wire types of `mesh.config.route.<ns>.<svc>` (one `RouteTable` per
destination service) and of gateway configs. They are produced from validated
resources by `services/config/compile.py` (pure) and consumed by the proxy's routing
core (pure). All hosts in here are canonical (see `mesh.hosts`). Durations are
milliseconds (ints), percentages are floats in [0, 100].

Encoded with msgspec MessagePack; every Struct is frozen, so a compiled table can be
shared between requests without copying.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class StringMatch(msgspec.Struct, frozen=True, omit_defaults=True):
    """Istio StringMatch: exactly one of exact / prefix / regex (RE2-like, full match)."""

    kind: Literal["exact", "prefix", "regex"]
    value: str


class HTTPMatch(msgspec.Struct, frozen=True, omit_defaults=True):
    """One HTTPMatchRequest. All set conditions must hold (AND); a route's matches are ORed."""

    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    # header names are lower-cased
    headers: dict[str, StringMatch] = {}
    without_headers: dict[str, StringMatch] = {}
    query_params: dict[str, StringMatch] = {}
    ignore_uri_case: bool = False
    # labels of the *calling* workload (the proxy applying the table)
    source_labels: dict[str, str] = {}
    source_namespace: str = ""
    port: int = 0
    # gateway names (canonical "<ns>/<name>") this match is limited to; empty = any
    gateways: tuple[str, ...] = ()


class HeaderOps(msgspec.Struct, frozen=True, omit_defaults=True):
    set: dict[str, str] = {}
    add: dict[str, str] = {}
    remove: tuple[str, ...] = ()


class Headers(msgspec.Struct, frozen=True, omit_defaults=True):
    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()


class Destination(msgspec.Struct, frozen=True, omit_defaults=True):
    host: str
    subset: str = ""
    port: int = 0


class WeightedDestination(msgspec.Struct, frozen=True, omit_defaults=True):
    destination: Destination
    weight: int = 100
    headers: Headers = Headers()


class Rewrite(msgspec.Struct, frozen=True, omit_defaults=True):
    uri: str | None = None
    authority: str | None = None


class Redirect(msgspec.Struct, frozen=True, omit_defaults=True):
    uri: str | None = None
    authority: str | None = None
    port: int = 0
    scheme: str | None = None
    redirect_code: int = 301


class DirectResponse(msgspec.Struct, frozen=True, omit_defaults=True):
    status: int
    body: str | None = None


class HTTPRoute(msgspec.Struct, frozen=True, omit_defaults=True):
    """One VirtualService `http[]` rule. The first route whose matches hold wins."""

    name: str = ""
    # empty = matches every request
    match: tuple[HTTPMatch, ...] = ()
    route: tuple[WeightedDestination, ...] = ()
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    rewrite: Rewrite | None = None
    headers: Headers = Headers()
    # whole-request timeout; 0 = none
    timeout_ms: int = 0
    # "<kind>/<ns>/<name>" of the VirtualService this rule came from, for config_dump
    origin: str = ""


class HTTPCookie(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    path: str = ""
    ttl_ms: int = 0


class ConsistentHash(msgspec.Struct, frozen=True, omit_defaults=True):
    """Exactly one key source is set."""

    http_header_name: str = ""
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool = False
    http_query_parameter_name: str = ""
    minimum_ring_size: int = 1024


class LoadBalancer(msgspec.Struct, frozen=True, omit_defaults=True):
    simple: Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"] = "ROUND_ROBIN"
    consistent_hash: ConsistentHash | None = None


class TrafficPolicy(msgspec.Struct, frozen=True, omit_defaults=True):
    load_balancer: LoadBalancer = LoadBalancer()


class Subset(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    labels: dict[str, str] = {}
    # subset-level policy, already merged over the destination-level one
    traffic_policy: TrafficPolicy = TrafficPolicy()


class RouteTable(msgspec.Struct, frozen=True, omit_defaults=True, tag=True):
    """Everything a client proxy needs to send traffic to one destination service.

    `http` holds the VirtualService rules for `host` (empty: the default route, all of
    the service's endpoints). `subsets`/`traffic_policy` are that service's
    DestinationRule. `exists` is False when the config service knows no such service
    and no resource names it (the proxy still asks the registry for endpoints).
    """

    namespace: str
    service: str
    host: str
    revision: int
    http: tuple[HTTPRoute, ...] = ()
    subsets: tuple[Subset, ...] = ()
    traffic_policy: TrafficPolicy = TrafficPolicy()
    # True when at least one VirtualService defines `http` for this host: then a
    # request that matches no rule gets 404 NR, as in Istio
    has_virtual_service: bool = False
    # revision of the previous publish for this destination by the same leader (0 =
    # unknown), for observability: tables are full states, the newest always wins
    prev_revision: int = 0
    # True when some resource names this service (set by the config service)
    exists: bool = False


class GatewayServer(msgspec.Struct, frozen=True, omit_defaults=True):
    port: int
    protocol: str = "HTTP"
    hosts: tuple[str, ...] = ()


class VirtualHost(msgspec.Struct, frozen=True, omit_defaults=True):
    """Routes bound to a gateway for a set of host patterns (`*` allowed)."""

    hosts: tuple[str, ...]
    http: tuple[HTTPRoute, ...] = ()


class GatewayConfig(msgspec.Struct, frozen=True, omit_defaults=True, tag=True):
    """Compiled config for gateway proxies whose labels a Gateway resource selects."""

    namespace: str
    name: str
    revision: int
    selector: dict[str, str] = {}
    servers: tuple[GatewayServer, ...] = ()
    virtual_hosts: tuple[VirtualHost, ...] = ()
    prev_revision: int = 0


# ================================================================ inbound policy
# `mesh.config.inbound.<ns>.<svc>`: what the *server* sidecars of one service enforce.
# Selectors are kept: instances of one service differ in labels (version), so each
# sidecar keeps the policies whose selector matches its own labels.

MtlsMode = Literal["UNSET", "STRICT", "PERMISSIVE", "DISABLE"]


class PeerAuthn(msgspec.Struct, frozen=True, omit_defaults=True):
    """One PeerAuthentication. `scope` orders specificity: a workload policy (with a
    selector) beats the namespace one, which beats the mesh-wide one (root namespace).
    UNSET inherits from the next wider scope; the mesh default is PERMISSIVE."""

    name: str
    namespace: str
    scope: Literal["mesh", "namespace", "workload"]
    selector: dict[str, str] = {}
    mode: MtlsMode = "UNSET"
    # port of the *app* (the workload port, as in Istio) -> mode; only workload scope
    port_modes: dict[int, MtlsMode] = {}
    create_revision: int = 0  # oldest wins among equals, as Istio does


class Source(msgspec.Struct, frozen=True, omit_defaults=True):
    """`rules[].from[].source`: every field set must hold (AND); values within a field
    are ORed. Principals use Istio's form `cluster.local/ns/N/sa/SA` (`*` prefix/suffix)."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()


class Operation(msgspec.Struct, frozen=True, omit_defaults=True):
    """`rules[].to[].operation`; ports are strings as in Istio."""

    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()


class Condition(msgspec.Struct, frozen=True, omit_defaults=True):
    """`rules[].when[]`: key is one of the documented keys (validated at apply)."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


class AuthzRule(msgspec.Struct, frozen=True, omit_defaults=True):
    """A rule matches when any `from` matches (or none given), any `to` matches (or
    none given) and every `when` holds."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    when: tuple[Condition, ...] = ()


class AuthzPolicy(msgspec.Struct, frozen=True, omit_defaults=True):
    """One AuthorizationPolicy. `rules` empty: matches nothing (so an ALLOW policy with
    an empty spec allows nothing, and denies everything, as in Istio)."""

    name: str
    namespace: str
    action: Literal["ALLOW", "DENY", "AUDIT"] = "ALLOW"
    selector: dict[str, str] = {}
    # True for a policy in the root namespace (applies mesh-wide)
    mesh_wide: bool = False
    rules: tuple[AuthzRule, ...] = ()


class InboundPolicy(msgspec.Struct, frozen=True, omit_defaults=True, tag=True):
    """Everything the server sidecars of one service enforce on inbound requests."""

    namespace: str
    service: str
    revision: int
    peer_authentication: tuple[PeerAuthn, ...] = ()
    authorization: tuple[AuthzPolicy, ...] = ()
    prev_revision: int = 0
