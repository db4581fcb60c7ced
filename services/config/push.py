"""Scoped, debounced pushes for the config leader (istiod's `PushRequest` + debounce).

A change becomes a `PushScope`: the compiled configs it can affect. Scopes merge (set
union), and `PushScheduler` debounces them with `mesh.debounce` (quiet period, maximum
delay, one push in flight). Pure: no I/O, the clock is passed in.

What a change can affect, per kind (the old and the new version of the resource both
count, so hosts a change removes are recompiled too):

- VirtualService: the route tables of the hosts it names (`hosts`, route
  destinations, mirrors: a service a resource names is published as existing), and
  gateway configs when it is bound to a Gateway;
- DestinationRule: the route table of its host;
- Gateway: gateway configs only;
- ServiceEntry, and a VirtualService or DestinationRule naming a host outside the
  mesh domain or a wildcard: the mesh-wide table (`mesh.config.meshwide`);
- PeerAuthentication, AuthorizationPolicy, RateLimitPolicy: the inbound policies of
  the services of its namespace, or of every namespace for a root-namespace policy
  (a root-namespace PeerAuthentication with a selector only reaches root-namespace
  workloads). A selector does not narrow it further: the compiler does not know the
  instances' labels (see `compile_security`), so every service of the namespace gets
  the policy and its sidecars filter.

Wildcard hosts (`*.prod.svc.cluster.local`, `*`) are kept as patterns and matched
against the destinations the leader knows when the push runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from mesh.debounce import Batch, Debouncer, DebounceSettings
from mesh.hosts import ServiceRef, canonical_host, host_matches, service_of_host
from mesh.resources import (
    MESH_GATEWAY,
    AuthorizationPolicySpec,
    DestinationRuleSpec,
    GatewaySpec,
    PeerAuthenticationSpec,
    RateLimitPolicySpec,
    Resource,
    ServiceEntrySpec,
    VirtualServiceSpec,
)
from mesh.resources.gateway_api import GRPCRouteSpec, HTTPRouteSpec
from mesh.resources.validate_gateway_api import is_gateway_parent
from services.config.compile_gateway_api import services_named_by_gateway_api

__all__ = ["PushScheduler", "PushScope", "scope_of_change"]


@dataclass(frozen=True, slots=True)
class PushScope:
    """The compiled configs a push recompiles. `full` recompiles everything known."""

    full: bool = False
    routes: frozenset[ServiceRef] = frozenset()
    route_patterns: frozenset[str] = frozenset()  # canonical wildcard hosts
    gateways: bool = False
    inbound_namespaces: frozenset[str] = frozenset()
    inbound_all: bool = False
    # the mesh-wide table (ServiceEntry hosts and the policies naming them)
    mesh_wide: bool = False

    @property
    def empty(self) -> bool:
        return self == PushScope()

    def merge(self, other: PushScope) -> PushScope:
        if self.full or other.full:
            return FULL
        return PushScope(
            routes=self.routes | other.routes,
            route_patterns=self.route_patterns | other.route_patterns,
            gateways=self.gateways or other.gateways,
            inbound_namespaces=self.inbound_namespaces | other.inbound_namespaces,
            inbound_all=self.inbound_all or other.inbound_all,
            mesh_wide=self.mesh_wide or other.mesh_wide,
        )

    def routes_among(self, known: Iterable[ServiceRef]) -> set[ServiceRef]:
        """The known destinations whose route tables this scope recompiles (and the
        destinations it names, known or not)."""
        if self.full:
            return set(known)
        chosen = set(self.routes)
        if self.route_patterns:
            chosen.update(
                ref for ref in known if any(host_matches(p, ref.fqdn) for p in self.route_patterns)
            )
        return chosen

    def inbound_among(self, known: Iterable[ServiceRef]) -> set[ServiceRef]:
        """The known services whose inbound policies this scope recompiles."""
        if self.full or self.inbound_all:
            return set(known)
        return {ref for ref in known if ref.namespace in self.inbound_namespaces}


FULL = PushScope(full=True)
NOTHING = PushScope()


def scope_of_change(old: Resource | None, new: Resource | None, root_namespace: str) -> PushScope:
    """What a change from `old` to `new` (either None: created / deleted) can affect."""
    scope = NOTHING
    for resource in (old, new):
        if resource is not None:
            scope = scope.merge(_scope_of(resource, root_namespace))
    return scope


def _scope_of(resource: Resource, root_namespace: str) -> PushScope:
    spec = resource.spec
    namespace = resource.metadata.namespace
    if isinstance(spec, VirtualServiceSpec):
        hosts = [canonical_host(h, namespace) for h in spec.hosts]
        hosts += [canonical_host(d.destination.host, namespace) for r in spec.http for d in r.route]
        hosts += [canonical_host(r.mirror.host, namespace) for r in spec.http if r.mirror]
        hosts += [canonical_host(h, namespace) for h in spec.l4_destination_hosts()]
        routes, patterns = _split_hosts(hosts)
        bound_to_gateway = any(g != MESH_GATEWAY for g in spec.gateways)
        return PushScope(
            routes=routes,
            route_patterns=patterns,
            gateways=bound_to_gateway,
            mesh_wide=_outside_mesh(hosts),
        )
    if isinstance(spec, DestinationRuleSpec):
        host = canonical_host(spec.host, namespace)
        routes, patterns = _split_hosts([host])
        return PushScope(routes=routes, route_patterns=patterns, mesh_wide=_outside_mesh([host]))
    if isinstance(spec, ServiceEntrySpec):
        return PushScope(mesh_wide=True)
    if isinstance(spec, GatewaySpec):
        return PushScope(gateways=True)
    if isinstance(spec, HTTPRouteSpec | GRPCRouteSpec):
        # its parents' tables; a Kubernetes Service (backends resolve through it) is
        # not listed here: any route may name it, so it recompiles everything
        return PushScope(
            routes=frozenset(services_named_by_gateway_api([resource])),
            gateways=any(is_gateway_parent(ref) for ref in spec.parent_refs),
        )
    if isinstance(spec, PeerAuthenticationSpec):
        if namespace == root_namespace and spec.selector is None:
            return PushScope(inbound_all=True)  # mesh-wide
        return PushScope(inbound_namespaces=frozenset({namespace}))
    if isinstance(spec, AuthorizationPolicySpec | RateLimitPolicySpec):
        if namespace == root_namespace:
            return PushScope(inbound_all=True)
        return PushScope(inbound_namespaces=frozenset({namespace}))
    return FULL  # a kind this module does not know: recompile everything rather than miss


def _outside_mesh(hosts: Iterable[str]) -> bool:
    """Some host may be a ServiceEntry's: outside the mesh domain, or a wildcard. (A
    ServiceEntry host inside the mesh domain is caught by the leader, which compares
    the scope's routes with the ServiceEntry hosts.)"""
    return any(h.startswith("*") or service_of_host(h) is None for h in hosts)


def _split_hosts(hosts: Iterable[str]) -> tuple[frozenset[ServiceRef], frozenset[str]]:
    refs: set[ServiceRef] = set()
    patterns: set[str] = set()
    for host in hosts:
        if host == "*" or host.startswith("*."):
            patterns.add(host)
        elif (ref := service_of_host(host)) is not None:
            refs.add(ref)
        # a host outside the mesh domain names no destination's route table
    return frozenset(refs), frozenset(patterns)


@dataclass
class PushScheduler:
    """Events in (resources changed, proxies appeared, snapshot reloaded), merged and
    debounced; decisions out (`take`: push now for this scope)."""

    settings: DebounceSettings
    root_namespace: str
    debouncer: Debouncer[PushScope] = field(init=False)

    def __post_init__(self) -> None:
        self.debouncer = Debouncer(self.settings, PushScope.merge)

    def resources_changed(self, old: Resource | None, new: Resource | None, now: float) -> None:
        self.debouncer.add(scope_of_change(old, new, self.root_namespace), now)

    def subjects_appeared(self, now: float, *, gateways: bool = False) -> None:
        """A proxy follows a destination or serves a service never published to yet
        (the push compiles every wanted subject not yet published), or a gateway
        reported its labels."""
        self.debouncer.add(PushScope(gateways=gateways), now)

    def everything(self, now: float) -> None:
        """The snapshot was reloaded (leadership, compacted watch): recompile all."""
        self.debouncer.add(FULL, now)

    @property
    def queue_depth(self) -> int:
        return self.debouncer.pending_changes

    def due_at(self) -> float | None:
        return self.debouncer.due_at()

    def take(self, now: float) -> Batch[PushScope] | None:
        return self.debouncer.take(now)

    def done(self) -> None:
        self.debouncer.done()
