"""Per-destination config in the sidecar: route table + endpoints, fetched on first use
and followed on their subjects from then on (Linkerd's per-destination model).

A config is applied only when its revision is newer than the one in force; one that
cannot be compiled is rejected (NACK) and the last good one keeps serving. Every
apply or rejection is reported on `mesh.proxy.status`. After a reconnect, and
periodically, every followed destination is fetched again, so a lost publish cannot
leave the proxy stale for long.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from mesh import errors
from mesh.bus import Bus
from mesh.compiled import RouteTable, TrafficPolicy
from mesh.hosts import ServiceRef
from mesh.logs import get_logger
from mesh.messages import (
    Endpoint,
    EndpointSet,
    EndpointsGetReply,
    EndpointsGetRequest,
    FetchRequest,
    SubscriptionStatus,
)
from proxy.clusters import Cluster
from proxy.routing import (
    Balancer,
    CompiledRoutes,
    InvalidRouteConfig,
    build_balancer,
    compile_routes,
    resolve_subset,
    subset_endpoints,
)
from proxy.upstream_tls import origination_for

log = get_logger("proxy.destinations")

RESYNC_S = 30.0
FETCH_TIMEOUT_S = 2.0


def is_newer(current: int, incoming: int) -> bool:
    """Published states are full states: the newest wins; equal or older ones are dropped
    (duplicates, or a lagging replica's answer to a fetch)."""
    return incoming > current


@dataclass
class Destination:
    """Everything needed to send to one service, swapped as a whole on change.

    `balancers` are rebuilt after each change; `clusters` (per subset, "" = the whole
    service) are kept, so circuit-breaker counts and ejections survive config and
    endpoint updates."""

    ref: ServiceRef
    table: RouteTable | None = None
    routes: CompiledRoutes | None = None
    endpoints: EndpointSet | None = None
    balancers: dict[str, Balancer] = field(default_factory=dict)
    clusters: dict[str, Cluster] = field(default_factory=dict)
    route_status: SubscriptionStatus | None = None
    endpoints_status: SubscriptionStatus | None = None
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    error: str = ""
    # a ServiceEntry host (`proxy.egress`): the host (SNI, telemetry) and the port
    # asked for (its `portLevelSettings` apply); "" / 0 for a mesh service
    host: str = ""
    port: int = 0

    def balancer(self, subset_name: str, rand: random.Random) -> Balancer | None:
        """The balancer of a subset ("" = whole service); None when the subset is unknown."""
        cluster = self.cluster(subset_name, rand)
        return cluster.balancer if cluster is not None else None

    def cluster(self, subset_name: str, rand: random.Random, port: int = 0) -> Cluster | None:
        """The cluster of a subset ("" = whole service), its balancer up to date with
        the endpoints and policy in force; None when the subset is unknown.

        `port`: the port the caller asked for; when the DestinationRule has
        `portLevelSettings` for it, that port gets a cluster of its own (`<subset>|<port>`,
        as Envoy has one per port) under the port's policy."""
        port = port or self.port
        key = subset_name
        if port and self.table is not None and _has_port_policy(self.table, subset_name, port):
            key = f"{subset_name}|{port}"
        if key in self.balancers:
            return self.clusters[key]
        if self.table is None:
            return None
        subset = resolve_subset(self.table, subset_name)
        if subset is None:
            return None
        eps = subset_endpoints(self.endpoints.endpoints if self.endpoints else [], subset.labels)
        policy = subset.traffic_policy.for_port(port) if port else subset.traffic_policy
        cluster = self._kept_cluster(key, subset_name, policy, eps, rand)
        cluster.origination = origination_for(policy.tls, self.host or self.ref.fqdn)
        return cluster

    def tcp_cluster(self, subset_name: str, rand: random.Random, port: int) -> Cluster | None:
        """The cluster a TCP relay to `port` of a subset ("" = whole service) sends to,
        up to date; None when the subset is unknown (Envoy's `outbound|<port>|<subset>|
        <fqdn>` TCP cluster, architecture §5.1 "The upstream path").

        Its endpoints are the subset's instances with a TCP listener for `port`
        (`tcp_endpoints`), its policy the subset's for that port (`portLevelSettings`
        included); it is kept under `<subset>|tcp:<port>` next to the HTTP clusters,
        so breaker counts and ejections outlive endpoint and config changes the same way."""
        key = f"{subset_name}|tcp:{port}"
        if key in self.balancers:
            return self.clusters[key]
        if self.table is None:
            if subset_name:
                return None
            # no route table (yet): the whole service under the default policy
            labels: dict[str, str] = {}
            policy = TrafficPolicy()
        else:
            subset = resolve_subset(self.table, subset_name)
            if subset is None:
                return None
            labels = dict(subset.labels)
            policy = subset.traffic_policy.for_port(port)
        eps = tcp_endpoints(self.endpoints.endpoints if self.endpoints else [], port, labels)
        return self._kept_cluster(key, subset_name, policy, eps, rand, name_suffix=f"|tcp:{port}")

    def _kept_cluster(
        self,
        key: str,
        subset_name: str,
        policy: TrafficPolicy,
        eps: list[Endpoint],
        rand: random.Random,
        name_suffix: str = "",
    ) -> Cluster:
        """The cluster kept under `key`, created or given this policy and a balancer
        over `eps` (built from the previous one, so its state carries over)."""
        cluster = self.clusters.get(key)
        previous = cluster.balancer if cluster is not None else None
        balancer = build_balancer(eps, policy.load_balancer, rand, previous)
        if cluster is None:
            cluster = self.clusters[key] = Cluster(self.ref, subset_name, policy, balancer)
            cluster.name += name_suffix
        else:
            cluster.update(policy, balancer)
        self.balancers[key] = balancer
        return cluster


def tcp_endpoints(
    endpoints: Iterable[Endpoint], port: int, labels: Mapping[str, str] | None = None
) -> list[Endpoint]:
    """The endpoints with a TCP listener for `port` (and every one of the subset's
    `labels`); draining ones are left out unless all of those are draining (as for
    HTTP subsets)."""
    key = str(port)
    return subset_endpoints([ep for ep in endpoints if key in ep.tcp_listeners], labels or {})


def _has_port_policy(table: RouteTable, subset_name: str, port: int) -> bool:
    subset = resolve_subset(table, subset_name)
    return subset is not None and any(p.port == port for p in subset.traffic_policy.port_level)


class DestinationCache:
    def __init__(self, bus: Bus, on_change: Callable[[], None], rand: random.Random | None = None):
        self.bus = bus
        self.on_change = on_change
        self.rand = rand or random.Random()
        self.destinations: dict[ServiceRef, Destination] = {}
        self._loading: dict[ServiceRef, asyncio.Task[Destination]] = {}
        self._subscribed: set[ServiceRef] = set()
        # ServiceEntry hosts and the outbound traffic policy (`proxy.egress`, which
        # builds `Destination`s: imported here to keep the import graph acyclic)
        from proxy.egress import MeshWideFollower

        self.mesh_wide = MeshWideFollower(bus, on_change)

    # ------------------------------------------------------------ lookup

    async def get(self, ref: ServiceRef) -> Destination:
        """The destination's state, fetching and subscribing on first use."""
        dest = self.destinations.get(ref)
        if dest is not None and dest.loaded.is_set():
            return dest
        task = self._loading.get(ref)
        if task is None:
            task = asyncio.create_task(self._load(ref), name=f"proxy:load:{ref}")
            self._loading[ref] = task
        return await asyncio.shield(task)

    async def _load(self, ref: ServiceRef) -> Destination:
        try:
            dest = self.destinations.get(ref) or Destination(ref)
            self.destinations[ref] = dest
            s = self.bus.subjects
            if ref not in self._subscribed:
                # subscribe before fetching, so nothing published in between is missed
                await self.bus.subscribe(
                    s.route(ref.namespace, ref.name), RouteTable, self._on_route
                )
                await self.bus.subscribe(
                    s.endpoints(ref.namespace, ref.name), EndpointSet, self._on_endpoints
                )
                self._subscribed.add(ref)
            await self.refresh(dest)
            if dest.table is None or dest.endpoints is None:
                # nothing known yet: do not cache the failure, so the next request retries
                self.destinations.pop(ref, None)
                raise errors.Unavailable(dest.error or f"no config for {ref}")
            dest.loaded.set()
            return dest
        finally:
            self._loading.pop(ref, None)

    async def refresh(self, dest: Destination) -> None:
        """Fetch the current route table and endpoints, applying whichever is newer."""
        s = self.bus.subjects
        ref = dest.ref
        route, eps = await asyncio.gather(
            self.bus.request(
                s.config_fetch,
                FetchRequest(namespace=ref.namespace, name=ref.name),
                RouteTable,
                timeout=FETCH_TIMEOUT_S,
            ),
            self.bus.request(
                s.registry_get,
                EndpointsGetRequest(ref.namespace, ref.name),
                EndpointsGetReply,
                timeout=FETCH_TIMEOUT_S,
            ),
            return_exceptions=True,
        )
        if isinstance(route, RouteTable):
            self.apply_route(route)
        elif isinstance(route, BaseException):
            dest.error = f"config for {ref} unavailable: {route}"
        if isinstance(eps, EndpointsGetReply):
            found = next(
                (e for e in eps.sets if e.namespace == ref.namespace and e.service == ref.name),
                None,
            )
            self.apply_endpoints(
                found
                or EndpointSet(namespace=ref.namespace, service=ref.name, revision=eps.revision)
            )
        elif isinstance(eps, BaseException):
            dest.error = f"endpoints of {ref} unavailable: {eps}"

    async def resync(self) -> None:
        """Fetch every followed destination again (after a reconnect, or periodically)."""
        try:
            await self.mesh_wide.resync()
        except Exception as e:
            log.debug("destinations.resync_failed", destination="meshwide", error=str(e))
        for dest in list(self.destinations.values()):
            try:
                await self.refresh(dest)
            except Exception as e:
                log.debug("destinations.resync_failed", destination=str(dest.ref), error=str(e))

    async def resync_forever(self, resync: Callable[[], Awaitable[None]] | None = None) -> None:
        """`resync` (default: this cache's own) every RESYNC_S, jittered. The sidecar
        passes its own, which fetches every follower again, not only after a reconnect:
        a publish lost with a NATS route that a partition cut, while the sidecar's own
        connection survived, is caught up (docs/architecture.md §2.2)."""
        while True:
            await asyncio.sleep(RESYNC_S * self.rand.uniform(0.8, 1.2))
            await (resync or self.resync)()

    # ------------------------------------------------------------ updates

    async def _on_route(self, table: RouteTable, _subject: str) -> None:
        self.apply_route(table)

    async def _on_endpoints(self, eps: EndpointSet, _subject: str) -> None:
        self.apply_endpoints(eps)

    def apply_route(self, table: RouteTable) -> bool:
        dest = self.destinations.get(ServiceRef(table.namespace, table.service))
        if dest is None:
            return False
        current = dest.table.revision if dest.table else 0
        if not is_newer(current, table.revision):
            return False
        subject = self.bus.subjects.route(table.namespace, table.service)
        try:
            routes = compile_routes(table)
        except InvalidRouteConfig as e:
            dest.route_status = SubscriptionStatus(
                subject=subject,
                revision=current,
                state="NACK",
                reason=str(e),
                rejected_revision=table.revision,
            )
            log.warning("config.rejected", subject=subject, revision=table.revision, reason=str(e))
            self.on_change()
            return False
        # one assignment each: requests in flight keep the objects they started with
        dest.table, dest.routes = table, routes
        dest.balancers = {}
        known = {"", *(s.name for s in table.subsets)}
        # `<subset>|<port>` clusters (portLevelSettings) go with their subset
        dest.clusters = {k: c for k, c in dest.clusters.items() if k.partition("|")[0] in known}
        dest.route_status = SubscriptionStatus(subject=subject, revision=table.revision)
        log.info("config.applied", subject=subject, revision=table.revision)
        self.on_change()
        return True

    def apply_endpoints(self, eps: EndpointSet) -> bool:
        dest = self.destinations.get(ServiceRef(eps.namespace, eps.service))
        if dest is None:
            return False
        current = dest.endpoints.revision if dest.endpoints else 0
        if not is_newer(current, eps.revision) and dest.endpoints is not None:
            return False
        dest.endpoints = eps
        dest.balancers = {}
        subject = self.bus.subjects.endpoints(eps.namespace, eps.service)
        dest.endpoints_status = SubscriptionStatus(subject=subject, revision=eps.revision)
        self.on_change()
        return True

    # ------------------------------------------------------------ reporting

    def subscription_statuses(self) -> list[SubscriptionStatus]:
        out = self.mesh_wide.statuses()
        for dest in self.destinations.values():
            if dest.route_status is not None:
                out.append(dest.route_status)
        return out

    def dump(self) -> dict[str, Any]:
        """For /config_dump: tables, endpoints and revisions in force."""
        out: dict[str, Any] = {}
        for ref, dest in sorted(self.destinations.items()):
            out[str(ref)] = {
                "route_table": msgspec.to_builtins(dest.table) if dest.table else None,
                "endpoints": msgspec.to_builtins(dest.endpoints) if dest.endpoints else None,
                "route_status": msgspec.to_builtins(dest.route_status)
                if dest.route_status
                else None,
            }
        return out
