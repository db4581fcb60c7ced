"""The sidecar's settings, from `meshctl sidecar` flags."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

from proxy.intercept.rules import InterceptSettings

# the data planes a sidecar can drive (proxy.dataplane)
DATAPLANES = ("python", "envoy")
APP_PROTOCOLS = ("http", "http2", "grpc")
# how an Envoy data plane counts requests (docs/architecture.md §7)
ENVOY_TELEMETRY_MODES = ("access-log", "stats")


@dataclass
class SidecarSettings:
    service: str
    namespace: str = "default"
    version: str = ""
    app_port: int = 0
    # what the app speaks: "http" (HTTP/1.1), "http2" or "grpc" (h2c to the app)
    app_protocol: str = "http"
    labels: dict[str, str] = field(default_factory=dict)
    tcp_ports: list[int] = field(default_factory=list)
    # `--tcp-upstream SERVICE[.NS]:PORT=LOCALPORT` specs, parsed by proxy.tcp
    tcp_upstreams: list[str] = field(default_factory=list)
    nats: list[str] = field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    prefix: str = "mesh"
    bind_host: str = "127.0.0.1"
    inbound_port: int = 0
    outbound_port: int = 0
    admin_port: int = 0
    instance: str = ""
    service_account: str = ""
    trust_domain: str = "cluster.local"
    # Istio's CLUSTER_ID: the source_cluster / destination_cluster metric labels
    cluster_id: str = "Kubernetes"
    register_ttl: int = 10
    drain_timeout: float = 10.0
    gateway: bool = False
    gateway_port: int = 0
    nats_user: str | None = None
    # mTLS between sidecars (docs/architecture.md §5); off only with `--no-mtls` (development)
    mtls: bool = True
    # bootstrap token for the first certificate (from --token/--token-file/MESH_TOKEN)
    token: str = ""
    # telemetry (docs/architecture.md §7): off only with `--no-telemetry` (to measure
    # what it costs);
    # percentage of new traces sampled (an incoming sampling decision wins)
    telemetry: bool = True
    # Envoy data plane (docs/architecture.md §7): `stats`, the default (Envoy counts,
    # the agent reads its counters; access records for errors, flagged and 1 % of the
    # other requests, as Istio's metrics come from Envoy's stats) or `access-log`
    # (every request through the gRPC access log to the agent: an access record for
    # each, at some 20-25 % of Envoy's CPU in the agent); `--envoy-telemetry`,
    # MESH_ENVOY_TELEMETRY
    envoy_telemetry: str = field(
        default_factory=lambda: os.environ.get("MESH_ENVOY_TELEMETRY", "stats")
    )
    trace_sampling: float = 1.0
    nats_password: str | None = None
    # verify the control plane's signature on config, endpoints and the trust bundle
    # (mesh.signing); off only with `--no-config-signatures`, for a mesh without a CA
    config_signatures: bool = True
    # which data plane carries the traffic (proxy.dataplane): our Python listeners or
    # an Envoy process configured over xDS
    dataplane: str = "python"
    # Envoy data plane only: learn destinations on demand (VHDS, the first request
    # naming a host) instead of following every service (architecture §5.2); the
    # default for sidecars (`--no-envoy-on-demand` turns it off); a gateway and an
    # intercepting sidecar follow what they need from the start either way
    envoy_on_demand: bool = True
    # CA bundle (PEM) that RequestAuthentication `jwksUri` servers are verified
    # against; empty: the system's CAs
    jwks_ca_file: str = field(default_factory=lambda: os.environ.get("MESH_JWKS_CA_FILE", ""))
    # the state dir of the local cluster this proxy runs against (`meshctl up`), where
    # it records itself for `meshctl down` (mesh.proxy_records); empty: none
    cluster_state_dir: str = ""
    # transparent interception (`--intercept`, docs/architecture.md §5.4): the app runs
    # in its own network namespace and its outbound TCP and DNS are captured
    intercept: bool = False
    capture: InterceptSettings = field(default_factory=InterceptSettings)
    # the pod form (`--capture-port`, `--dns-port`): `meshctl intercept-init` installed
    # the rules in the namespace this sidecar shares with its app; 0: not used
    capture_port: int = 0
    dns_port: int = 0
    # where the app listens as the sidecar reaches it: 127.0.0.1, or the app's
    # namespace address when intercepting (set by the sidecar once it exists)
    app_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.dataplane not in DATAPLANES:
            raise ValueError(
                f"dataplane must be one of {', '.join(DATAPLANES)}, got {self.dataplane!r}"
            )
        if self.envoy_telemetry not in ENVOY_TELEMETRY_MODES:
            raise ValueError(
                f"envoy_telemetry must be one of {', '.join(ENVOY_TELEMETRY_MODES)}, "
                f"got {self.envoy_telemetry!r}"
            )
        if self.app_protocol not in APP_PROTOCOLS:
            raise ValueError(
                f"app_protocol must be one of {', '.join(APP_PROTOCOLS)}, got {self.app_protocol!r}"
            )
        self.labels = {
            "app": self.service,
            **({"version": self.version} if self.version else {}),
            **self.labels,
        }
        if not self.service_account:
            self.service_account = self.service
        if not self.instance:
            host = socket.gethostname().split(".")[0].lower()
            self.instance = (
                f"{self.service}-{self.version or 'x'}-{host}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
            )

    @property
    def egress_gateway(self) -> bool:
        """A gateway in the egress role (Istio's `istio: egressgateway` label, which
        `meshctl gateway --egress` sets): mesh sidecars reach it over mTLS, so its
        listener takes mTLS as well as plaintext (docs/architecture.md §5.5)."""
        return self.gateway and self.labels.get("istio") == "egressgateway"

    @property
    def app_speaks_h2(self) -> bool:
        return self.app_protocol in ("http2", "grpc")

    @property
    def identity(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
