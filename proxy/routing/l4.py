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
from mesh.hosts import host_matches

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


__all__ = ["ConnectionAttrs", "pick_l4_destination", "select_l4_route"]
