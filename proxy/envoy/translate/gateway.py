"""Gateway mode: plaintext listeners sharing one route configuration built from the
GatewayConfig's virtual hosts, matched as `proxy.routing.match.compile_virtual_hosts`
does. RequestAuthentication (`jwt_authn`) and AuthorizationPolicy (RBAC) selecting the
gateway run before the router when the agent gives the gateway's inbound policy in
`MeshView.inbound`."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2

from mesh.compiled import GatewayConfig
from mesh.hosts import service_of_host
from proxy.envoy.resources import XdsResources

from . import inbound, jwt_authn, listeners, rbac, routes, tcp
from .model import MeshView, ProxyNode, TranslationError
from .names import GATEWAY_ROUTE, gateway_listener
from .outbound import peer_metadata_header
from .protos import Json, parse


def _aliases(host: str, namespace: str) -> list[str]:
    """Short names a Host may use for a mesh FQDN, resolved in the gateway's
    namespace as `canonical_host` would."""
    ref = service_of_host(host)
    if ref is None:
        return []
    names = [f"{ref.name}.{ref.namespace}", f"{ref.name}.{ref.namespace}.svc"]
    if ref.namespace == namespace:
        names.insert(0, ref.name)
    return names


def gateway_route_config(config: GatewayConfig, ctx: routes.RouteContext) -> Json:
    """One virtual host per GatewayConfig virtual host. A name listed by an earlier
    virtual host stays with it (the first wins, as in the Python gateway); short
    aliases of FQDNs come after every name listed as written."""
    listed: set[str] = set()
    domains_of: list[list[str]] = []
    for vh in config.virtual_hosts:
        domains = []
        for pattern in vh.hosts:
            host = pattern.lower()
            if host not in listed:
                listed.add(host)
                domains.append(host)
        domains_of.append(domains)
    for vh, domains in zip(config.virtual_hosts, domains_of, strict=True):
        for pattern in vh.hosts:
            for alias in _aliases(pattern.lower(), config.namespace):
                if alias not in listed:
                    listed.add(alias)
                    domains.append(alias)
    vhosts = []
    for i, (vh, domains) in enumerate(zip(config.virtual_hosts, domains_of, strict=True)):
        if not domains:
            continue
        vhosts.append(
            {
                "name": f"{i}:{vh.hosts[0] if vh.hosts else ''}",
                "domains": domains,
                "routes": [
                    # what the Python gateway refuses before routing (architecture §6)
                    *inbound.refused_path_routes(),
                    *routes.http_routes(
                        vh.http, ctx, f"GatewayConfig {config.name}.virtual_hosts[{i}]"
                    ),
                ],
            }
        )
    return {
        "name": GATEWAY_ROUTE,
        "virtualHosts": vhosts,
        "ignorePortInHostMatching": True,
        "validateClusters": False,
    }


def add_gateway(
    node: ProxyNode, view: MeshView, out: XdsResources, ctx: routes.RouteContext
) -> None:
    config = view.gateway
    if config is None:
        raise TranslationError(
            f"gateway {node.namespace}/{node.service}",
            "view.gateway",
            None,
            "a gateway needs its GatewayConfig",
        )
    for i, server in enumerate(config.servers):
        if server.protocol.upper() in tcp.L4_GATEWAY_PROTOCOLS:
            continue  # their own listeners (`tcp.add_gateway_l4`)
        if server.protocol.upper() not in ("HTTP", "HTTP2", "GRPC"):
            raise TranslationError(
                f"GatewayConfig {config.name}",
                f"servers[{i}].protocol",
                server.protocol,
                "only plaintext HTTP gateway servers are translated",
            )
    route_config = gateway_route_config(config, ctx)
    route_config["requestHeadersToAdd"] = [peer_metadata_header(node)]
    # a route's own header operations apply last, so a route leaving the mesh can
    # remove the peer metadata added here (`routes._route`)
    route_config["mostSpecificHeaderMutationsWins"] = True
    out.routes[GATEWAY_ROUTE] = parse(route_pb2.RouteConfiguration, route_config)
    # RequestAuthentication and AuthorizationPolicy selecting the gateway (its own
    # service's inbound policy, as the Python gateway follows it), before routing
    authns = jwt_authn.selected(view.inbound, node.labels)
    jwt_filters, jwks_clusters = jwt_authn.jwt_authn_filters(
        authns, inbound.jwks_ca_file(node), view.discovered_jwks
    )
    for cluster_name, cluster in jwks_clusters.items():
        out.clusters[cluster_name] = parse(cluster_pb2.Cluster, cluster)
    policies = rbac.selected(view.inbound, node.labels)
    for address, port in node.gateway_listeners:
        name = gateway_listener(address, port)
        rbac_filters = rbac.rbac_filters(
            policies,
            port,
            tcp=False,
            stat_prefix="gateway",
            issuers=jwt_authn.issuers(authns),
            inbound=view.inbound,
            namespace=node.namespace,
        )
        hcm = listeners.http_connection_manager(
            f"gateway_{port}",
            route_config_name=GATEWAY_ROUTE,
            http_filters=[*jwt_filters, *rbac_filters, listeners.fault_filter()],
            access_log_name="gateway",
            access_log_cluster=node.access_log_cluster,
            telemetry_mode=node.telemetry_mode,
            tracing=listeners.tracing(node.tracing_cluster, node.service, node.trace_sampling),
            extra={
                "useRemoteAddress": True,
                **({"xffNumTrustedHops": hops} if (hops := inbound.trusted_hops(view)) else {}),
            },
        )
        # the gateway reports as a source (client spans), as the Python gateway does
        if node.egress_gateway:
            # mesh sidecars reach an egress gateway over mTLS, anyone else in plaintext
            chains = inbound.permissive_chains([hcm], node.trust_domain)
            out.listeners[name] = listeners.listener(
                name,
                (address, port),
                chains,
                listener_filters=[listeners.tls_inspector()],
                direction="OUTBOUND",
            )
        else:
            out.listeners[name] = listeners.listener(
                name, (address, port), [{"filters": [hcm]}], direction="OUTBOUND"
            )
