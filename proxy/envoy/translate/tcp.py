"""Outbound TCP relays (`--tcp-upstream`): a local listener per upstream, relayed to
the TCP listeners the destination's sidecars registered for that port.

The addressed service's VirtualService `tcp` rules (`RouteTable.tcp`) become the
listener's filter chains, as Istio builds them: a rule's conditions that are fixed for
this listener (the addressed port, this proxy's labels and namespace, `mesh`) are
decided here; `destinationSubnets` become the chain's `prefixRanges`; several weighted
destinations become `tcp_proxy.weighted_clusters`, one cluster per (service, subset,
port): `outbound|<port>|<subset>|<fqdn>`. With no rule matching, the connection goes
to the addressed service (the default chain), as the Python relay does.

The `tls` rules (SNI) come first, as chains with `serverNames` behind a
`tls_inspector`: Envoy prefers them for TLS connections naming those hosts.

Envoy picks the most specific chain, not the first listed: rules are emitted in
order, and a rule whose subnets repeat an earlier rule's (or follow a catch-all) is
left out, since the Python relay would never take it either.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterator, Mapping

import msgspec

from mesh.compiled import L4Match, L4Route, RouteTable, TrafficPolicy
from mesh.hosts import host_matches, service_of_host
from mesh.messages import Endpoint
from proxy.envoy.resources import XdsResources
from proxy.routing import resolve_subset, subset_endpoints
from proxy.routing.match import _at_gateway

from . import clusters, egress, listeners, rbac
from .model import MeshView, ProxyNode, TranslationError
from .names import gateway_listener, outbound_cluster, outbound_tcp_listener

LOCAL_HOST = "127.0.0.1"
Json = dict[str, object]


def add_tcp_cluster(view: MeshView, fqdn: str, port: int, out: XdsResources) -> str:
    """`outbound|<port>||<fqdn>`: the TCP listeners the service's instances registered
    for `port` (the capture listener's chains for a virtual IP); returns its name."""
    return _cluster(view, out, fqdn, "", port)


def hashes_source_ip(view: MeshView, fqdn: str, subset: str, port: int) -> bool:
    """Whether relays to this TCP cluster hash on the client's address."""
    policy = _policy(view.destinations.get(fqdn, (None, None))[0], subset, port)
    hashing = policy.load_balancer.consistent_hash if policy is not None else None
    return hashing is not None and hashing.use_source_ip


def add_outbound_tcp(node: ProxyNode, view: MeshView, out: XdsResources) -> None:
    for upstream in node.tcp_upstreams:
        fqdn = upstream.service.fqdn
        port = upstream.port
        table, _ = view.destinations.get(fqdn, (None, None))
        listener = outbound_tcp_listener(fqdn, port)
        chains: list[Json] = []
        # `tls` rules first: TLS connections with a matching SNI (Envoy prefers chains
        # with server names for them); everything else falls to the `tcp` chains
        named: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
        tls_rules = table.tls if table is not None else ()
        for route, subnets, names in _sidecar_tls_rules(tls_rules, node, port):
            if (subnets, names) in named:
                continue
            named.add((subnets, names))
            tls_match: Json = {"serverNames": list(names)}
            if subnets:
                tls_match["prefixRanges"] = [_cidr(s) for s in subnets]
            proxy = _tcp_proxy(node, view, out, listener, route, port)
            chains.append({"filterChainMatch": tls_match, "filters": [proxy]})
        inspect_tls = bool(chains)
        seen: set[tuple[str, ...]] = set()
        catch_all = False
        for route, subnets in _applicable(table.tcp if table is not None else (), node, port):
            if subnets in seen:
                continue
            seen.add(subnets)
            proxy = _tcp_proxy(node, view, out, listener, route, port)
            chain: Json = {"filters": [proxy]}
            if subnets:
                chain["filterChainMatch"] = {"prefixRanges": [_cidr(s) for s in subnets]}
            chains.append(chain)
            if not subnets:
                catch_all = True
                break
        if not catch_all:
            cluster = _cluster(view, out, fqdn, "", port)
            chains.append(
                {
                    "filters": [
                        listeners.tcp_proxy(
                            listener,
                            cluster,
                            "outbound_tcp",
                            node.access_log_cluster,
                            hash_source_ip=hashes_source_ip(view, fqdn, "", port),
                        )
                    ]
                }
            )
        out.listeners[listener] = listeners.listener(
            listener,
            (LOCAL_HOST, upstream.local_port),
            chains,
            listener_filters=[listeners.tls_inspector()] if inspect_tls else (),
            # as the Python relay: no ClientHello in time, the `tcp` rules decide
            continue_after_filter_timeout=inspect_tls,
        )


BLACK_HOLE = "BlackHoleCluster"  # Istio's name: a cluster without endpoints
L4_GATEWAY_PROTOCOLS = ("TCP", "TLS")


def add_gateway_l4(node: ProxyNode, view: MeshView, out: XdsResources) -> None:
    """The gateway's TCP and TLS (PASSTHROUGH) servers: a listener per server port on
    the gateway's bind address. TCP: a chain per `tcp` rule for that port (subnets as
    prefix ranges); TLS: `tls_inspector` and a chain per `tls` rule (its SNI hosts as
    `serverNames`). No chain matching: Envoy closes the connection, as the Python
    gateway does (no default route at a gateway). The AuthorizationPolicies selecting
    the gateway run first (network RBAC)."""
    config = view.gateway
    if config is None:
        return
    bind = node.gateway_listeners[0][0] if node.gateway_listeners else "0.0.0.0"
    policies = rbac.selected(view.inbound, node.labels)
    done: set[int] = set()
    for server in config.servers:
        protocol = server.protocol.upper()
        if protocol not in L4_GATEWAY_PROTOCOLS or server.port in done:
            continue
        done.add(server.port)
        port = server.port
        name = gateway_listener(bind, port)
        guard = rbac.rbac_filters(
            policies,
            port,
            tcp=True,
            stat_prefix="gateway_tcp",
            inbound=view.inbound,
            namespace=node.namespace,
        )
        tls = protocol == "TLS"
        chains: list[Json] = []
        seen: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
        routes = config.tls if tls else config.tcp
        for route, subnets, names in _gateway_rules(routes, node, config.name, port):
            if (subnets, names) in seen:
                continue
            seen.add((subnets, names))
            match: Json = {}
            if subnets:
                match["prefixRanges"] = [_cidr(s) for s in subnets]
            if names:
                match["serverNames"] = list(names)
            # logged as the Python gateway records them: reporter source
            proxy = _tcp_proxy(node, view, out, name, route, port)
            chain: Json = {"filters": [*guard, proxy]}
            if match:
                chain["filterChainMatch"] = match
            chains.append(chain)
            if not match:
                break  # a catch-all: later rules are never taken
        if not chains:
            # Envoy needs a chain: one that closes every connection
            out.clusters[BLACK_HOLE] = clusters.black_hole(BLACK_HOLE)
            chains.append(
                {
                    "filters": [
                        *guard,
                        listeners.tcp_proxy(
                            name, BLACK_HOLE, "outbound_tcp", node.access_log_cluster
                        ),
                    ]
                }
            )
        out.listeners[name] = listeners.listener(
            name,
            (bind, port),
            chains,
            listener_filters=[listeners.tls_inspector()] if tls else (),
            direction="OUTBOUND",
        )


def _gateway_rules(
    routes: tuple[L4Route, ...], node: ProxyNode, gateway: str, port: int
) -> Iterator[tuple[L4Route, tuple[str, ...], tuple[str, ...]]]:
    """Each (rule, subnets, SNI names) that can apply on this gateway server, one per
    match that holds here (() = any): a chain per match keeps subnets and names of
    different matches from combining into conditions no match states."""
    for route in routes:
        if not route.match:
            yield route, (), ()
            continue
        for m in route.match:
            if _holds_at_gateway(m, node, gateway, port):
                yield route, tuple(sorted(m.destination_subnets)), tuple(sorted(m.sni_hosts))


def _holds_at_gateway(m: L4Match, node: ProxyNode, gateway: str, port: int) -> bool:
    if m.port and m.port != port:
        return False
    if m.gateways and not _at_gateway(frozenset(m.gateways), gateway):
        return False
    if m.source_namespace and m.source_namespace != node.namespace:
        return False
    labels = _node_labels(node)
    return all(labels.get(k) == v for k, v in m.source_labels.items())


def l4_hosts(node: ProxyNode, view: MeshView) -> set[str]:
    """The hosts the `tcp` rules of this proxy's upstreams send to."""
    hosts: set[str] = set()
    gw = view.gateway
    if node.role == "gateway" and gw is not None:
        for route in (*gw.tcp, *gw.tls):
            hosts.update(d.destination.host for d in route.route)
    if node.role != "gateway":
        # CONNECT routes of ServiceEntry hosts by their `tls` / `tcp` rules
        for service in egress.visible(node, view):
            if service.table is None:
                continue
            for route in (*service.table.tls, *service.table.tcp):
                hosts.update(d.destination.host for d in route.route)
    for upstream in node.tcp_upstreams:
        table, _ = view.destinations.get(upstream.service.fqdn, (None, None))
        for route, _subnets in _applicable(
            table.tcp if table is not None else (), node, upstream.port
        ):
            hosts.update(d.destination.host for d in route.route)
        for route, _subnets, _names in _sidecar_tls_rules(
            table.tls if table is not None else (), node, upstream.port
        ):
            hosts.update(d.destination.host for d in route.route)
    return hosts


def _applicable(
    routes: tuple[L4Route, ...], node: ProxyNode, port: int
) -> Iterator[tuple[L4Route, tuple[str, ...]]]:
    """Each rule that can apply on this listener, with the subnets its connections
    must be addressed to (() = any): the union of its applicable matches' subnets."""
    for route in routes:
        if not route.match:
            yield route, ()
            continue
        held = [m for m in route.match if _holds_here(m, node, port)]
        if not held:
            continue
        if any(not m.destination_subnets for m in held):
            yield route, ()
        else:
            yield route, tuple(sorted({s for m in held for s in m.destination_subnets}))


def _sidecar_tls_rules(
    routes: tuple[L4Route, ...], node: ProxyNode, port: int
) -> Iterator[tuple[L4Route, tuple[str, ...], tuple[str, ...]]]:
    """Each (rule, subnets, SNI names) of the `tls` rules, one per match that holds
    on this sidecar listener (a `tls` match always names SNI hosts)."""
    for route in routes:
        for m in route.match:
            plain = msgspec.structs.replace(m, sni_hosts=())
            if m.sni_hosts and _holds_here(plain, node, port):
                yield route, tuple(sorted(m.destination_subnets)), tuple(sorted(m.sni_hosts))


def _holds_here(m: L4Match, node: ProxyNode, port: int) -> bool:
    """The conditions fixed for a sidecar's listener (subnets are left to Envoy)."""
    if m.port and m.port != port:
        return False
    if m.gateways and "mesh" not in m.gateways:
        return False
    if m.source_namespace and m.source_namespace != node.namespace:
        return False
    if m.sni_hosts:
        return False  # `tls` rules are not on plaintext TCP relays
    labels = _node_labels(node)
    return all(labels.get(k) == v for k, v in m.source_labels.items())


def _node_labels(node: ProxyNode) -> Mapping[str, str]:
    # `version` may only be registered as a field of its own (`meshctl sidecar --version`)
    return {"version": node.version, **node.labels} if node.version else node.labels


def _tcp_proxy(
    node: ProxyNode,
    view: MeshView,
    out: XdsResources,
    listener: str,
    route: L4Route,
    port: int,
) -> Json:
    targets: list[tuple[str, int]] = []
    hash_source_ip = False
    for weighted in route.route:
        d = weighted.destination
        if weighted.weight > 0 or len(route.route) == 1:
            name = l4_cluster(node, view, out, d.host, d.subset, d.port or port)
            if name is None:
                raise TranslationError(
                    route.origin,
                    "tcp[].route[].destination.host",
                    d.host,
                    "not a mesh service or a ServiceEntry host declaring that port",
                )
            targets.append((name, weighted.weight))
            if service_of_host(d.host) is not None:
                hash_source_ip |= hashes_source_ip(view, d.host, d.subset, d.port or port)
    if not targets:
        raise TranslationError(route.origin, "tcp[].route[].weight", 0, "no positive weight")
    return listeners.tcp_proxy(
        listener,
        targets[0][0],
        "outbound_tcp",
        node.access_log_cluster,
        weighted=targets if len(targets) > 1 else (),
        hash_source_ip=hash_source_ip,
    )


def l4_cluster(
    node: ProxyNode, view: MeshView, out: XdsResources, host: str, subset: str, port: int
) -> str | None:
    """The cluster an L4 rule's destination names: a mesh service's TCP listeners,
    or a ServiceEntry host's tunnel cluster (bytes as sent); None when neither."""
    if service_of_host(host) is not None:
        return _cluster(view, out, host, subset, port)
    return egress.tunnel_target(node, view, host, port)


def connect_rule(table: RouteTable, node: ProxyNode, port: int, host: str) -> L4Route | None:
    """The rule a CONNECT to `host:port` takes on this sidecar: the first `tls` rule
    with a match holding here whose SNI hosts cover `host`, else the first `tcp` rule
    applicable to any destination address."""
    for route in table.tls:
        for m in route.match:
            plain = msgspec.structs.replace(m, sni_hosts=())
            covered = any(host_matches(pattern, host) for pattern in m.sni_hosts)
            if covered and not m.destination_subnets and _holds_here(plain, node, port):
                return route
    for route, subnets in _applicable(table.tcp, node, port):
        if not subnets:
            return route
    return None


def _cluster(view: MeshView, out: XdsResources, fqdn: str, subset: str, port: int) -> str:
    """`outbound|<port>|<subset>|<fqdn>` over the instances with a TCP listener for
    `port` (and the subset's labels); an unknown subset has no endpoints (Envoy then
    closes the connection, as the Python relay does with flag NC)."""
    name = outbound_cluster(fqdn, subset, port=port)
    if name in out.clusters:
        return name
    table, endpoint_set = view.destinations.get(fqdn, (None, None))
    key = str(port)
    eps = [
        ep
        for ep in (endpoint_set.endpoints if endpoint_set is not None else [])
        if key in ep.tcp_listeners
    ]
    if subset:
        labels = _subset_labels(table, subset)
        eps = subset_endpoints(eps, labels) if labels is not None else []
    policy = _policy(table, subset, port)
    # a gateway's TCP / TLS server takes the bytes as sent: no mTLS to it
    eps = [
        msgspec.structs.replace(ep, identity="") if port in ep.plain_tcp_ports else ep for ep in eps
    ]
    lb = clusters.lb_endpoints(eps, functools.partial(_relay, key), f"ClusterLoadAssignment {name}")
    # the subset's policy for the port, as the Python relay's TCP cluster (§5.1)
    out.clusters[name] = clusters.eds_cluster(name, policy or TrafficPolicy(), lb, http=False)
    out.endpoints[name] = clusters.load_assignment(name, lb)
    return name


def _policy(table: RouteTable | None, subset: str, port: int) -> TrafficPolicy | None:
    """The DestinationRule policy of a TCP cluster: the subset's (merged), for the port
    (`portLevelSettings`); None for an unknown subset."""
    if table is None:
        return None if subset else TrafficPolicy()
    resolved = resolve_subset(table, subset)
    return resolved.traffic_policy.for_port(port) if resolved is not None else None


def _subset_labels(table: RouteTable | None, subset: str) -> dict[str, str] | None:
    for s in table.subsets if table is not None else ():
        if s.name == subset:
            return dict(s.labels)
    return None


def _cidr(subnet: str) -> Json:
    network = ipaddress.ip_network(subnet, strict=False)
    return {"addressPrefix": str(network.network_address), "prefixLen": network.prefixlen}


def _relay(port: str, endpoint: Endpoint) -> str:
    return endpoint.tcp_listeners[port]
