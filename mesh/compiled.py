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
    # True: a Host without a port also matches `port` (the Gateway API's parentRef
    # port: a client sending to `http://echo` asked for the service's port 80)
    port_implicit: bool = False
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
    # replaces the prefix a `prefix` uri match matched, the rest of the path kept
    # (Envoy's `prefix_rewrite`; the Gateway API's ReplacePrefixMatch)
    prefix_rewrite: str | None = None
    authority: str | None = None
    port: int = 0
    scheme: str | None = None
    redirect_code: int = 301


class DirectResponse(msgspec.Struct, frozen=True, omit_defaults=True):
    status: int
    body: str | None = None


# ---------------------------------------------------------------- resilience (routes)

# `retryOn` conditions a RetryPolicy may carry (Istio's validation list minus
# `http3-post-connect-failure`); numeric codes travel in `retriable_status_codes`
RETRY_ON_CONDITIONS = frozenset(
    {
        # x-envoy-retry-on
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "envoy-ratelimited",
        # x-envoy-retry-grpc-on (from the response's grpc-status)
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)
# Istio's policy for routes whose rule has no `retries` (pilot `retry.DefaultPolicy`)
DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled",
                    "retriable-status-codes")  # fmt: skip
DEFAULT_RETRIABLE_STATUS_CODES = (503,)


class RetryPolicy(msgspec.Struct, frozen=True, omit_defaults=True):
    """A rule's `retries`, resolved the way Istio builds Envoy's retry policy.

    `attempts` counts retries after the first try (at most 1 + attempts requests);
    0 disables retries. A `retries` without `retryOn` keeps Istio's default conditions;
    numeric codes in `retryOn` become `retriable_status_codes` (and
    `retriable-status-codes` is added to `retry_on`, as Istio does).
    """

    attempts: int = 2
    # 0 = no per-try limit (only the route's `timeout_ms` bounds the attempt)
    per_try_timeout_ms: int = 0
    retry_on: tuple[str, ...] = DEFAULT_RETRY_ON
    retriable_status_codes: tuple[int, ...] = DEFAULT_RETRIABLE_STATUS_CODES
    # prefer endpoints not tried yet for this request (Envoy's previous_hosts predicate)
    ignore_previous_hosts: bool = True
    # base of the jittered exponential backoff; the cap is 10x (Envoy's default)
    backoff_base_ms: int = 25


class FaultDelay(msgspec.Struct, frozen=True, omit_defaults=True):
    fixed_delay_ms: int
    # share of matching requests delayed, in [0, 100]; Istio: unset is 0
    percentage: float = 0.0


class FaultAbort(msgspec.Struct, frozen=True, omit_defaults=True):
    """The abort's local reply. A `grpcStatus` abort is `http_status` 200 with
    `grpc_status` set, as Envoy's fault filter answers it: a gRPC request gets a
    trailers-only reply with that status, any other request a plain 200."""

    http_status: int
    # the gRPC status code of a `grpcStatus` abort; None for an `httpStatus` abort
    grpc_status: int | None = None
    # share of matching requests aborted, in [0, 100]; Istio: unset is 0
    percentage: float = 0.0


class FaultInjection(msgspec.Struct, frozen=True, omit_defaults=True):
    """A rule's `fault`: the delay (flag `DI`) applies first, then the abort (`FI`)."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


class Mirror(msgspec.Struct, frozen=True, omit_defaults=True):
    """A rule's `mirror` + `mirrorPercentage` (Istio's default: 100)."""

    host: str
    subset: str = ""
    port: int = 0
    percentage: float = 100.0


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
    # None: the rule has no `retries`, so Istio's default policy applies
    # (`proxy.resilience.retry.default_policy()`); `attempts=0` disables retries
    retries: RetryPolicy | None = None
    fault: FaultInjection | None = None
    mirror: Mirror | None = None


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


# Istio's default for every circuit-breaker threshold (2^32-1: effectively unlimited)
UNLIMITED = 4_294_967_295


class ConnectionPool(msgspec.Struct, frozen=True, omit_defaults=True):
    """DestinationRule `connectionPool`, Istio defaults filled in (0 in the resource
    means the default, as in Istio). Thresholds are per destination (+ subset) and
    per sidecar; overflowing one is answered 503 at once, flag `UO`."""

    max_connections: int = UNLIMITED
    connect_timeout_ms: int = 10_000
    # requests queued while waiting for a connection
    http1_max_pending_requests: int = UNLIMITED
    # concurrent requests (the name is Istio's; it applies to HTTP/1.1 too)
    http2_max_requests: int = UNLIMITED
    # 0 = unlimited; 1 disables keep-alive
    max_requests_per_connection: int = 0
    # concurrent retries
    max_retries: int = UNLIMITED
    idle_timeout_ms: int = 3_600_000
    # streams at once on one HTTP/2 connection; 0 = what the peer's SETTINGS allow
    max_concurrent_streams: int = 0


class OutlierDetection(msgspec.Struct, frozen=True, omit_defaults=True):
    """DestinationRule `outlierDetection`, Istio/Envoy defaults filled in.

    A threshold of 0 disables that detector. Without `split_external_local_origin_errors`,
    locally originated failures (connect failure, reset, timeout) count as 503/504 for
    the 5xx and gateway counters; with it they count only towards
    `consecutive_local_origin_failures`.
    """

    consecutive_5xx_errors: int = 5
    consecutive_gateway_errors: int = 0
    consecutive_local_origin_failures: int = 5
    split_external_local_origin_errors: bool = False
    interval_ms: int = 10_000
    base_ejection_time_ms: int = 30_000
    max_ejection_percent: int = 10
    # below this share of healthy endpoints, ejection is ignored (panic); 0 = never
    min_health_percent: int = 0


UpstreamTlsMode = Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]


class ClientTls(msgspec.Struct, frozen=True, omit_defaults=True):
    """DestinationRule `tls`: how the client proxy secures its upstream connections.

    ISTIO_MUTUAL is the mesh's own mTLS (workload certificate, the endpoint's
    registered SPIFFE identity verified); DISABLE sends plaintext; SIMPLE originates
    TLS verifying the server against `ca_certificates` (a file; empty: the system
    CAs) unless `insecure_skip_verify`; MUTUAL also presents `client_certificate` /
    `private_key` (files). `sni` empty: the destination host. `subject_alt_names`
    empty: the server certificate must name the SNI host (when verified)."""

    mode: UpstreamTlsMode
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    subject_alt_names: tuple[str, ...] = ()
    sni: str = ""
    insecure_skip_verify: bool = False


class PortPolicy(msgspec.Struct, frozen=True, omit_defaults=True):
    """`portLevelSettings[]`: the policy for traffic to one port of the destination
    (the port the caller asked for), already merged over the level it belongs to."""

    port: int
    traffic_policy: TrafficPolicy


class TrafficPolicy(msgspec.Struct, frozen=True, omit_defaults=True):
    load_balancer: LoadBalancer = LoadBalancer()
    # None: not configured (Istio defaults: no limits; outlier detection off)
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    # None: not configured (mesh destinations: ISTIO_MUTUAL when the endpoint has an
    # identity; ServiceEntry hosts: plaintext)
    tls: ClientTls | None = None
    port_level: tuple[PortPolicy, ...] = ()

    def for_port(self, port: int) -> TrafficPolicy:
        """The policy for traffic to `port` (0: unknown, the policy itself)."""
        for entry in self.port_level:
            if entry.port == port:
                return entry.traffic_policy
        return self


class Subset(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    labels: dict[str, str] = {}
    # subset-level policy, already merged over the destination-level one
    traffic_policy: TrafficPolicy = TrafficPolicy()


class L4Match(msgspec.Struct, frozen=True, omit_defaults=True):
    """One `tcp[].match[]` / `tls[].match[]`: every set condition must hold (AND)."""

    # the service port the connection is addressed to; 0 = any
    port: int = 0
    # CIDRs (a bare IP as /32 or /128) the connection's destination address is in
    destination_subnets: tuple[str, ...] = ()
    # labels of the *calling* workload (the proxy applying the table)
    source_labels: dict[str, str] = {}
    source_namespace: str = ""
    # canonical "<ns>/<name>" gateways (or "mesh") this match is limited to; empty = any
    gateways: tuple[str, ...] = ()
    # `tls` rules: the ClientHello's SNI must match one (`*.suffix` allowed)
    sni_hosts: tuple[str, ...] = ()


class L4Route(msgspec.Struct, frozen=True, omit_defaults=True):
    """One VirtualService `tcp[]` or `tls[]` rule; the first whose matches hold wins
    (no match = every connection). Each connection picks one weighted destination."""

    match: tuple[L4Match, ...] = ()
    route: tuple[WeightedDestination, ...] = ()
    origin: str = ""


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
    # VirtualService `tcp` / `tls` rules for `host` (applied by the TCP relays; with
    # no rule matching, a connection goes to the service itself, as in Istio)
    tcp: tuple[L4Route, ...] = ()
    tls: tuple[L4Route, ...] = ()
    # hosts of the Kubernetes Services that select a part of this service's instances
    # (`reviews-v1` for `reviews`): data planes that build every host up front (Envoy)
    # follow them, as they follow the services the registry lists
    aliases: tuple[str, ...] = ()


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
    # VirtualService `tcp` rules bound to these Gateways, for the TCP servers, and
    # `tls` rules (SNI) for the TLS PASSTHROUGH servers; matched with the server's port
    tcp: tuple[L4Route, ...] = ()
    tls: tuple[L4Route, ...] = ()


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
    # `<iss>/<sub>` of the request's validated JWT (RequestAuthentication)
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    # `<namespace>/<service account>` of the peer certificate, any trust domain
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    # the original client (X-Forwarded-For past `InboundPolicy.num_trusted_proxies`)
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


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
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] = "ALLOW"
    selector: dict[str, str] = {}
    # True for a policy in the root namespace (applies mesh-wide)
    mesh_wide: bool = False
    rules: tuple[AuthzRule, ...] = ()
    # CUSTOM: the extension provider (`InboundPolicy.extension_providers`) to ask
    provider: str = ""
    # `istio.io/dry-run: "true"`: evaluated in shadow only, never changes a decision
    # (absent on the wire when False, so older sidecars decode it unchanged)
    dry_run: bool = False


class RateLimitOverride(msgspec.Struct, frozen=True, omit_defaults=True):
    """Each listed principal (Istio form) gets its own bucket at `rps`, instead of the
    policy's `identity_rps`."""

    principals: tuple[str, ...]
    rps: int


class RateLimit(msgspec.Struct, frozen=True, omit_defaults=True):
    """One RateLimitPolicy (`meshwork.io/v1`); see `mesh.resources.meshwork` for the
    semantics. A rate of 0 means that limit is not set."""

    name: str
    namespace: str
    selector: dict[str, str] = {}
    total_rps: int = 0
    identity_rps: int = 0
    overrides: tuple[RateLimitOverride, ...] = ()


class InboundPolicy(msgspec.Struct, frozen=True, omit_defaults=True, tag=True):
    """Everything the server sidecars of one service enforce on inbound requests."""

    namespace: str
    service: str
    revision: int
    peer_authentication: tuple[PeerAuthn, ...] = ()
    authorization: tuple[AuthzPolicy, ...] = ()
    prev_revision: int = 0
    # RateLimitPolicies of the service's namespace; each sidecar keeps those whose
    # selector matches its labels
    rate_limits: tuple[RateLimit, ...] = ()
    # RequestAuthentications of the service's namespace and the root namespace;
    # each sidecar keeps those whose selector matches its labels
    request_authentication: tuple[RequestAuthn, ...] = ()
    # the MeshConfig extension providers CUSTOM policies of this service name
    extension_providers: tuple[ExtAuthzProvider, ...] = ()
    # MeshConfig `numTrustedProxies`: which X-Forwarded-For entry is the client
    num_trusted_proxies: int = 0


class ExtAuthzProvider(msgspec.Struct, frozen=True, omit_defaults=True):
    """One `extensionProviders[]` entry: `envoyExtAuthzHttp` (Envoy's HTTP ext_authz
    service semantics; header names lower-case) or, with `protocol` "grpc",
    `envoyExtAuthzGrpc` (Envoy's `envoy.service.auth.v3.Authorization/Check`, which
    sends every request header and takes the header changes from the answer: the
    header lists and `path_prefix` stay empty)."""

    name: str
    service: str  # a mesh host
    port: int
    timeout_ms: int = 600_000  # Istio's default
    # absent on the wire for HTTP, so older sidecars decode HTTP providers unchanged
    protocol: Literal["http", "grpc"] = "http"
    # `includeRequestBodyInCheck`: 0 sends no body; else the request body is
    # buffered up to this many bytes and sent in the check (`pack_as_bytes`: gRPC only)
    max_request_bytes: int = 0
    allow_partial_message: bool = False
    pack_as_bytes: bool = False
    path_prefix: str = ""
    fail_open: bool = False
    status_on_error: int = 403
    include_request_headers: tuple[str, ...] = ()
    headers_to_upstream_on_allow: tuple[str, ...] = ()
    headers_to_downstream_on_deny: tuple[str, ...] = ()
    # sent to the client with the upstream's answer when the check allowed
    headers_to_downstream_on_allow: tuple[str, ...] = ()


class JwtFromHeader(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    prefix: str = ""


class ClaimHeader(msgspec.Struct, frozen=True, omit_defaults=True):
    header: str
    claim: str  # nested claims joined with "."


OIDC_DISCOVERY_PATH = "/.well-known/openid-configuration"


def oidc_discovery_uri(issuer: str) -> str:
    """Where an issuer's OpenID configuration lives (OpenID Connect Discovery 1.0 §4)."""
    return issuer.rstrip("/") + OIDC_DISCOVERY_PATH


class JwtRule(msgspec.Struct, frozen=True, omit_defaults=True):
    """One `jwtRules[]` entry. Empty `from_headers`/`from_params`/`from_cookies`
    together mean Istio's default locations (`Authorization: Bearer`, `access_token`).
    Neither `jwks` nor `jwks_uri`: the keys are found by OIDC discovery (`key_uri`)."""

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: str = ""  # inline JSON Web Key Set
    jwks_uri: str = ""
    from_headers: tuple[JwtFromHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str = ""
    output_claim_to_headers: tuple[ClaimHeader, ...] = ()
    forward_original_token: bool = False
    timeout_ms: int = 5000

    @property
    def key_uri(self) -> str:
        """Where the proxy fetches this rule's keys: `jwks_uri`, or, without keys of
        its own, the issuer's OpenID configuration (whose `jwks_uri` it follows, as
        Istio does); "" with inline `jwks`."""
        if self.jwks:
            return ""
        return self.jwks_uri or oidc_discovery_uri(self.issuer)


class RequestAuthn(msgspec.Struct, frozen=True, omit_defaults=True):
    """One RequestAuthentication."""

    name: str
    namespace: str
    selector: dict[str, str] = {}
    rules: tuple[JwtRule, ...] = ()
