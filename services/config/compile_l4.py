"""Pure compiler of a VirtualService's L4 rules (`tcp[]`, `tls[]`) into `L4Route`s.

Istio semantics kept here:
- hosts resolve in the namespace of the VirtualService;
- a match limited by its own `gateways` applies only where those gateways are (the
  caller's `keep` decides: `mesh` for sidecars, the selected Gateways for a gateway);
  a rule whose every match is for somewhere else does not apply;
- a lone destination gets all the connections whatever its weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mesh import compiled
from mesh.hosts import canonical_host
from mesh.resources import MESH_GATEWAY, Resource, VirtualServiceSpec
from mesh.resources.networking import L4MatchAttributes, RouteDestination, TLSMatchAttributes

# canonical match gateways -> the gateways to keep on the match, or None to drop it
GatewayFilter = Callable[[tuple[str, ...]], tuple[str, ...] | None]


def gateway_name(ref: str, namespace: str) -> str:
    """`mesh` stays `mesh`; a bare Gateway name resolves in the referring namespace."""
    if ref == MESH_GATEWAY or "/" in ref:
        return ref
    return f"{namespace}/{ref}"


def compile_l4_routes(
    resource: Resource, spec: VirtualServiceSpec, keep: GatewayFilter
) -> tuple[list[compiled.L4Route], list[compiled.L4Route]]:
    """The (`tcp`, `tls`) rules of one VirtualService that apply where `keep` says."""
    namespace = resource.metadata.namespace
    origin = f"VirtualService/{namespace}/{resource.metadata.name}"
    tcp: list[compiled.L4Route] = []
    for rule in spec.tcp:
        route = _route(rule.match, rule.route, namespace, origin, keep)
        if route is not None:
            tcp.append(route)
    tls: list[compiled.L4Route] = []
    for tls_rule in spec.tls:
        route = _route(tls_rule.match, tls_rule.route, namespace, origin, keep)
        if route is not None:
            tls.append(route)
    return tcp, tls


def _route(
    matches: Sequence[L4MatchAttributes | TLSMatchAttributes],
    destinations: Sequence[RouteDestination],
    namespace: str,
    origin: str,
    keep: GatewayFilter,
) -> compiled.L4Route | None:
    kept: list[compiled.L4Match] = []
    for match in matches:
        gateways = keep(tuple(gateway_name(g, namespace) for g in match.gateways))
        if gateways is None:
            continue
        sni = match.sni_hosts if isinstance(match, TLSMatchAttributes) else ()
        kept.append(
            compiled.L4Match(
                port=match.port or 0,
                destination_subnets=tuple(match.destination_subnets),
                source_labels=dict(match.source_labels),
                source_namespace=match.source_namespace,
                gateways=gateways,
                sni_hosts=tuple(h.lower().rstrip(".") for h in sni),
            )
        )
    if matches and not kept:
        return None  # every match is for somewhere else
    single = len(destinations) == 1
    return compiled.L4Route(
        match=tuple(kept),
        route=tuple(
            compiled.WeightedDestination(
                destination=compiled.Destination(
                    host=canonical_host(d.destination.host, namespace),
                    subset=d.destination.subset,
                    port=d.destination.port.number if d.destination.port is not None else 0,
                ),
                weight=100 if single else d.weight,
            )
            for d in destinations
        ),
        origin=origin,
    )


__all__ = ["GatewayFilter", "compile_l4_routes", "gateway_name"]
