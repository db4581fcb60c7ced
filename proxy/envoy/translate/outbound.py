"""The app's outbound HTTP proxy: one listener, one route configuration with a virtual
host per destination, and the clusters and endpoints every route names."""

from __future__ import annotations

import dataclasses

from envoy.config.route.v3 import route_components_pb2, route_pb2

from mesh.compiled import HTTPRoute, RouteTable
from mesh.hosts import service_of_host
from mesh.messages import EndpointSet
from proxy.envoy.bootstrap import XDS_CLUSTER
from proxy.envoy.resources import XdsResources
from proxy.telemetry import PEER_METADATA_HEADER, encode_peer_metadata, own_workload

from . import clusters, connect, egress, listeners, routes
from .model import MeshView, ProxyNode
from .names import OUTBOUND_HTTP_LISTENER, OUTBOUND_HTTP_ROUTE, outbound_cluster, service_domains
from .protos import ON_DEMAND, Json, parse

# VHDS needs delta xDS: its own stream to the sidecar's xDS server (the ADS stream
# stays state of the world); the bootstrap's cluster `xds-grpc` reaches that server
VHDS_SOURCE: Json = {
    "apiConfigSource": {
        "apiType": "DELTA_GRPC",
        "transportApiVersion": "V3",
        "grpcServices": [{"envoyGrpc": {"clusterName": XDS_CLUSTER}}],
    },
    "resourceApiVersion": "V3",
}
# asks VHDS for the virtual host of a Host the route configuration lacks, holding the
# request until the answer (before the router)
ON_DEMAND_FILTER: Json = {
    "name": "envoy.filters.http.on_demand",
    "typedConfig": {"@type": ON_DEMAND},
}


def exists(table: RouteTable | None, endpoints: EndpointSet | None) -> bool:
    """Does the mesh know this destination (`proxy.outbound._exists`)?"""
    known = table is not None and (table.exists or table.has_virtual_service)
    return known or bool(endpoints and endpoints.endpoints)


def peer_metadata_header(node: ProxyNode) -> Json:
    """`x-meshwork-peer` about this proxy's own workload, on every request it sends, as
    the Python proxy sends it (`proxy.telemetry.SidecarTelemetry`): the destination's
    telemetry names the caller's workload from it (never its identity)."""
    workload = own_workload(
        service=node.service,
        namespace=node.namespace,
        version=node.version,
        labels=node.labels,
        identity=node.identity,
    )
    return {
        "header": {"key": PEER_METADATA_HEADER, "value": encode_peer_metadata(workload)},
        "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD",
    }


def route_context(node: ProxyNode, view: MeshView, gateway: str = "") -> routes.RouteContext:
    tables = {fqdn: table for fqdn, (table, _) in view.destinations.items()}
    # ServiceEntry hosts: their tables decide their subsets and policies (a mesh
    # service of the same name wins)
    external = egress.external_tables(node, view)
    for host, table in external.items():
        tables.setdefault(host, table)
    return routes.RouteContext(
        namespace=node.namespace,
        labels=node.labels,
        gateway=gateway,
        tables=tables,
        external_hosts=frozenset(h for h in external if h not in view.destinations),
        # at a gateway, a Host without a port arrived on port 80 (`proxy.outbound`)
        default_port=80 if gateway else 0,
    )


def outbound_route_config(
    node: ProxyNode, view: MeshView, ctx: routes.RouteContext, out: XdsResources | None = None
) -> Json:
    vhosts = outbound_virtual_hosts(node, view, ctx, out)
    config: Json = {
        "name": OUTBOUND_HTTP_ROUTE,
        "ignorePortInHostMatching": True,
        # a route naming an unknown subset is answered 503 (NC), as by the Python proxy
        "validateClusters": False,
    }
    if node.on_demand:
        # every virtual host comes over VHDS when a request names its host; no
        # catch-all (it would match every host, so Envoy would never ask)
        config["vhds"] = {"configSource": VHDS_SOURCE}
    else:
        config["virtualHosts"] = [*vhosts, egress.unknown_host_vhost(view, node)]
    return config


def outbound_virtual_hosts(
    node: ProxyNode, view: MeshView, ctx: routes.RouteContext, out: XdsResources | None = None
) -> list[Json]:
    """A virtual host per known destination (named by its FQDN), then the ServiceEntry
    hosts' (§5.5)."""
    peer = peer_metadata_header(node)
    vhosts = []
    for fqdn in sorted(view.destinations):
        table, endpoints = view.destinations[fqdn]
        if not exists(table, endpoints):
            continue
        rules = routes.table_routes(table, fqdn)
        vhosts.append(
            {
                "name": fqdn,
                "domains": service_domains(fqdn, node.namespace),
                "routes": [
                    connect.CONNECT_ROUTE,
                    *_port_routes(rules, ctx, fqdn),
                    *routes.http_routes(rules, ctx, f"RouteTable {fqdn}"),
                ],
                # per mesh service: hosts outside the mesh never get it
                "requestHeadersToAdd": [peer],
            }
        )
    known = {v["name"] for v in vhosts}
    external = egress.external_vhosts(node, view, ctx, out or XdsResources())
    vhosts.extend(v for v in external if v["name"] not in known)
    return vhosts


def _port_routes(rules: tuple[HTTPRoute, ...], ctx: routes.RouteContext, fqdn: str) -> list[Json]:
    """For each port some mesh destination has `portLevelSettings` for: a copy of the
    rules limited to requests naming that port, sending to that port's clusters (kept
    only when one of them differs), ahead of the rules for every port. The Python
    sidecar's per-port clusters (`Destination.cluster(..., port)`), in Envoy's terms."""
    ports = sorted(
        {
            entry.port
            for table in ctx.tables.values()
            if table is not None and service_of_host(table.host) is not None
            for policy in (table.traffic_policy, *(s.traffic_policy for s in table.subsets))
            for entry in policy.port_level
        }
    )
    out: list[Json] = []
    for port in ports:
        scoped = dataclasses.replace(ctx, route_port=port, port_cluster_uses=0)
        copy = routes.http_routes(rules, scoped, f"RouteTable {fqdn} port {port}")
        if scoped.port_cluster_uses:
            out.extend(copy)
    return out


def unknown_host_model(node: ProxyNode, view: MeshView) -> route_components_pb2.VirtualHost:
    """On demand: the virtual host the agent serves, under each unknown Host's own
    name and domains, for a Host naming nothing known (`egress.unknown_host_vhost`:
    502, or ALLOW_ANY's passthrough), as the catch-all answers it otherwise."""
    vhost = {**egress.unknown_host_vhost(view, node), "name": f"{OUTBOUND_HTTP_ROUTE}/"}
    return parse(route_components_pb2.VirtualHost, vhost)  # type: ignore[return-value]


def add_outbound(node: ProxyNode, view: MeshView, out: XdsResources) -> routes.RouteContext:
    ctx = route_context(node, view)
    config = outbound_route_config(node, view, ctx, out)
    out.routes[OUTBOUND_HTTP_ROUTE] = parse(route_pb2.RouteConfiguration, config)
    if node.on_demand:
        for vhost in outbound_virtual_hosts(node, view, ctx, out):
            # VHDS resources live in their route configuration's namespace
            name = f"{OUTBOUND_HTTP_ROUTE}/{vhost['name']}"
            vhost = {**vhost, "name": name}
            out.virtual_hosts[name] = parse(route_components_pb2.VirtualHost, vhost)
    assert node.outbound is not None

    def hcm(prefix: str, extra: Json) -> Json:
        return listeners.http_connection_manager(
            prefix,
            route_config_name=OUTBOUND_HTTP_ROUTE,
            http_filters=[
                *([ON_DEMAND_FILTER] if node.on_demand else []),
                listeners.fault_filter(),
                *egress.passthrough_filters(view),
            ],
            access_log_name="outbound",
            access_log_cluster=node.access_log_cluster,
            telemetry_mode=node.telemetry_mode,
            tracing=listeners.tracing(node.tracing_cluster, node.service, node.trace_sampling),
            extra=extra,
        )

    # the Python proxy appends the app's address to x-forwarded-for; CONNECT is accepted
    # for every host (a mesh service's route terminates it, `connect`; a ServiceEntry
    # host's TLS port or ALLOW_ANY tunnels it, `egress`)
    outbound = connect.accepting_connect(hcm("outbound_http", {"useRemoteAddress": True}))
    out.listeners[OUTBOUND_HTTP_LISTENER] = listeners.listener(
        OUTBOUND_HTTP_LISTENER, node.outbound, [{"filters": [outbound]}], direction="OUTBOUND"
    )
    # connections the app tunnels with CONNECT, served on the same routes
    out.listeners[connect.TUNNEL] = connect.tunnel_listener(hcm("outbound_tunnel", {}))
    out.clusters[connect.TUNNEL] = connect.tunnel_cluster()
    return ctx


def add_http_clusters(view: MeshView, ctx: routes.RouteContext, out: XdsResources) -> None:
    """A cluster (and its endpoints) for each known destination and each of its
    subsets, and for every (host, subset) a route names that can exist."""
    wanted: set[tuple[str, str]] = set()
    for fqdn, (table, _) in view.destinations.items():
        wanted.add((fqdn, ""))
        if table is not None:
            wanted.update((fqdn, s.name) for s in table.subsets)
    wanted.update(ctx.referenced)
    wanted.update((host, subset) for host, subset, _port in ctx.port_clusters)
    for fqdn, subset in sorted(wanted):
        policy = ctx.policy_of(fqdn, subset)
        if policy is None:
            continue  # unknown subset: no such cluster, requests get 503 NC
        table, endpoint_set = view.destinations.get(fqdn, (None, None))
        labels: dict[str, str] = {}
        if subset and table is not None:
            labels = next(s.labels for s in table.subsets if s.name == subset)
        name = outbound_cluster(fqdn, subset)
        eps = [
            ep
            for ep in (endpoint_set.endpoints if endpoint_set is not None else [])
            if clusters.has_labels(ep, labels)
        ]
        lb = clusters.lb_endpoints(eps, lambda ep: ep.address, f"ClusterLoadAssignment {name}")
        out.clusters[name] = egress.with_upstream_tls(
            clusters.eds_cluster(name, policy, lb, http=True), policy, fqdn
        )
        out.endpoints[name] = clusters.load_assignment(name, lb)
        for host, port_subset, port in sorted(ctx.port_clusters):
            if (host, port_subset) != (fqdn, subset):
                continue
            port_name = outbound_cluster(fqdn, subset, port)
            port_policy = policy.for_port(port)
            port_lb = clusters.lb_endpoints(
                eps, lambda ep: ep.address, f"ClusterLoadAssignment {port_name}"
            )
            out.clusters[port_name] = egress.with_upstream_tls(
                clusters.eds_cluster(port_name, port_policy, port_lb, http=True), port_policy, fqdn
            )
            out.endpoints[port_name] = clusters.load_assignment(port_name, port_lb)
