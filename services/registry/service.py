"""The registry service: instances under etcd leases, endpoint sets pushed on change.

Any replica answers register/deregister/heartbeat/get (NATS queue group); only the
elected replica watches etcd and publishes `mesh.registry.endpoints.<ns>.<svc>`, so
each change is published once.

Churn is coalesced (`mesh.debounce`): instance changes are merged into the set of
services they touch, published once no change has arrived for PUBLISH_QUIET_S, or
PUBLISH_MAX_DELAY_S after the oldest under a steady stream; one publish round runs at
a time, and what changes meanwhile goes in the next. Each service's endpoint set is
built when it is published, so a burst of hundreds of instances starting or stopping
becomes one publish per service holding all of them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import Counter, Histogram

from mesh import errors, messages, validate
from mesh.debounce import Debouncer, DebounceSettings
from mesh.hosts import ServiceRef
from mesh.messages import (
    DeregisterReply,
    DeregisterRequest,
    EndpointsGetReply,
    EndpointsGetRequest,
    HeartbeatReply,
    HeartbeatRequest,
    RegisterReply,
    RegisterRequest,
    VipReply,
    VipRequest,
)
from mesh.service import ControlPlaneService
from mesh.signing import control_plane_signer
from mesh.store import WatchCompacted
from mesh.subjects import REGISTRY_QUEUE
from services.registry import vips
from services.registry.index import EndpointIndex, instance_key, sets_from_listing

MAX_TTL = 300
# instance changes are published together, once per service, when none has arrived for
# the quiet period, and at most the maximum delay after the oldest. A steady stream of
# changes closer together than the quiet period (100/s: every 10 ms) is published
# every PUBLISH_MAX_DELAY_S, not once per change: each publish costs every proxy that
# follows the service a decode, a signature check and a recompile.
PUBLISH_QUIET_S = 0.025
PUBLISH_MAX_DELAY_S = 0.200
# The leader's liveness key (`registry-alive`): found gone by a new leader, the registry
# had no leader for this long. Instances' leases are renewed by any replica, leader or
# not, so a leader handover alone lapses none; the key only has to outlive the longest
# handover (the deposed leader's election lease running out, then a campaign), else
# every handover after a leader is cut off was taken for an outage of the whole
# registry (docs/architecture.md §2.2): twice the election TTL, and at least this.
ALIVE_TTL_MIN_S = 3


def alive_ttl_s(election_ttl: int) -> int:
    """TTL of `registry-alive`: longer than a leader handover (see ALIVE_TTL_MIN_S)."""
    return max(ALIVE_TTL_MIN_S, 2 * election_ttl)


# after such an outage: sidecars answer the resync within RESYNC_SPREAD_S (proxy side)
RESYNC_GRACE_S = 3.0


def validate_registration(req: RegisterRequest) -> None:
    inst = req.instance
    validate.dns_label(inst.namespace, "instance.namespace")
    validate.dns_label(inst.service, "instance.service")
    validate.instance_id(inst.instance, "instance.instance")
    validate.host_port(inst.address, "instance.address")
    validate.labels(inst.labels, "instance.labels")
    for i, p in enumerate(inst.tcp_ports):
        validate.port(p, f"instance.tcp_ports[{i}]")
    if not 1 <= req.ttl <= MAX_TTL:
        raise errors.BadRequest(
            f"ttl: must be between 1 and {MAX_TTL} seconds, got {req.ttl}", field="ttl"
        )


class RegistryService(ControlPlaneService):
    name = "registry"
    has_leader_work = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.clock = time.monotonic
        # services whose virtual IP this replica has seen allocated (they never change)
        self.vips_allocated: set[ServiceRef] = set()
        self.publish_debounce = DebounceSettings(PUBLISH_QUIET_S, PUBLISH_MAX_DELAY_S)
        self.instance_changes = Counter(
            "mesh_registry_instance_changes_total",
            "Instance changes the leader saw (watch events that changed an endpoint set)",
            registry=self.registry,
        )
        self.sets_published = Counter(
            "mesh_registry_endpoint_sets_published_total",
            "Endpoint sets published (one per service per publish round)",
            registry=self.registry,
        )
        self.publish_latency = Histogram(
            "mesh_registry_publish_latency_seconds",
            "From the oldest instance change a publish round holds to its end",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )

    async def setup(self) -> None:
        # endpoint sets (published, and answered to registry.get) are signed (mesh.signing)
        self.bus.sign_with(await control_plane_signer(self.store))
        s = self.bus.subjects
        await self.bus.serve(
            s.registry_register, RegisterRequest, self.register, queue=REGISTRY_QUEUE
        )
        await self.bus.serve(
            s.registry_heartbeat, HeartbeatRequest, self.heartbeat, queue=REGISTRY_QUEUE
        )
        await self.bus.serve(
            s.registry_deregister, DeregisterRequest, self.deregister, queue=REGISTRY_QUEUE
        )
        await self.bus.serve(s.registry_get, EndpointsGetRequest, self.get, queue=REGISTRY_QUEUE)
        await self.bus.serve(s.registry_vip, VipRequest, self.vip, queue=REGISTRY_QUEUE)

    def _key(self, ns: str, svc: str, inst: str) -> str:
        return instance_key(self.store.prefix, ns, svc, inst)

    # ------------------------------------------------------------ requests

    async def register(self, req: RegisterRequest) -> RegisterReply:
        try:
            validate_registration(req)
        except errors.BadRequest:
            self.requests.labels("register", "invalid").inc()
            raise
        inst = req.instance
        lease_id = req.lease_id
        ttl = req.ttl
        if lease_id:
            try:
                ttl = await self.store.keepalive(lease_id)
            except errors.NotFound:
                lease_id = 0
        if not lease_id:
            lease_id = await self.store.grant_lease(req.ttl)
        revision = await self.store.put(
            self._key(inst.namespace, inst.service, inst.instance),
            messages.encode(inst),
            lease=lease_id,
        )
        # the service's virtual IP, once, with its first instance (docs/architecture.md §4)
        ref = ServiceRef(inst.namespace, inst.service)
        if ref not in self.vips_allocated:
            await vips.allocate(self.store, ref)
            self.vips_allocated.add(ref)
        self.requests.labels("register", "ok").inc()
        self.log.info(
            "registry.registered",
            namespace=inst.namespace,
            service=inst.service,
            instance=inst.instance,
            status=inst.status,
            revision=revision,
        )
        return RegisterReply(lease_id=lease_id, ttl=ttl, revision=revision)

    async def heartbeat(self, req: HeartbeatRequest) -> HeartbeatReply:
        key = self._key(req.namespace, req.service, req.instance)
        try:
            ttl = await self.store.keepalive(req.lease_id)
        except errors.NotFound:
            self.requests.labels("heartbeat", "expired").inc()
            raise errors.NotFound(
                f"instance {req.instance} is not registered (lease expired); register again"
            ) from None
        kv = await self.store.get(key)
        if kv is None or kv.lease != req.lease_id:
            self.requests.labels("heartbeat", "unknown").inc()
            raise errors.NotFound(f"instance {req.instance} is not registered; register again")
        self.requests.labels("heartbeat", "ok").inc()
        return HeartbeatReply(ttl=ttl)

    async def deregister(self, req: DeregisterRequest) -> DeregisterReply:
        _, revision = await self.store.delete(self._key(req.namespace, req.service, req.instance))
        if req.lease_id:
            await self.store.revoke_lease(req.lease_id)
        self.requests.labels("deregister", "ok").inc()
        self.log.info(
            "registry.deregistered",
            namespace=req.namespace,
            service=req.service,
            instance=req.instance,
        )
        return DeregisterReply(revision=revision)

    async def vip(self, req: VipRequest) -> VipReply:
        """A service's virtual IP, or the service a virtual IP belongs to."""
        if req.address:
            ref = await vips.service_at(self.store, req.address)
            if ref is None:
                return VipReply(address=req.address)
            return VipReply(namespace=ref.namespace, service=ref.name, address=req.address)
        ref = ServiceRef(
            validate.dns_label(req.namespace, "namespace"),
            validate.dns_label(req.service, "service"),
        )
        address = await vips.vip_of(self.store, ref)
        return VipReply(namespace=ref.namespace, service=ref.name, address=address)

    async def get(self, req: EndpointsGetRequest) -> EndpointsGetReply:
        prefix = self.store.key("registry") + "/"
        if req.namespace:
            prefix += validate.dns_label(req.namespace, "namespace") + "/"
            if req.service:
                prefix += validate.dns_label(req.service, "service") + "/"
        kvs, revision = await self.store.get_prefix(prefix)
        sets = sets_from_listing(
            self.store.prefix, [(kv.key, kv.value, kv.mod_revision) for kv in kvs], revision
        )
        if req.service:
            sets = [s for s in sets if s.service == req.service]
            if not sets and req.namespace:
                sets = [
                    messages.EndpointSet(
                        namespace=req.namespace, service=req.service, revision=revision
                    )
                ]
        self.requests.labels("get", "ok").inc()
        return EndpointsGetReply(revision=revision, sets=sets)

    # ------------------------------------------------------------ leader: publish changes

    async def leader_work(self, token: int) -> None:
        async with asyncio.TaskGroup() as tg:
            if await self._mark_alive(tg):
                await self._resync_after_outage()
            while True:
                try:
                    await self._publish_changes()
                except WatchCompacted as e:
                    self.log.warning("registry.watch_compacted", revision=e.compacted_revision)

    async def _mark_alive(self, tg: asyncio.TaskGroup) -> bool:
        """Keep `registry-alive` (leased, `alive_ttl_s`) while leading. True when the
        registry has led before (`registry-seen`) but nobody kept that key alive: no
        leader for longer than a handover takes, so the registry was down (every
        replica) and instances' leases may have lapsed unrenewed."""
        ttl = alive_ttl_s(self.config.election_ttl)
        alive, seen = self.store.key("registry-alive"), self.store.key("registry-seen")
        outage = await self.store.get(seen) is not None and await self.store.get(alive) is None
        lease = await self.store.grant_lease(ttl)
        await self.store.put(alive, self.config.replica.encode(), lease=lease)
        await self.store.put(seen, b"1")

        async def keep() -> None:
            nonlocal lease
            while True:
                await asyncio.sleep(ttl / 3)
                try:
                    await self.store.keepalive(lease)
                except errors.NotFound:
                    lease = await self.store.grant_lease(ttl)
                    await self.store.put(alive, self.config.replica.encode(), lease=lease)

        tg.create_task(keep(), name="registry:alive")
        return outage

    async def _resync_after_outage(self) -> None:
        """Ask every sidecar to register again, and publish nothing until they have had
        the time to: a listing taken now may lack instances whose leases lapsed while
        no registry ran, and publishing it would take live endpoints from the proxies."""
        self.log.warning("registry.resync_after_outage", grace_s=RESYNC_GRACE_S)
        await self.bus.publish(self.bus.subjects.registry_resync, messages.RegistryResync())
        await asyncio.sleep(RESYNC_GRACE_S)

    async def _publish_changes(self) -> None:
        index = EndpointIndex(self.store.prefix)
        published: dict[tuple[str, str], int] = {}
        prefix = self.store.key("registry") + "/"
        kvs, revision = await self.store.get_prefix(prefix)
        for svc in index.load([(kv.key, kv.value) for kv in kvs], revision):
            await self._publish(index, svc, published)
        pending: Debouncer[frozenset[tuple[str, str]]] = Debouncer(
            self.publish_debounce, frozenset.union
        )
        wake = asyncio.Event()

        async def publisher() -> None:
            while True:
                batch = pending.take(self.clock())
                if batch is None:
                    # no await between take() and clear(): no change can slip by
                    wake.clear()
                    due = pending.due_at()
                    timeout = None if due is None else max(0.0, due - self.clock())
                    try:
                        await asyncio.wait_for(wake.wait(), timeout)
                    except TimeoutError:
                        pass
                    continue
                try:
                    for svc in sorted(batch.request):
                        await self._publish(index, svc, published)
                finally:
                    pending.done()
                self.publish_latency.observe(self.clock() - batch.first_at)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(publisher(), name="registry:publisher")
            async for ev in self.store.watch_prefix(prefix, revision + 1):
                changed = index.apply(ev.kind, ev.key, ev.value, ev.revision)
                if changed is None:
                    continue
                self.instance_changes.inc()
                pending.add(frozenset({changed}), self.clock())
                wake.set()

    async def _publish(
        self, index: EndpointIndex, svc: tuple[str, str], published: dict[tuple[str, str], int]
    ) -> None:
        ns, name = svc
        eps = index.endpoint_set(ns, name, prev_revision=published.get(svc, 0))
        if published.get(svc) == eps.revision:
            return
        await self.bus.publish(self.bus.subjects.endpoints(ns, name), eps)
        published[svc] = eps.revision
        self.sets_published.inc()
        self.log.debug(
            "registry.published",
            namespace=ns,
            service=name,
            revision=eps.revision,
            endpoints=len(eps.endpoints),
        )
