"""The translator's inputs: the proxy being configured (`ProxyNode`) and what the
mesh tells it (`MeshView`), plus the error every module raises for input it cannot
express in Envoy's terms."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from mesh.compiled import GatewayConfig, InboundPolicy, RouteTable
from mesh.compiled_mesh import MeshWideConfig
from mesh.messages import EndpointSet
from proxy.tcp import TcpUpstream

from .access_log import TelemetryMode


class TranslationError(Exception):
    """Compiled configuration the translator cannot express in Envoy: never dropped
    silently (an ignored policy is a security hole). The message names the resource,
    the field path and the value."""

    def __init__(self, resource: str, field: str, value: object, reason: str) -> None:
        super().__init__(f"{resource}: {field}={value!r}: {reason}")
        self.resource = resource
        self.field = field
        self.value = value
        self.reason = reason


@dataclass(frozen=True)
class ProxyNode:
    """The proxy being configured: everything about it the translation depends on."""

    namespace: str
    service: str
    version: str
    labels: Mapping[str, str]
    identity: str  # our SPIFFE ID, spiffe://<td>/ns/<ns>/sa/<sa>
    trust_domain: str
    role: Literal["sidecar", "gateway"]
    # bind address of the inbound (mTLS) listener; None for a gateway
    inbound: tuple[str, int] | None
    # 127.0.0.1:<port>, the plaintext HTTP proxy listener the app uses
    outbound: tuple[str, int] | None
    app_port: int  # 0 = no app
    # outbound TCP listeners: 127.0.0.1:local_port -> mesh service's TCP port
    tcp_upstreams: tuple[TcpUpstream, ...] = ()
    # app tcp port -> bind address of the inbound tcp relay listener
    tcp_inbound: tuple[tuple[int, tuple[str, int]], ...] = ()
    # gateway mode: plaintext listeners
    gateway_listeners: tuple[tuple[str, int], ...] = ()
    # when set, HTTP and TCP access logs go to this gRPC cluster (defined by the bootstrap)
    access_log_cluster: str = ""
    # `--envoy-telemetry` (docs/architecture.md §7): `stats` adds Envoy's stats access
    # logger to every HCM and keeps only sampled or failed requests in the gRPC log.
    # The sidecar passes its setting (`stats` unless `access-log` is chosen); this
    # pure model's own default is the plain gRPC log, the golden cases' base
    telemetry_mode: TelemetryMode = "access-log"
    # when set, every HCM traces with Envoy's OpenTelemetry tracer, exporting to this
    # gRPC cluster (defined by the bootstrap), and starts a trace for this percentage
    # of the requests that arrive without a sampling decision
    tracing_cluster: str = ""
    trace_sampling: float = 1.0
    # the app speaks HTTP/2 cleartext (`--app-protocol grpc|http2`), else HTTP/1.1
    app_h2c: bool = False
    # outbound virtual hosts on demand (VHDS): the route configuration lists none, each
    # comes in `XdsResources.virtual_hosts` and is served when Envoy asks for its host
    on_demand: bool = False
    # CA bundle for RequestAuthentication `jwksUri` servers (https); "" = the system's
    jwks_ca_file: str = ""
    # where the app listens (its namespace's address when intercepted)
    app_host: str = "127.0.0.1"
    # an intercepted app (docs/architecture.md §5.4): the capture listener's address
    capture: tuple[str, int] | None = None
    # `--opaque-ports`: destination ports the capture listener relays as TCP without
    # waiting for protocol detection (server-first protocols)
    opaque_ports: tuple[int, ...] = ()
    # a gateway in the egress role: its listeners take mTLS (from mesh sidecars) as
    # well as plaintext (docs/architecture.md §5.5)
    egress_gateway: bool = False


@dataclass(frozen=True)
class MeshView:
    """What the mesh says, as this proxy follows it."""

    # fqdn -> compiled routes and endpoints
    destinations: Mapping[str, tuple[RouteTable | None, EndpointSet | None]]
    inbound: InboundPolicy | None = None
    gateway: GatewayConfig | None = None
    # fqdn -> the service's virtual IP (an intercepted app's capture listener relays
    # TCP to a virtual IP by it; docs/architecture.md §5.4)
    vips: Mapping[str, str] = field(default_factory=dict)
    # OIDC discovery done by the agent: an issuer's OpenID configuration URL
    # (`JwtRule.key_uri`) -> the `jwks_uri` it named
    discovered_jwks: Mapping[str, str] = field(default_factory=dict)
    # ServiceEntry hosts and the outbound traffic policy (`translate.egress`)
    mesh_wide: MeshWideConfig | None = None
