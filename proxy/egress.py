"""Hosts outside the registry: ServiceEntry destinations and the outbound traffic
policy for unknown hosts (docs/architecture.md §5.5).

`MeshWideFollower` follows `mesh.config.meshwide` (fetched on the first request for a
host the registry does not know, then followed; resynced with the destinations).
`external_destination` (pure) turns one ServiceEntry host and the port asked for into
a `proxy.destinations.Destination` the route handler uses like a mesh service's:

- endpoints: with a `workloadSelector` (MESH_INTERNAL), the registered instances of
  the entry's namespace carrying its labels (the registry is followed from the first
  such entry on); else by `resolution`: STATIC, the ServiceEntry's endpoints; DNS and
  DNS_ROUND_ROBIN, those endpoints or, without any, the host itself, resolved when a
  connection is made; NONE, the host and port asked for (Envoy's original
  destination); the port is the endpoint's own number for the port's name, else the
  port's `targetPort`, else its number;
- endpoint `weight`s become repeated entries of the balancer's list (ratios kept, at
  most `MAX_WEIGHTED_ENTRIES`), weight 0 leaves the endpoint out;
- the route table's `portLevelSettings` for that port apply (`Destination.port`), and
  a DestinationRule `tls` other than ISTIO_MUTUAL is originated (`proxy.upstream_tls`);
  without one, ServiceEntry hosts are reached in plaintext (they have no mesh identity).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import reduce

from mesh import errors
from mesh.bus import Bus
from mesh.compiled_mesh import ExternalService, MeshWideConfig
from mesh.hosts import ServiceRef, canonical_host, host_matches
from mesh.logs import get_logger
from mesh.messages import (
    Endpoint,
    EndpointSet,
    EndpointsGetReply,
    EndpointsGetRequest,
    FetchRequest,
    SubscriptionStatus,
)
from proxy.destinations import Destination
from proxy.routing import InvalidRouteConfig, compile_routes

log = get_logger("proxy.egress")

MAX_WEIGHTED_ENTRIES = 1000
# ServiceEntry port protocols the HTTP route tables serve (others are tunnelled)
HTTP_PROTOCOLS = ("HTTP", "HTTP2", "GRPC")
_HTTP_DEFAULT_PORT = 80

__all__ = ["MeshWideFollower", "external_destination", "find_service", "selected_instances"]


class MeshWideFollower:
    """The mesh-wide table in force, and the destinations built from it."""

    def __init__(self, bus: Bus, on_change: Callable[[], None]):
        self.bus = bus
        self.on_change = on_change
        self.subject = bus.subjects.config_mesh_wide
        self.config: MeshWideConfig | None = None
        self.status: SubscriptionStatus | None = None
        self._subscribed = False
        self._destinations: dict[tuple[str, int], Destination] = {}
        # every service's instances, followed once a ServiceEntry has a workloadSelector
        self.instances: dict[tuple[str, str], EndpointSet] = {}
        self._following_registry = False

    async def current(self) -> MeshWideConfig:
        """The table in force, fetched (and followed) on first use."""
        if self.config is None:
            if not self._subscribed:
                await self.bus.subscribe(self.subject, MeshWideConfig, self._on_config)
                self._subscribed = True
            await self.refresh()
        if self.config is None:
            raise errors.Unavailable("mesh-wide configuration unavailable")
        if not self._following_registry and any(s.workload_selector for s in self.config.services):
            await self._follow_registry()
        return self.config

    async def _follow_registry(self) -> None:
        """Every service's instances (a workloadSelector may select any of them in its
        namespace): subscribed, then listed."""
        bus = self.bus
        self._following_registry = True
        await bus.subscribe(bus.subjects.endpoints_all, EndpointSet, self._on_endpoints)
        try:
            reply = await bus.request(
                bus.subjects.registry_get, EndpointsGetRequest(), EndpointsGetReply, timeout=2.0
            )
        except errors.MeshError as e:
            log.warning("meshwide.registry_unavailable", error=str(e))
            return
        for endpoint_set in reply.sets:
            self._apply_endpoints(endpoint_set)

    async def _on_endpoints(self, endpoint_set: EndpointSet, _subject: str) -> None:
        self._apply_endpoints(endpoint_set)

    def _apply_endpoints(self, endpoint_set: EndpointSet) -> None:
        key = (endpoint_set.namespace, endpoint_set.service)
        current = self.instances.get(key)
        if current is not None and current.revision >= endpoint_set.revision:
            return
        self.instances[key] = endpoint_set
        self._destinations = {}  # rebuilt with the new instances on next use

    async def refresh(self) -> None:
        try:
            config = await self.bus.request(
                self.bus.subjects.config_fetch,
                FetchRequest(kind="meshwide", namespace="", name=""),
                MeshWideConfig,
                timeout=2.0,
            )
        except errors.MeshError as e:
            log.warning("meshwide.fetch_failed", error=str(e))
            return
        self.apply(config)

    async def resync(self) -> None:
        if self._subscribed:
            await self.refresh()

    async def _on_config(self, config: MeshWideConfig, _subject: str) -> None:
        self.apply(config)

    def apply(self, config: MeshWideConfig) -> bool:
        current = self.config.revision if self.config else 0
        if config.revision <= current:
            return False
        try:
            for service in config.services:
                if service.table is not None:
                    compile_routes(service.table)
        except InvalidRouteConfig as e:
            self.status = SubscriptionStatus(
                subject=self.subject,
                revision=current,
                state="NACK",
                reason=str(e),
                rejected_revision=config.revision,
            )
            log.warning("config.rejected", subject=self.subject, revision=config.revision)
            self.on_change()
            return False
        self.config = config
        # rebuilt on next use; clusters (breakers, ejections) start afresh for the hosts
        self._destinations = {}
        self.status = SubscriptionStatus(subject=self.subject, revision=config.revision)
        log.info("config.applied", subject=self.subject, revision=config.revision)
        self.on_change()
        return True

    def destination(self, host: str, port: int, namespace: str) -> Destination | None:
        """The destination for `host:port` as asked by a workload of `namespace`, or
        None when no ServiceEntry visible there names the host (or that port)."""
        config = self.config
        if config is None:
            return None
        service = find_service(config, canonical_host(host, namespace), namespace)
        if service is None:
            return None
        key = (service.host if not service.host.startswith("*") else host, port)
        dest = self._destinations.get(key)
        if dest is None:
            dest = external_destination(
                service, key[0], port, config.revision, self.instances.values()
            )
            if dest is None:
                return None
            if len(self._destinations) >= 4096:
                self._destinations.clear()
            self._destinations[key] = dest
        return dest

    def tunnels(self, host: str, port: int, namespace: str) -> bool:
        """Does a ServiceEntry visible in `namespace` take CONNECT to `host:port` (a
        declared port whose protocol is not HTTP's: the app's TLS passes through)?"""
        if self.config is None:
            return False
        service = find_service(self.config, canonical_host(host, namespace), namespace)
        if service is None:
            return False
        return any(p.number == port and p.protocol not in HTTP_PROTOCOLS for p in service.ports)

    def statuses(self) -> list[SubscriptionStatus]:
        return [self.status] if self.status is not None else []


def find_service(config: MeshWideConfig, host: str, namespace: str) -> ExternalService | None:
    """The ServiceEntry host for canonical `host` exported to `namespace`: an exact
    host before the longest wildcard covering it."""
    best: ExternalService | None = None
    for service in config.services:
        if not ("*" in service.export_to or namespace in service.export_to):
            continue
        if service.host == host:
            return service
        if service.host.startswith("*") and host_matches(service.host, host):
            if best is None or len(service.host) > len(best.host):
                best = service
    return best


def external_destination(
    service: ExternalService,
    host: str,
    port: int,
    revision: int,
    instances: Iterable[EndpointSet] = (),
) -> Destination | None:
    """A loaded `Destination` for `host:port` of `service` (pure); None when the
    ServiceEntry declares ports and `port` is none of them. `instances`: the
    registry's endpoint sets, where a `workloadSelector` finds its endpoints."""
    port = port or _HTTP_DEFAULT_PORT
    entry_port = next((p for p in service.ports if p.number == port), None)
    if service.ports and entry_port is None:
        return None
    target = entry_port.target_port if entry_port and entry_port.target_port else port
    endpoints: list[Endpoint] = []
    if service.workload_selector:
        endpoints = selected_instances(service, instances)
    elif service.resolution == "NONE" or (
        service.resolution in ("DNS", "DNS_ROUND_ROBIN") and not service.endpoints
    ):
        endpoints.append(_endpoint(host, target))
    else:
        weighted = [e for e in service.endpoints if e.weight > 0]
        repeats = _repeats([e.weight for e in weighted])
        for entry, times in zip(weighted, repeats, strict=True):
            number = entry.ports.get(entry_port.name, target) if entry_port else target
            endpoint = _endpoint(entry.address, number, entry.labels, entry.identity)
            endpoints.extend([endpoint] * times)
    table = service.table
    if table is None:
        return None
    dest = Destination(
        ref=ServiceRef(service.namespace, service.host),
        table=table,
        routes=compile_routes(table),
        endpoints=EndpointSet(
            namespace=service.namespace,
            service=service.host,
            revision=revision,
            endpoints=endpoints,
        ),
        host=host,
        port=port,
    )
    dest.loaded.set()
    return dest


def selected_instances(
    service: ExternalService, instances: Iterable[EndpointSet]
) -> list[Endpoint]:
    """The registered instances of the entry's namespace its workloadSelector selects
    (their sidecars' addresses and identities: reached over mTLS, as a service's)."""
    selector = service.workload_selector
    return [
        endpoint
        for endpoint_set in instances
        if endpoint_set.namespace == service.namespace
        for endpoint in endpoint_set.endpoints
        if all(endpoint.labels.get(k) == v for k, v in selector.items())
    ]


def _endpoint(
    address: str, port: int, labels: dict[str, str] | None = None, identity: str = ""
) -> Endpoint:
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return Endpoint(instance=where, address=where, labels=dict(labels or {}), identity=identity)


def _repeats(weights: list[int]) -> list[int]:
    """Entries per endpoint keeping the weights' ratios, at most MAX_WEIGHTED_ENTRIES."""
    if not weights:
        return []
    divisor = reduce(math.gcd, weights)
    reduced = [w // divisor for w in weights]
    total = sum(reduced)
    if total <= MAX_WEIGHTED_ENTRIES:
        return reduced
    return [max(1, w * MAX_WEIGHTED_ENTRIES // total) for w in reduced]
