"""The Envoy data plane's pure parts: the translator's inputs built from the agent's
state (`proxy_node`, `mesh_view`) and what the proxy-status report says once Envoy
has answered a push (`ApplyTracker`). No I/O: tested with tables of inputs."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from envoy.config.route.v3 import route_components_pb2
from google.protobuf.message import Message

from mesh.compiled import GatewayConfig, InboundPolicy
from mesh.compiled_mesh import ExternalService, MeshWideConfig
from mesh.hosts import ServiceRef, canonical_host, service_of_host, strip_port
from mesh.messages import EndpointSet, SubscriptionStatus
from proxy.destinations import Destination
from proxy.egress import selected_instances
from proxy.envoy.access_log_convert import cluster_service
from proxy.envoy.delta_protocol import DeltaResource, delta_resource
from proxy.envoy.translate import MeshView, ProxyNode
from proxy.settings import SidecarSettings
from proxy.tcp import parse_tcp_upstream


@dataclass(frozen=True)
class EnvoyPorts:
    """The ports the agent chose for Envoy's listeners (Envoy binds them itself)."""

    admin: int
    inbound: int = 0
    outbound: int = 0
    gateway: int = 0
    # app TCP port -> the mesh-facing relay listener's port
    tcp_inbound: Mapping[int, int] = field(default_factory=dict)
    # an intercepted app: the capture listener (docs/architecture.md §5.4)
    capture_host: str = ""
    capture: int = 0


# Envoy's NACK of a listener it could not bind: "cannot bind '127.0.0.1:8080': Address
# already in use" (listeners bind without SO_REUSEPORT, architecture §5.2)
_BIND_IN_USE = re.compile(r"cannot bind '\[?([^']*?)\]?:(\d+)': Address already in use")


def ports_in_use(rejection: str) -> list[tuple[str, int]]:
    """(host, port) of each listener Envoy's `rejection` says it could not bind because
    another socket holds the port, in order, without repeats."""
    found = [(host, int(port)) for host, port in _BIND_IN_USE.findall(rejection)]
    return list(dict.fromkeys(found))


def port_flag(ports: EnvoyPorts, port: int) -> str:
    """The `meshctl` flag that chose `port` for Envoy ("port" for a port the config
    chose: a Gateway server's, a TCP relay's)."""
    named = {ports.gateway: "--port", ports.inbound: "--inbound-port"}
    named[ports.outbound] = "--outbound-port"
    named.pop(0, None)
    return named.get(port, "port")


def proxy_node(
    settings: SidecarSettings,
    ports: EnvoyPorts,
    access_log_cluster: str = "",
    tracing_cluster: str = "",
) -> ProxyNode:
    s = settings
    gateway = s.gateway
    return ProxyNode(
        namespace=s.namespace,
        service=s.service,
        version=s.version,
        labels=dict(s.labels),
        identity=s.identity,
        trust_domain=s.trust_domain,
        role="gateway" if gateway else "sidecar",
        inbound=None if gateway else (s.bind_host, ports.inbound),
        outbound=None if gateway else ("127.0.0.1", ports.outbound),
        app_port=0 if gateway else s.app_port,
        app_h2c=s.app_speaks_h2,
        tcp_upstreams=tuple(parse_tcp_upstream(spec, s.namespace) for spec in s.tcp_upstreams),
        tcp_inbound=tuple(
            (app_port, (s.bind_host, port)) for app_port, port in sorted(ports.tcp_inbound.items())
        ),
        gateway_listeners=((s.bind_host, ports.gateway),) if gateway else (),
        # `--jwks-ca-file`: Envoy verifies jwksUri servers against it, as the Python
        # data plane's fetcher does (it was not passed before: Envoy used the system CAs)
        jwks_ca_file=s.jwks_ca_file,
        access_log_cluster=access_log_cluster,
        telemetry_mode="stats" if s.envoy_telemetry == "stats" else "access-log",
        tracing_cluster=tracing_cluster,
        trace_sampling=s.trace_sampling,
        app_host=s.app_host,
        capture=(ports.capture_host, ports.capture) if ports.capture else None,
        opaque_ports=tuple(sorted(s.capture.opaque_ports)) if ports.capture else (),
        egress_gateway=s.egress_gateway,
        # a gateway's routes name its destinations; an intercepting sidecar's capture
        # listener relays TCP by virtual IP or instance address (no Host to ask by),
        # so it needs every service's from the start (§5.2, §5.4)
        on_demand=s.envoy_on_demand and not gateway and not ports.capture,
    )


def mesh_view(
    destinations: Mapping[ServiceRef, Destination],
    inbound: InboundPolicy | None,
    gateway: GatewayConfig | None,
    vips: Mapping[str, str] | None = None,
    discovered_jwks: Mapping[str, str] | None = None,
    mesh_wide: MeshWideConfig | None = None,
) -> MeshView:
    return MeshView(
        vips=dict(vips or {}),
        discovered_jwks=dict(discovered_jwks or {}),
        mesh_wide=mesh_wide,
        destinations={
            ref.fqdn: (dest.table, dest.endpoints)
            for ref, dest in sorted(destinations.items())
            if dest.table is not None or dest.endpoints is not None
        },
        inbound=inbound,
        gateway=gateway,
    )


def vhds_host(requested: str) -> str:
    """The Host of a VHDS name, `<route configuration>/<host>` (matched from the
    right: a host has no slash, a route configuration name may)."""
    return requested.rpartition("/")[2]


def vhds_answer(
    virtual_hosts: Mapping[str, Message],
    requested: Mapping[str, str],
    unknown_host: route_components_pb2.VirtualHost | None,
) -> tuple[list[DeltaResource], set[str]]:
    """The virtual hosts to serve over VHDS and the requested names that get none.
    `requested`: every VHDS name asked for -> the FQDN its Host resolves to
    (`mesh.hosts.canonical_host`; "" for a Host no virtual host may match: empty or
    with a `*`). Virtual hosts are named `<route configuration>/<fqdn>` (a mesh
    service's, or a ServiceEntry host's) and carry the names that asked for them as
    aliases. A Host whose FQDN has no virtual host gets a copy of `unknown_host` (the
    translation's `XdsResources.unknown_host`: 502 `unknown host`, or the ALLOW_ANY
    passthrough, as the catch-all answers when not on demand and as the Python proxy
    does), named like the service's, so it is replaced if the service or a
    ServiceEntry for the host appears; with no model such a Host is answered absent."""
    served: dict[str, Message] = dict(virtual_hosts)
    aliases: dict[str, set[str]] = {name: set() for name in virtual_hosts}
    unknown: dict[str, set[str]] = {}  # vhost name -> the Hosts (no port) it answers
    absent: set[str] = set()
    for name, fqdn in requested.items():
        vhost_name = f"{name.rpartition('/')[0]}/{fqdn}"
        if not fqdn or (vhost_name not in virtual_hosts and unknown_host is None):
            absent.add(name)
            continue
        if vhost_name not in virtual_hosts:
            unknown.setdefault(vhost_name, set()).add(strip_port(vhds_host(name)).lower())
        aliases.setdefault(vhost_name, set()).add(name)
    for vhost_name, hosts in unknown.items():
        assert unknown_host is not None
        served[vhost_name] = named_like(unknown_host, vhost_name, sorted(hosts))
    resources = [delta_resource(served[n], aliases[n]) for n in sorted(served)]
    return resources, absent


def named_like(
    model: route_components_pb2.VirtualHost, name: str, domains: list[str]
) -> route_components_pb2.VirtualHost:
    """A copy of virtual host `model` under `name`, answering exactly `domains`."""
    vhost = route_components_pb2.VirtualHost()
    vhost.CopyFrom(model)
    vhost.name = name
    del vhost.domains[:]
    vhost.domains.extend(domains)
    return vhost


def vhds_fqdn(requested: str, namespace: str) -> str:
    """The FQDN a VHDS name's Host stands for, as the Python proxy resolves it; "" for
    a Host that no virtual host may be made for (empty, or a `*` that would match
    every other host)."""
    host = strip_port(vhds_host(requested)).strip().lower()
    if not host or "*" in host:
        return ""
    return canonical_host(host, namespace)


def selecting_entries(
    namespace: str, mesh_wide: MeshWideConfig | None
) -> tuple[ExternalService, ...]:
    """The ServiceEntries visible in `namespace` whose `workloadSelector` makes
    registered instances their endpoints (MESH_INTERNAL, §5.5): on demand, the services
    of those instances are followed, as the Python sidecar follows the registry."""
    if mesh_wide is None:
        return ()
    return tuple(
        s
        for s in mesh_wide.services
        if s.workload_selector and ("*" in s.export_to or namespace in s.export_to)
    )


def selected_by(entries: tuple[ExternalService, ...], endpoint_set: EndpointSet) -> bool:
    """Does one of `entries` select an instance of this service?"""
    return any(selected_instances(entry, [endpoint_set]) for entry in entries)


def view_endpoints(view: MeshView | None, fqdn: str) -> EndpointSet | None:
    """The endpoints of `fqdn` in `view` (the one Envoy was last configured from: the
    upstream address Envoy logs for a request is one of them); None when not followed."""
    if view is None:
        return None
    found = view.destinations.get(fqdn)
    return found[1] if found is not None else None


@dataclass(frozen=True)
class ApplyTracker:
    """Which config revisions Envoy runs. `pushed`: the subject revisions the last
    translation was made from; `applied`: those of the last push Envoy ACKed in every
    type; `rejection`: why the last push was refused (Envoy's NACK message or the
    translator's error), empty once a later push is applied."""

    pushed: Mapping[str, int] = field(default_factory=dict)
    applied: Mapping[str, int] = field(default_factory=dict)
    rejection: str = ""

    def translated(self, revisions: Mapping[str, int]) -> ApplyTracker:
        """A translation of these revisions was pushed (ACK pending: its subjects show
        the revision applied before until Envoy answers)."""
        return dataclasses.replace(self, pushed=dict(revisions), rejection="")

    def acked(self) -> ApplyTracker:
        """Envoy ACKed every type of the last push."""
        return ApplyTracker(pushed=self.pushed, applied=self.pushed, rejection="")

    def rejected(self, revisions: Mapping[str, int], reason: str) -> ApplyTracker:
        """The push made from `revisions` was refused; the last good one keeps serving."""
        return ApplyTracker(pushed=dict(revisions), applied=self.applied, rejection=reason)

    def statuses(self, followed: list[SubscriptionStatus]) -> list[SubscriptionStatus]:
        """The followers' entries as Envoy runs them: a revision counts as applied once
        Envoy ACKed it; a refused push shows NACK with the reason on the subjects whose
        revision it changed. An entry the agent itself rejected stays as it is."""
        out: list[SubscriptionStatus] = []
        for sub in followed:
            if sub.state == "NACK":
                out.append(sub)
                continue
            applied = self.applied.get(sub.subject, 0)
            pushed = self.pushed.get(sub.subject, 0)
            if self.rejection and pushed != applied:
                out.append(
                    SubscriptionStatus(
                        subject=sub.subject,
                        revision=applied,
                        state="NACK",
                        reason=self.rejection,
                        rejected_revision=pushed,
                    )
                )
            else:
                out.append(SubscriptionStatus(subject=sub.subject, revision=applied))
        return out


CAPTURE_DETECTION_TIMEOUTS = "meshwork_proxy_capture_detection_timeouts_total"
# Envoy's Prometheus series for `listener.virtual_outbound.downstream_pre_cx_timeout`
# (the capture listener's stat prefix is its name, extracted as the address tag)
ENVOY_CAPTURE_PRE_CX_TIMEOUT = (
    'envoy_listener_downstream_pre_cx_timeout{envoy_listener_address="virtual_outbound"}'
)


def capture_detection_timeouts(envoy_prometheus: str) -> str:
    """The Python capture listener's detection-timeout counter, from Envoy's own stats
    (docs/architecture.md §5.4): the capture listener's listener filters (the HTTP
    inspector) timing out. "" when Envoy has no capture listener."""
    for line in envoy_prometheus.splitlines():
        series, _, value = line.rpartition(" ")
        if series == ENVOY_CAPTURE_PRE_CX_TIMEOUT:
            count = int(float(value))
            return (
                f"# HELP {CAPTURE_DETECTION_TIMEOUTS} Captured connections whose protocol "
                "detection timed out (then relayed as TCP)\n"
                f"# TYPE {CAPTURE_DETECTION_TIMEOUTS} counter\n"
                f"{CAPTURE_DETECTION_TIMEOUTS} {count}\n"
            )
    return ""


def destinations_of_clusters(names: Iterable[str]) -> set[ServiceRef]:
    """The mesh services behind Istio-named clusters (`outbound|<port>|<subset>|<fqdn>`);
    other clusters (inbound, private, egress hosts) name none."""
    return {ref for name in names if (ref := service_of_host(cluster_service(name)))}
