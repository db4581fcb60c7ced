"""L4 route selection: which VirtualService `tcp[]` / `tls[]` rule a connection takes,
and which of its weighted destinations (pure; no sockets).

Istio semantics: rules are tried in order and the first whose matches hold wins (a
rule without matches takes every connection); within a match every set condition
must hold: the addressed service port, the destination address within one of
`destinationSubnets`, the calling workload's labels and namespace, the gateway, and
for `tls` rules the ClientHello's SNI (`*.suffix` patterns allowed). No rule matching
means "no route": the caller falls back to the addressed service (sidecars) or
closes the connection (gateways), as Envoy's listeners do.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mesh.compiled import L4Match, L4Route, WeightedDestination
from mesh.hosts import ServiceRef, host_matches, service_of_host

from .errors import NoDestinationError
from .match import _at_gateway
from .pick import pick_weighted


@dataclass(frozen=True, slots=True)
class ConnectionAttrs:
    """What an L4 match can look at, for one accepted connection."""

    # the service port the connection is addressed to
    port: int
    # the address the client connected to ("" when unknown: subnet matches fail)
    destination_ip: str = ""
    # the calling workload (this proxy)
    source_labels: Mapping[str, str] = field(default_factory=dict)
    source_namespace: str = ""
    # "" for a sidecar; the Gateway name(s) "<ns>/<name>[,...]" for a gateway
    gateway: str = ""
    # lower-cased SNI of the ClientHello ("" when none was sent or it is not TLS)
    sni: str = ""


@dataclass(frozen=True, slots=True)
class TcpTarget:
    """Where one outbound connection goes: a service, a subset ("" = all) and a port."""

    service: ServiceRef
    subset: str
    port: int
    # the VirtualService rule that chose it ("" = no rule: the addressed service)
    origin: str = ""


def route_target(routes: Sequence[L4Route], conn: ConnectionAttrs, rand: float) -> TcpTarget | None:
    """The destination the first matching rule picks (port: the destination's, else
    the connection's); None when no rule matches. Raises NoDestinationError when the
    chosen host is not a mesh service or no weight is positive."""
    route = select_l4_route(routes, conn)
    if route is None:
        return None
    chosen = pick_l4_destination(route, rand).destination
    ref = service_of_host(chosen.host)
    if ref is None:
        raise NoDestinationError(f"{route.origin}: {chosen.host} is not a mesh service")
    return TcpTarget(ref, chosen.subset, chosen.port or conn.port, route.origin)


def tcp_target(
    routes: Sequence[L4Route], addressed: ServiceRef, conn: ConnectionAttrs, rand: float
) -> TcpTarget:
    """The destination of a connection to `addressed` on port `conn.port`.

    The first `tcp` rule whose matches hold picks one of its weighted destinations
    (port: the destination's, else the addressed one); with no rule matching, the
    connection goes to the addressed service itself (Istio's default route). Raises
    NoDestinationError when the chosen host is not a mesh service or no weight is
    positive.
    """
    target = route_target(routes, conn, rand)
    return target if target is not None else TcpTarget(addressed, "", conn.port)


def select_l4_route(routes: Sequence[L4Route], conn: ConnectionAttrs) -> L4Route | None:
    """The first rule with no matches or a match that holds; None when none does."""
    for route in routes:
        if not route.match or any(_holds(m, conn) for m in route.match):
            return route
    return None


def pick_l4_destination(route: L4Route, rand: float) -> WeightedDestination:
    """The destination `rand` (uniform in [0, 1), injected) falls on; see `pick_weighted`."""
    if not route.route:
        raise NoDestinationError(f"{route.origin or 'L4 rule'} has no destinations")
    return pick_weighted(route.route, rand, route.origin or "L4 rule")


def _holds(m: L4Match, conn: ConnectionAttrs) -> bool:
    if m.port and m.port != conn.port:
        return False
    if m.gateways and not _at_gateway(frozenset(m.gateways), conn.gateway):
        return False
    if m.source_namespace and m.source_namespace != conn.source_namespace:
        return False
    labels = conn.source_labels
    for key, wanted in m.source_labels.items():
        if labels.get(key) != wanted:
            return False
    if m.destination_subnets and not _in_subnets(conn.destination_ip, m.destination_subnets):
        return False
    if m.sni_hosts:
        sni = conn.sni
        if not sni or not any(host_matches(pattern, sni) for pattern in m.sni_hosts):
            return False
    return True


def _in_subnets(address: str, subnets: Sequence[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    for subnet in subnets:
        try:
            network = ipaddress.ip_network(subnet, strict=False)
        except ValueError:
            continue  # validated at apply; an odd entry matches nothing
        if ip.version == network.version and ip in network:
            return True
    return False


__all__ = [
    "ConnectionAttrs",
    "TcpTarget",
    "pick_l4_destination",
    "route_target",
    "select_l4_route",
    "tcp_target",
]
