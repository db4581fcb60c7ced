"""ServiceEntry hosts, DestinationRule upstream TLS and the outbound traffic policy on
Envoy (docs/architecture.md §5.5), as the Python sidecar does them (`proxy.egress`,
`proxy.upstream_tls`).

- each ServiceEntry host exported to the proxy's namespace gets a virtual host on the
  outbound route configuration, its routes from its compiled table;
- its clusters (`outbound|0|<subset>|<host>`, one per subset the routes name) go to
  the ServiceEntry's HTTP port: STATIC endpoints as EDS with their weights, DNS /
  DNS_ROUND_ROBIN as STRICT_DNS / LOGICAL_DNS (the endpoints' names, else the host),
  NONE as STRICT_DNS of the host itself; the port's `portLevelSettings` apply;
- a DestinationRule `tls` other than ISTIO_MUTUAL becomes the cluster's transport
  socket: plaintext (DISABLE) or an UpstreamTlsContext with the SNI, the CA file
  (the system's when none), the client certificate files (MUTUAL) and the SANs to
  match (`subjectAltNames`, else the SNI host);
- ALLOW_ANY: hosts nobody knows go to `PassthroughCluster`, Envoy's dynamic forward
  proxy (the host and port of the request's authority); REGISTRY_ONLY keeps the
  502 direct response (`unknown_host_vhost`: the catch-all, or on demand the model
  of each unknown Host's virtual host).

Wildcard ServiceEntry hosts are not translated (the Python sidecar serves them; the
route configuration ignores ports, so one HTTP port per host is served: the first
HTTP-family port the entry declares, 80 when it declares none).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Iterator

import msgspec
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from mesh.compiled import ClientTls, RouteTable, TrafficPolicy
from mesh.compiled_mesh import EntryEndpoint, ExternalService
from proxy.egress import HTTP_PROTOCOLS, selected_instances
from proxy.envoy.resources import PASSTHROUGH_CLUSTER, XdsResources

from . import clusters, routes
from . import tls as tls_sockets
from .model import MeshView, ProxyNode
from .names import outbound_cluster, service_domains
from .protos import (
    DFP_CLUSTER,
    DFP_FILTER,
    UPSTREAM_TLS,
    Json,
    duration,
    parse,
    to_dict,
    typed,
)

TUNNEL_SUBSET = "~connect"
# the virtual host of Hosts nobody knows (`unknown_host_vhost`)
UNKNOWN_HOST = "unknown_host"
_HTTP_PROTOCOLS = HTTP_PROTOCOLS
_DNS_CACHE: Json = {"name": "passthrough_dns", "dnsLookupFamily": "V4_PREFERRED"}
# what SIMPLE verifies against when the DestinationRule names no CA file
_PATHS = ssl.get_default_verify_paths()
SYSTEM_CA_FILE = _PATHS.cafile or _PATHS.openssl_cafile

__all__ = [
    "PASSTHROUGH_CLUSTER",
    "add_external_clusters",
    "allows_any",
    "external_tables",
    "external_vhosts",
    "passthrough_filters",
    "unknown_host_vhost",
]


def visible(node: ProxyNode, view: MeshView) -> Iterator[ExternalService]:
    """The ServiceEntry hosts this proxy routes (exported to its namespace, not
    wildcards, with a table)."""
    if view.mesh_wide is None:
        return
    for service in view.mesh_wide.services:
        if service.host.startswith("*") or service.table is None:
            continue
        if "*" in service.export_to or node.namespace in service.export_to:
            yield service


def external_tables(node: ProxyNode, view: MeshView) -> dict[str, RouteTable | None]:
    return {s.host: s.table for s in visible(node, view)}


def external_vhosts(
    node: ProxyNode, view: MeshView, ctx: routes.RouteContext, resources: XdsResources
) -> list[Json]:
    """`resources` receives the TCP clusters of mesh services a CONNECT route sends to
    (a `tls` / `tcp` rule of the host, e.g. to the egress gateway)."""
    # a Host without a port asks for 80 (the same `referenced` set is filled)
    ctx = dataclasses.replace(ctx, default_port=80)
    out = []
    for service in visible(node, view):
        connect = [
            _connect_route(
                tunnel_cluster(service.host, p),
                p,
                routed_connect(node, view, service, p, resources),
            )
            for p in _tls_ports(service)
        ]
        out.append(
            {
                "name": service.host,
                # a host in the mesh domain answers to its short names too, as the
                # Python sidecar resolves them (`canonical_host`)
                "domains": service_domains(service.host, node.namespace),
                "routes": connect
                + routes.http_routes(
                    routes.table_routes(service.table, service.host),
                    ctx,
                    f"ServiceEntry {service.namespace}/{service.name} host {service.host}",
                ),
            }
        )
    return out


def tunnel_cluster(host: str, port: int) -> str:
    """The TCP cluster CONNECT tunnels to `host:port` go to: Istio's name with a
    subset slot no DestinationRule subset can have (`~connect`), apart from the HTTP
    cluster a route naming that port has (which may originate TLS)."""
    return outbound_cluster(host, TUNNEL_SUBSET, port)


def _tls_ports(service: ExternalService) -> list[int]:
    """The ports an app reaches through CONNECT (HTTPS, TLS, TCP...): tunnelled."""
    return [p.number for p in service.ports if p.protocol not in _HTTP_PROTOCOLS]


def _connect_route(
    cluster: str, port: int | None, weighted: list[tuple[str, int]] | None = None
) -> Json:
    """CONNECT host:port, terminated here: the tunnelled bytes go to `cluster` (or
    the `weighted` clusters a rule of the host chose) as they are (the app's TLS
    passes through)."""
    match: Json = {"connectMatcher": {}}
    if port is not None:
        match["headers"] = [{"name": ":authority", "stringMatch": {"suffix": f":{port}"}}]
    route: Json = {
        "timeout": "0s",
        "upgradeConfigs": [{"upgradeType": "CONNECT", "connectConfig": {}}],
    }
    if weighted and len(weighted) == 1:
        route["cluster"] = weighted[0][0]
    elif weighted:
        route["weightedClusters"] = {
            "clusters": [{"name": name, "weight": weight} for name, weight in weighted]
        }
    else:
        route["cluster"] = cluster
    return {
        "name": f"connect:{port}" if port is not None else "connect",
        "match": match,
        "route": route,
    }


def routed_connect(
    node: ProxyNode,
    view: MeshView,
    service: ExternalService,
    port: int,
    resources: XdsResources,
) -> list[tuple[str, int]] | None:
    """Where a CONNECT to `service.host:port` goes when the host's VirtualService has
    `tls` / `tcp` rules for this sidecar: the first `tls` rule whose SNI hosts cover
    the CONNECT host (the name the app's ClientHello carries; Envoy decides before
    the tunnel's bytes arrive), else the first applicable `tcp` rule. Weighted
    (cluster, weight) pairs: mesh services' TCP clusters, or tunnel clusters of
    ServiceEntry hosts; None: no rule, the host itself."""
    from . import tcp  # tcp imports this module

    table = service.table
    if table is None:
        return None
    chosen = tcp.connect_rule(table, node, port, service.host)
    if chosen is None:
        return None
    targets: list[tuple[str, int]] = []
    for weighted in chosen.route:
        if weighted.weight <= 0 and len(chosen.route) > 1:
            continue
        d = weighted.destination
        name = tcp.l4_cluster(node, view, resources, d.host, d.subset, d.port or port)
        if name is None:
            return None  # not a destination this proxy can reach: the host itself
        targets.append((name, weighted.weight or 1))
    return targets or None


def tunnel_target(node: ProxyNode, view: MeshView, host: str, port: int) -> str | None:
    """The tunnel cluster of ServiceEntry host `host` for `port` (a declared port of
    a non-HTTP protocol), or None when no entry visible here declares it."""
    for service in visible(node, view):
        if service.host == host and port in _tls_ports(service):
            return tunnel_cluster(host, port)
    return None


# loopback names and addresses, and the unspecified one, then the port: one short
# regex per port (Envoy refuses a regex whose RE2 program is over 100 instructions)
_LOOPBACK_AUTHORITY = (
    r"(?i)(localhost|127\.[0-9.]+|0\.0\.0\.0|\[::1?\]|\[::ffff:127\.[0-9.]+\])\.?:"
)


def own_listener_routes(node: ProxyNode | None) -> list[Json]:
    """ALLOW_ANY: a Host naming this proxy's own outbound or capture listener (by a
    loopback name or address, the unspecified one, or the capture listener's address)
    is answered 508, CONNECT or not, as by the Python sidecar (`proxy/own_listeners.py`):
    the passthrough would bring it back to the same listener, round after round."""
    if node is None:
        return []
    listeners = (node.outbound, node.capture)
    ports = sorted({address[1] for address in listeners if address is not None and address[1]})
    matchers: list[tuple[str, Json]] = []
    for port in ports:
        loopback = {"safeRegex": {"regex": f"{_LOOPBACK_AUTHORITY}{port}"}}
        matchers.append((f"{port}", loopback))
        if node.capture is not None:
            exact = {"exact": f"{node.capture[0]}:{port}", "ignoreCase": True}
            matchers.append((f"capture:{port}", exact))
    refused = {
        "status": 508,
        "body": {"inlineString": "passthrough to this sidecar refused"},
    }
    routes: list[Json] = []
    for name, string_match in matchers:
        header = [{"name": ":authority", "stringMatch": string_match}]
        routes.append(
            {
                "name": f"own_listener_connect|{name}",
                "match": {"connectMatcher": {}, "headers": header},
                "directResponse": refused,
            }
        )
        routes.append(
            {
                "name": f"own_listener|{name}",
                "match": {"prefix": "/", "headers": header},
                "directResponse": refused,
            }
        )
    return routes


def unknown_host_vhost(view: MeshView, node: ProxyNode | None = None) -> Json:
    """The virtual host of every Host that names no mesh service and no ServiceEntry
    host: the route configuration's catch-all (`*`), or on demand the model the agent
    names after each such Host (`envoy_view.vhds_answer`). Under REGISTRY_ONLY 502
    `unknown host` (CONNECT matches no route: 404 `NR`); under ALLOW_ANY
    `PassthroughCluster`, CONNECT tunnelled as asked (§5.5), never to `node`'s own
    listeners (`own_listener_routes`)."""
    routes = _unknown_host_routes(view, node)
    return {"name": UNKNOWN_HOST, "domains": ["*"], "routes": routes}


def _unknown_host_routes(view: MeshView, node: ProxyNode | None) -> list[Json]:
    if allows_any(view):
        return [
            *own_listener_routes(node),
            _connect_route(PASSTHROUGH_CLUSTER, None),
            {
                "name": "passthrough",
                "match": {"prefix": "/"},
                "route": {"cluster": PASSTHROUGH_CLUSTER, "timeout": "0s"},
            },
        ]
    return [
        {
            "name": UNKNOWN_HOST,
            "match": {"prefix": "/"},
            "directResponse": {
                "status": 502,
                "body": {"inlineString": "unknown host: not a mesh service"},
            },
        }
    ]


def allows_any(view: MeshView) -> bool:
    """The mesh-wide outbound traffic policy is ALLOW_ANY (REGISTRY_ONLY by default)."""
    return view.mesh_wide is not None and view.mesh_wide.outbound_traffic_policy == "ALLOW_ANY"


def passthrough_filters(view: MeshView) -> list[Json]:
    """The dynamic forward proxy filter the passthrough cluster needs (ALLOW_ANY)."""
    if not allows_any(view):
        return []
    return [
        {
            "name": "envoy.filters.http.dynamic_forward_proxy",
            "typedConfig": typed(DFP_FILTER, {"dnsCacheConfig": _DNS_CACHE}),
        }
    ]


def add_external_clusters(
    node: ProxyNode, view: MeshView, ctx: routes.RouteContext, out: XdsResources
) -> None:
    """The clusters of every ServiceEntry host (replacing the plain EDS clusters the
    mesh-service pass made for the same names) and the passthrough cluster."""
    for service in visible(node, view):
        port, target = _http_port(service)
        subsets = {""} | {subset for host, subset in ctx.referenced if host == service.host}
        for subset in sorted(subsets):
            policy = ctx.policy_of(service.host, subset)
            if policy is None:
                continue  # unknown subset: 503 NC, as for mesh services
            name = outbound_cluster(service.host, subset)
            labels: dict[str, str] = {}
            if subset and service.table is not None:
                labels = next(s.labels for s in service.table.subsets if s.name == subset)
            out.clusters.pop(name, None)
            out.endpoints.pop(name, None)
            if service.workload_selector:
                cluster, assignment = _selected_cluster(
                    name, service, policy.for_port(port), labels, view
                )
            else:
                cluster, assignment = _cluster(
                    name, service, policy.for_port(port), labels, port, target
                )
            out.clusters[name] = cluster
            if assignment is not None:
                out.endpoints[name] = assignment
        for host, subset, named_port in sorted(ctx.external_ports):
            if host != service.host:
                continue
            policy = ctx.policy_of(host, subset)
            if policy is None:
                continue  # unknown subset: 503 NC
            labels = {}
            if subset and service.table is not None:
                labels = next(s.labels for s in service.table.subsets if s.name == subset)
            target = next(
                (p.target_port or p.number for p in service.ports if p.number == named_port),
                named_port,
            )
            name = outbound_cluster(host, subset, named_port)
            cluster, assignment = _cluster(
                name, service, policy.for_port(named_port), labels, named_port, target
            )
            out.clusters[name] = cluster
            if assignment is not None:
                out.endpoints[name] = assignment
        for tls_port in _tls_ports(service):
            name = tunnel_cluster(service.host, tls_port)
            target = next(p.target_port or p.number for p in service.ports if p.number == tls_port)
            # the port's policy but its `tls` (the tunnel carries the app's own TLS)
            policy = ctx.policy_of(service.host, "") or TrafficPolicy()
            tunnelled = msgspec.structs.replace(policy.for_port(tls_port), tls=None, port_level=())
            cluster, assignment = _cluster(
                name, service, tunnelled, {}, tls_port, target, http=False
            )
            out.clusters[name] = cluster
            if assignment is not None:
                out.endpoints[name] = assignment
    if allows_any(view):
        out.clusters[PASSTHROUGH_CLUSTER] = parse(  # type: ignore[assignment]
            cluster_pb2.Cluster,
            {
                "name": PASSTHROUGH_CLUSTER,
                "connectTimeout": duration(clusters.DEFAULT_CONNECT_TIMEOUT_MS),
                "lbPolicy": "CLUSTER_PROVIDED",
                "clusterType": {
                    "name": "envoy.clusters.dynamic_forward_proxy",
                    "typedConfig": typed(DFP_CLUSTER, {"dnsCacheConfig": _DNS_CACHE}),
                },
            },
        )


def _http_port(service: ExternalService) -> tuple[int, int]:
    """(port, target port) of the one HTTP port the route configuration serves."""
    for port in service.ports:
        if port.protocol in _HTTP_PROTOCOLS:
            return port.number, port.target_port or port.number
    return 80, 80


def _cluster(
    name: str,
    service: ExternalService,
    policy: TrafficPolicy,
    labels: dict[str, str],
    port: int,
    target: int,
    *,
    http: bool = True,
) -> tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment | None]:
    port_name = next((p.name for p in service.ports if p.number == port), "")
    entries = [
        e
        for e in service.endpoints
        if e.weight > 0 and all(e.labels.get(k) == v for k, v in labels.items())
    ]
    body = to_dict(clusters.eds_cluster(name, policy, [], http=http))
    # a tunnelled port carries the app's own TLS: never originate on it
    body["transportSocket"] = transport_socket(policy.tls if http else None, service.host)
    if service.resolution == "STATIC":
        lb = [_lb_endpoint(e.address, e.ports.get(port_name, target), e) for e in entries]
        return _parse_cluster(body), clusters.load_assignment(name, lb)
    body.pop("edsClusterConfig", None)
    body["type"] = "LOGICAL_DNS" if service.resolution == "DNS_ROUND_ROBIN" else "STRICT_DNS"
    body["dnsLookupFamily"] = "V4_PREFERRED"
    if service.resolution == "NONE" or not entries:
        lb = [_lb_endpoint(service.host, target, None)]
    else:
        lb = [_lb_endpoint(e.address, e.ports.get(port_name, target), e) for e in entries]
    if service.resolution == "DNS_ROUND_ROBIN":
        lb = lb[:1]  # LOGICAL_DNS takes one name
    body["loadAssignment"] = {"clusterName": name, "endpoints": [{"lbEndpoints": lb}]}
    return _parse_cluster(body), None


def _parse_cluster(body: Json) -> cluster_pb2.Cluster:
    return parse(cluster_pb2.Cluster, body)  # type: ignore[return-value]


def _selected_cluster(
    name: str,
    service: ExternalService,
    policy: TrafficPolicy,
    labels: dict[str, str],
    view: MeshView,
) -> tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment]:
    """A MESH_INTERNAL entry with a workloadSelector: the selected instances (the
    agent follows their services: every service, or on demand those the entry selects
    from, architecture §5.2), over the mesh's mTLS unless the DestinationRule says
    otherwise."""
    instances = [eps for _table, eps in view.destinations.values() if eps is not None]
    selected = [
        ep for ep in selected_instances(service, instances) if clusters.has_labels(ep, labels)
    ]
    lb = clusters.lb_endpoints(selected, lambda ep: ep.address, f"ClusterLoadAssignment {name}")
    cluster = with_upstream_tls(
        clusters.eds_cluster(name, policy, lb, http=True), policy, service.host
    )
    return cluster, clusters.load_assignment(name, lb)


def with_upstream_tls(
    cluster: cluster_pb2.Cluster, policy: TrafficPolicy, host: str
) -> cluster_pb2.Cluster:
    """A mesh cluster (mTLS per endpoint identity) under a DestinationRule `tls` other
    than ISTIO_MUTUAL: that TLS (or plaintext, DISABLE) for every endpoint instead, as
    the Python sidecar does (`proxy.upstream_tls`)."""
    if policy.tls is None or policy.tls.mode == "ISTIO_MUTUAL":
        return cluster
    body = to_dict(cluster)
    body.pop("transportSocketMatches", None)
    body["transportSocket"] = transport_socket(policy.tls, host)
    return _parse_cluster(body)


def _lb_endpoint(address: str, port: int, entry: EntryEndpoint | None) -> Json:
    lb: Json = {"endpoint": {"address": {"socketAddress": {"address": address, "portValue": port}}}}
    if entry is not None:
        lb["loadBalancingWeight"] = entry.weight
    return lb


def transport_socket(tls: ClientTls | None, host: str) -> Json:
    """Plaintext without `tls` (a ServiceEntry host has no mesh identity), for DISABLE
    and ISTIO_MUTUAL (no identity to check); else the TLS the DestinationRule asks for."""
    if tls is None or tls.mode in ("DISABLE", "ISTIO_MUTUAL"):
        return tls_sockets.raw_buffer()
    server_name = tls.sni or host
    common: Json = {"alpnProtocols": ["http/1.1"]}
    if tls.mode == "MUTUAL":
        common["tlsCertificates"] = [
            {
                "certificateChain": {"filename": tls.client_certificate},
                "privateKey": {"filename": tls.private_key},
            }
        ]
    if not tls.insecure_skip_verify:
        names = tls.subject_alt_names or (server_name,)
        common["validationContext"] = {
            "trustedCa": {"filename": tls.ca_certificates or SYSTEM_CA_FILE},
            "matchTypedSubjectAltNames": [
                {"sanType": san_type, "matcher": {"exact": name}}
                for name in names
                for san_type in ("DNS", "URI")
            ],
        }
    return {
        "name": "envoy.transport_sockets.tls",
        "typedConfig": typed(UPSTREAM_TLS, {"sni": server_name, "commonTlsContext": common}),
    }
