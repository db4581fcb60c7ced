"""Weighted choice among a route's destinations (VirtualService `route[].weight`)."""

from __future__ import annotations

from collections.abc import Sequence

from mesh.compiled import HTTPRoute, WeightedDestination

from .errors import NoDestinationError


def pick_destination(route: HTTPRoute, rand: float) -> WeightedDestination:
    """The destination `rand` (uniform in [0, 1), injected) falls on.

    A single destination always receives the traffic whatever its weight (Istio);
    among several, each gets weight / total of the traffic and a weight of 0 gets none.
    Raises `NoDestinationError` for a route with no destinations (a redirect or direct
    response: the caller should not ask) or whose weights are all 0 (Envoy rejects
    such a table; answering 503 beats guessing).
    """
    return pick_weighted(route.route, rand, route.name or "<unnamed>")


def pick_weighted(
    destinations: Sequence[WeightedDestination], rand: float, rule: str
) -> WeightedDestination:
    """`pick_destination` for any rule's destinations (`rule` names it in errors)."""
    if len(destinations) == 1:
        return destinations[0]
    total = 0
    for d in destinations:
        if d.weight > 0:
            total += d.weight
    if total == 0:
        raise NoDestinationError(f"route {rule} has no positive weight")
    target = rand * total
    chosen: WeightedDestination | None = None
    cumulative = 0
    for d in destinations:
        if d.weight <= 0:
            continue
        cumulative += d.weight
        chosen = d
        if target < cumulative:
            return d
    # Only reachable when rand * total rounds up to total; the last positive one owns it.
    assert chosen is not None
    return chosen
