"""Typed models of the `networking.istio.io` kinds we support, field for field.

Only the fields Meshwork implements exist here. Every model forbids unknown fields,
so a field Istio has and we do not (`corsPolicy`, `retryRemoteLocalities`,
`mirrors`, ...) is rejected with its path instead of being dropped: an ignored policy
field would silently weaken what the user asked for.

Attribute names are snake_case; the YAML names are Istio's camelCase (`rename`).
Optional scalars whose zero value is not valid (ports, codes) default to None so
validation can tell "absent" from an explicit 0. The same holds for the resilience
settings whose Istio meaning differs between unset and 0 (`consecutive5xxErrors`: unset
is 5, 0 disables). Durations stay strings as written; validation checks them.
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


class Percent(Model, frozen=True):
    """Istio `Percent`: a double in [0, 100] (checked in validation)."""

    value: float = 0.0


class HTTPRetry(Model, frozen=True):
    """Istio `HTTPRetry`. `attempts` counts *retries* (at most 1 + attempts requests);
    absent or 0 disables retries, Istio's default policy applying only when the whole
    `retries` field is absent. `retryRemoteLocalities` is refused (no localities here)."""

    attempts: int | None = None
    per_try_timeout: str | None = None
    # comma-separated Envoy conditions and HTTP status codes, as in Istio
    retry_on: str | None = None
    # Istio 1.26+: None = true (a retry prefers hosts not tried yet)
    retry_ignore_previous_hosts: bool | None = None
    # Istio 1.26+: base interval of the exponential backoff; None = 25ms
    backoff: str | None = None


class FaultDelay(Model, frozen=True):
    """`fault.delay`: `exponentialDelay` is refused, as Istio does."""

    fixed_delay: str | None = None
    percentage: Percent | None = None
    # deprecated integer form, used only when `percentage` is absent
    percent: int | None = None


class FaultAbort(Model, frozen=True):
    """`fault.abort`: `httpStatus` or `grpcStatus` (a status name such as `UNAVAILABLE`),
    exactly one; `http2Error` is refused."""

    http_status: int | None = None
    grpc_status: str | None = None
    percentage: Percent | None = None


class HTTPFaultInjection(Model, frozen=True):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


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
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    # None = 100% when `mirror` is set (Istio's default)
    mirror_percentage: Percent | None = None


class RouteDestination(Model, frozen=True):
    """A `tcp[]` / `tls[]` route destination: no header operations at L4."""

    destination: Destination
    # Istio: an omitted weight is 0; with a single destination it is ignored
    weight: int = 0


class L4MatchAttributes(Model, frozen=True):
    """`tcp[].match[]`: every set condition must hold; a rule's matches are ORed.
    `sourceSubnet` (deprecated in Istio) is refused as unknown."""

    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: dict[str, str] = {}
    gateways: tuple[str, ...] = ()
    source_namespace: str = ""


class TLSMatchAttributes(Model, frozen=True):
    """`tls[].match[]`: as `L4MatchAttributes`, plus the SNI hosts (required)."""

    sni_hosts: tuple[str, ...] = ()
    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: dict[str, str] = {}
    gateways: tuple[str, ...] = ()
    source_namespace: str = ""


class TCPRoute(Model, frozen=True):
    match: tuple[L4MatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


class TLSRoute(Model, frozen=True):
    """TLS passthrough: routed by SNI, the bytes relayed unchanged (no termination)."""

    match: tuple[TLSMatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


class VirtualServiceSpec(Model, frozen=True):
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[TLSRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()

    def l4_destination_hosts(self) -> list[str]:
        """Destination hosts of the `tcp` and `tls` rules, as written."""
        tcp = [d.destination.host for rule in self.tcp for d in rule.route]
        return tcp + [d.destination.host for rule in self.tls for d in rule.route]


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


class TCPSettings(Model, frozen=True):
    """`connectionPool.tcp`; 0 or absent means Istio's default (unlimited, 10s)."""

    max_connections: int | None = None
    connect_timeout: str | None = None


class HTTPSettings(Model, frozen=True):
    """`connectionPool.http`; 0 or absent means Istio's default (unlimited, 1h idle)."""

    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: str | None = None
    # streams at once on one HTTP/2 upstream connection
    max_concurrent_streams: int | None = None


class ConnectionPoolSettings(Model, frozen=True):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


class OutlierDetection(Model, frozen=True):
    """Istio `OutlierDetection` (consecutive-error ejection; the deprecated
    `consecutiveErrors` is refused). None = Istio's default for that field."""

    # msgspec's camel case would spell it `consecutive5XxErrors`
    consecutive_5xx_errors: int | None = msgspec.field(default=None, name="consecutive5xxErrors")
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = None
    split_external_local_origin_errors: bool = False
    interval: str | None = None
    base_ejection_time: str | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


class ClientTLSSettings(Model, frozen=True):
    """Istio `ClientTLSSettings` (`trafficPolicy.tls`): how this proxy's upstream
    connections are secured. Certificates come from files on the proxy's host;
    `credentialName` (a Kubernetes secret) is refused in validation."""

    # DISABLE | SIMPLE | MUTUAL | ISTIO_MUTUAL; None is refused in validation
    mode: str | None = None
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    subject_alt_names: tuple[str, ...] = ()
    sni: str = ""
    # None = false (verify the server); Istio's BoolValue
    insecure_skip_verify: bool | None = None


class PortTrafficPolicy(Model, frozen=True):
    """`trafficPolicy.portLevelSettings[]`: the fields set here replace the
    destination-level ones for traffic to `port.number`."""

    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


class TrafficPolicy(Model, frozen=True):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()


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


class ServerTLSSettings(Model, frozen=True):
    """`servers[].tls`: only `mode` (PASSTHROUGH: route by SNI, relay the TLS bytes
    unchanged); certificates for terminating TLS are not supported."""

    mode: str = ""


class Server(Model, frozen=True):
    port: Port
    hosts: tuple[str, ...] = ()
    name: str = ""
    tls: ServerTLSSettings | None = None


class GatewaySpec(Model, frozen=True):
    selector: dict[str, str] = {}
    servers: tuple[Server, ...] = ()
