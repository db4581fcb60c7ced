"""The config service: validates and stores resources, compiles and pushes proxy config.

Every replica answers apply/delete/get/fetch (queue group) and keeps a snapshot of the
resources (list + watch). The elected replica publishes: each change becomes a push
scope (`services.config.push`: the route tables, gateway configs and inbound policies
it can affect); scopes are
merged and debounced (quiet period, maximum delay, one push in flight), and a push
recompiles only what its scope names, plus every wanted subject never published yet,
and publishes those whose compiled content changed. It alone answers proxy-status,
because it knows what it published.

Inbound policy (`mesh.config.inbound.<ns>.<svc>`) is published for every service
whose proxies report status, every service a resource names, and every service it
was published for before (so a deleted policy is published as gone).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import msgspec
from prometheus_client import Counter, Gauge, Histogram

from mesh import errors
from mesh.compiled import GatewayConfig, InboundPolicy, RouteTable
from mesh.compiled_mesh import MeshWideConfig
from mesh.hosts import ServiceRef
from mesh.messages import (
    AppliedResource,
    ApplyReply,
    ApplyRequest,
    DeleteReply,
    DeleteRequest,
    EndpointsGetReply,
    EndpointsGetRequest,
    FetchRequest,
    GetResourcesReply,
    GetResourcesRequest,
    ProxyStatus,
    ProxyStatusReply,
    ProxyStatusRequest,
    ResourceRef,
    StoredResource,
)
from mesh.resources import (
    Resource,
    ResourceError,
    ResourceKey,
    parse_documents,
    resolve_kind,
    to_dict,
)
from mesh.service import ControlPlaneService
from mesh.signing import control_plane_signer
from mesh.store import Delete, Put, WatchCompacted
from mesh.subjects import CONFIG_QUEUE, parse_service_subject
from services.config.compile import compile_gateway_config, compile_route_table, services_named
from services.config.compile_egress import compile_mesh_wide, service_entry_refs
from services.config.compile_security import compile_inbound_policy
from services.config.push import PushScheduler, PushScope
from services.config.route_status import route_status
from services.config.settings import ConfigSettings
from services.config.snapshot import (
    ResourceSnapshot,
    change_marker_key,
    parse_resource_key,
    resource_key,
)
from services.config.status import ProxyStatusTable, missed_subjects

R = TypeVar("R")

# A write (apply/delete) must finish, or fail, before `meshctl` stops waiting for the
# reply (10 s): a write still running after its caller was told it failed could land
# later (a replica cut off from etcd's quorum retrying until the partition heals),
# a "refused" change then appearing from nowhere. Found by tests/hosts/ (fault 3).
WRITE_DEADLINE_S = 8.0
# what is kept back from the caller's deadline: the reply's way back
REPLY_MARGIN_S = 1.0


def write_budget_s(deadline_unix: float, now_unix: float) -> float:
    """Seconds a write may take: WRITE_DEADLINE_S, and at most until REPLY_MARGIN_S
    before the caller's deadline (none: 0). Zero or less: too late to start."""
    if not deadline_unix:
        return WRITE_DEADLINE_S
    return min(WRITE_DEADLINE_S, deadline_unix - REPLY_MARGIN_S - now_unix)


MAX_DOCUMENTS = 500
# kinds `get` shows with a computed `status` (services/config/route_status.py)
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")
# room left in a reply for its headers (signature) and framing
REPLY_HEADROOM = 4096


CompiledConfig = RouteTable | GatewayConfig | InboundPolicy | MeshWideConfig


def _content(table: msgspec.Struct) -> bytes:
    """Compiled content without its revisions, to tell real changes from re-publishes."""
    return msgspec.msgpack.encode(msgspec.structs.replace(table, revision=0, prev_revision=0))  # type: ignore[type-var]


class ConfigService(ControlPlaneService):
    name = "config"
    has_leader_work = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.settings = ConfigSettings.from_options(self.config.options)
        self.snapshot: ResourceSnapshot
        self.changed = asyncio.Event()
        self.clock = time.monotonic
        self.pushes = PushScheduler(self.settings.push_debounce, self.settings.root_namespace)
        self.leading = False
        self.status = ProxyStatusTable()
        # leader state: subject -> (revision, content) of the last publish, that publish
        # (to send it again to proxies that missed it) and when it and a re-publish went
        self.published: dict[str, tuple[int, bytes]] = {}
        self.published_revisions: dict[str, int] = {}
        self.published_tables: dict[str, CompiledConfig] = {}
        self.published_at: dict[str, float] = {}
        self.republished_at: dict[str, float] = {}
        self.push_latency = Histogram(
            "mesh_config_push_latency_seconds",
            "From the oldest change a push holds to the end of its publishing",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.push_queue_depth = Gauge(
            "mesh_config_push_queue_depth",
            "Changes merged into the next push, not yet taken",
            registry=self.registry,
        )
        self.tables_compiled = Counter(
            "mesh_config_tables_compiled_total",
            "Compiled configs computed by the leader's pushes, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.tables_compiled_last = Gauge(
            "mesh_config_tables_compiled_last_push",
            "Compiled configs computed by the last push (all kinds)",
            registry=self.registry,
        )
        self.subjects_published = Counter(
            "mesh_config_subjects_published_total",
            "Compiled configs published (content changed or first publish)",
            registry=self.registry,
        )
        self.subjects_republished = Counter(
            "mesh_config_subjects_republished_total",
            "Compiled configs published again because a proxy's status showed it missed them",
            registry=self.registry,
        )

    # ------------------------------------------------------------ set-up

    async def setup(self) -> None:
        # compiled config (published, and answered to fetch) is signed (mesh.signing)
        self.bus.sign_with(await control_plane_signer(self.store))
        self.snapshot = ResourceSnapshot(self.store.prefix)
        await self._load_snapshot()
        s = self.bus.subjects
        await self.bus.serve(s.config_apply, ApplyRequest, self.apply, queue=CONFIG_QUEUE)
        await self.bus.serve(s.config_delete, DeleteRequest, self.delete, queue=CONFIG_QUEUE)
        await self.bus.serve(s.config_get, GetResourcesRequest, self.get, queue=CONFIG_QUEUE)
        await self.bus.serve(
            s.config_fetch, FetchRequest, self.fetch, queue=CONFIG_QUEUE, concurrency=64
        )
        await self.bus.subscribe(
            s.proxy_status, ProxyStatus, self._on_proxy_status, max_pending=65536
        )
        # a replica that starts knows no proxy yet: ask them all (they answer spread out)
        await self.bus.publish(s.proxy_status_request, ProxyStatusRequest())

    def background(self) -> list[tuple[str, Any]]:
        return [("follow-resources", self._follow), ("expire-status", self._expire_status)]

    def health_details(self) -> dict[str, object]:
        return {
            "revision": self.snapshot.revision if hasattr(self, "snapshot") else 0,
            "resources": len(self.snapshot.entries) if hasattr(self, "snapshot") else 0,
            "root_namespace": self.settings.root_namespace,
        }

    async def _load_snapshot(self) -> None:
        kvs, revision = await self.store.get_prefix(self.store.key("resources") + "/")
        self.snapshot.load(
            [(kv.key, kv.value, kv.create_revision, kv.mod_revision) for kv in kvs], revision
        )

    async def _follow(self) -> None:
        prefix = self.store.key("resources") + "/"
        while True:
            try:
                async for ev in self.store.watch_prefix(prefix, self.snapshot.watch_revision + 1):
                    ref = parse_resource_key(self.store.prefix, ev.key)
                    before = self.snapshot.entries.get(ref) if ref else None
                    if ev.kind == "put":
                        touched = self.snapshot.put(
                            ev.key, ev.value, ev.create_revision, ev.revision
                        )
                    else:
                        touched = self.snapshot.delete(ev.key, ev.revision)
                    if touched:
                        after = self.snapshot.entries.get(ref) if ref else None
                        self.pushes.resources_changed(
                            before.resource if before else None,
                            after.resource if after else None,
                            self.clock(),
                        )
                        self._wake()
            except WatchCompacted:
                await self._load_snapshot()
                self.pushes.everything(self.clock())
                self._wake()

    def _wake(self) -> None:
        if not self.leading:
            # only the leader pushes; it starts with a full push when it takes over
            self.pushes = PushScheduler(self.settings.push_debounce, self.settings.root_namespace)
            return
        self.push_queue_depth.set(self.pushes.queue_depth)
        self.changed.set()

    async def _expire_status(self) -> None:
        while True:
            await asyncio.sleep(5)
            self.status.expire(time.monotonic())

    async def _on_proxy_status(self, report: ProxyStatus, _subject: str) -> None:
        if not report.subscriptions and report.sent_at < 0:
            self.status.forget(report.proxy)  # a proxy saying goodbye
            return
        known = self.status.is_known(report)
        self.status.record(report, time.monotonic())
        if not known or report.kind == "gateway":
            # a destination nobody followed before, or a service whose inbound policy
            # was never published: make sure the leader tracks it
            self.pushes.subjects_appeared(self.clock(), gateways=report.kind == "gateway")
            self._wake()
        if self.leading:
            await self._republish_missed(report)

    async def _republish_missed(self, report: ProxyStatus) -> None:
        """Publish again what `report` shows its proxy missed (`missed_subjects`):
        proxies that have it ignore a revision they already hold."""
        now = self.clock()
        for subject in missed_subjects(
            report, self.published_revisions, self.published_at, now, self.republished_at
        ):
            table = self.published_tables.get(subject)
            if table is None:
                continue
            self.republished_at[subject] = now
            await self.bus.publish(subject, table)
            self.subjects_republished.inc()
            self.log.info(
                "config.republished", subject=subject, revision=table.revision, proxy=report.proxy
            )

    # ------------------------------------------------------------ requests

    async def apply(self, req: ApplyRequest) -> ApplyReply:
        return await self._write_within_deadline(
            "apply", req.deadline_unix, lambda sent: self._apply(req, sent)
        )

    async def delete(self, req: DeleteRequest) -> DeleteReply:
        return await self._write_within_deadline(
            "delete", req.deadline_unix, lambda sent: self._delete(req, sent)
        )

    async def _write_within_deadline(
        self, what: str, deadline_unix: float, write: Callable[[list[bool]], Awaitable[R]]
    ) -> R:
        """Run `write` within WRITE_DEADLINE_S and before the caller's own deadline
        (`deadline_unix`, 0: none), or cancel it and say whether the change may have
        reached etcd (`sent[0]`: the transaction was on its way). A request arriving
        after its deadline is refused unread: its caller was told it failed."""
        budget = write_budget_s(deadline_unix, time.time())
        if budget <= 0:
            self.requests.labels(what, "late").inc()
            self.log.warning("config.write_arrived_late", operation=what, late_s=-budget)
            raise errors.Unavailable(
                f"{what}: the request arrived {-budget:.1f}s after its caller stopped "
                "waiting; nothing was applied"
            )
        sent = [False]
        try:
            async with asyncio.timeout(budget):
                return await write(sent)
        except TimeoutError:
            self.requests.labels(what, "unavailable").inc()
            outcome = (
                "the transaction was sent but not confirmed: check with `meshctl get`"
                if sent[0]
                else "nothing was applied"
            )
            self.log.warning("config.write_timed_out", operation=what, sent=sent[0])
            raise errors.Unavailable(
                f"{what}: etcd did not answer within {budget:.1f}s (no quorum "
                f"reachable from this replica?); {outcome}"
            ) from None

    async def _apply(self, req: ApplyRequest, sent: list[bool]) -> ApplyReply:
        if not req.documents:
            raise errors.BadRequest("no documents to apply")
        if len(req.documents) > MAX_DOCUMENTS:
            raise errors.BadRequest(
                f"too many documents in one apply: {len(req.documents)} > {MAX_DOCUMENTS}"
            )
        batch = parse_documents(req.documents)
        if batch.errors:
            self.requests.labels("apply", "invalid").inc()
            details = [str(e) for e in batch.errors]
            raise errors.BadRequest(
                f"{len(batch.errors)} error(s); nothing was applied",
                field=batch.errors[0].path,
                details=details,
            )
        refs = [r.ref for r in batch.resources]
        seen: set[tuple[str, str, str]] = set()
        for doc, ref in zip(req.documents, refs, strict=True):
            if ref in seen:
                raise errors.BadRequest(
                    f"{doc.source}: document {doc.index}: "
                    f"{ref.kind} {ref.namespace}/{ref.name} appears twice"
                    " in one apply; nothing was applied"
                )
            seen.add(ref)
        results: list[AppliedResource] = []
        ops: list[Put | Delete] = []
        for resource in batch.resources:
            kind, ns, name = resource.ref
            key = resource_key(self.store.prefix, kind, ns, name)
            value = json.dumps(to_dict(resource), sort_keys=True).encode()
            current = await self.store.get(key)
            action: Literal["created", "configured", "unchanged"]
            if current is not None and current.value == value:
                action = "unchanged"
            else:
                action = "configured" if current is not None else "created"
                ops.append(Put(key, value))
            results.append(
                AppliedResource(ref=ResourceRef(kind=kind, namespace=ns, name=name), action=action)
            )
        revision = self.snapshot.revision
        if ops and not req.dry_run:
            # all-or-nothing: one transaction for the whole batch
            ops.append(Put(change_marker_key(self.store.prefix), b"{}"))
            sent[0] = True
            revision = (await self.store.txn([], ops)).revision
            await self._caught_up(revision)
        self.requests.labels("apply", "ok").inc()
        self.log.info(
            "config.applied",
            resources=len(results),
            changed=len(ops),
            revision=revision,
            dry_run=req.dry_run,
        )
        return ApplyReply(revision=revision, results=results)

    async def _delete(self, req: DeleteRequest, sent: list[bool]) -> DeleteReply:
        deleted: list[ResourceRef] = []
        missing: list[ResourceRef] = []
        ops: list[Put | Delete] = []
        for ref in req.refs:
            kind = self._kind(ref.kind)
            canonical = ResourceRef(kind=kind, namespace=ref.namespace or "default", name=ref.name)
            key = resource_key(self.store.prefix, kind, canonical.namespace, canonical.name)
            if await self.store.get(key) is None:
                missing.append(canonical)
            else:
                deleted.append(canonical)
                ops.append(Delete(key))
        revision = self.snapshot.revision
        if ops:
            ops.append(Put(change_marker_key(self.store.prefix), b"{}"))
            sent[0] = True
            revision = (await self.store.txn([], ops)).revision
            await self._caught_up(revision)
        self.log.info(
            "config.deleted", deleted=len(deleted), not_found=len(missing), revision=revision
        )
        return DeleteReply(revision=revision, deleted=deleted, not_found=missing)

    async def _caught_up(self, revision: int, timeout: float = 1.0) -> None:
        """Read-your-writes: return once this replica's snapshot reflects `revision`, so a
        fetch answered here right after the reply sees the change (bounded wait)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.snapshot.revision < revision and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.001)

    def _kind(self, name: str) -> str:
        try:
            return resolve_kind(name)
        except ResourceError as e:
            raise errors.BadRequest(str(e.message), field="kind") from None

    async def get(self, req: GetResourcesRequest) -> GetResourcesReply:
        prefix = self.store.key("resources") + "/"
        if req.kind:
            prefix += self._kind(req.kind) + "/"
            if req.namespace:
                prefix += req.namespace + "/"
        kvs, revision = await self.store.get_prefix(prefix)
        out: list[StoredResource] = []
        for kv in kvs:
            ref = parse_resource_key(self.store.prefix, kv.key)
            if ref is None:
                continue
            kind, ns, name = ref
            if (req.namespace and ns != req.namespace) or (req.name and name != req.name):
                continue
            out.append(
                StoredResource(
                    ref=ResourceRef(kind=kind, namespace=ns, name=name),
                    revision=kv.mod_revision,
                    body=json.loads(kv.value),
                )
            )
        if req.name and not out:
            kind = self._kind(req.kind) if req.kind else "resource"
            raise errors.NotFound(f"{kind} {req.namespace or 'default'}/{req.name} not found")
        await self._add_route_status(out)
        return GetResourcesReply(revision=revision, resources=out)

    async def _add_route_status(self, found: list[StoredResource]) -> None:
        """Gateway API routes are shown with their `status`, computed now from the
        resources in force and the services the registry knows."""
        routes = [r for r in found if r.ref.kind in ROUTE_KINDS]
        if not routes:
            return
        registered: set[ServiceRef] = set()
        try:
            reply = await self.bus.request(
                self.bus.subjects.registry_get, EndpointsGetRequest(), EndpointsGetReply
            )
            registered = {ServiceRef(s.namespace, s.service) for s in reply.sets if s.endpoints}
        except errors.MeshError as e:
            # still answered: Services defined by resources are known without it
            self.log.warning("config.status_registry_unavailable", error=str(e))
        resources = self.snapshot.resources()
        by_ref = {r.ref: r for r in resources}
        for stored in routes:
            ref = stored.ref
            current = by_ref.get(ResourceKey(ref.kind, ref.namespace, ref.name))
            if current is not None:
                stored.body["status"] = route_status(current, resources, registered)

    async def fetch(self, req: FetchRequest) -> CompiledConfig:
        resources = self.snapshot.resources()
        if req.kind == "gateway":
            return compile_gateway_config(
                resources, req.namespace, req.labels, self.snapshot.revision
            )
        if req.kind == "meshwide":
            return compile_mesh_wide(
                resources, self.settings.root_namespace, self.snapshot.revision
            )
        ref = ServiceRef(req.namespace, req.name)
        if req.kind == "inbound":
            return self._inbound_policy(resources, ref, self.snapshot.revision)
        return self._route_table(resources, ref, self.snapshot.revision, services_named(resources))

    @staticmethod
    def _route_table(
        resources: list[Any], ref: ServiceRef, revision: int, named: set[ServiceRef]
    ) -> RouteTable:
        table = compile_route_table(resources, ref, revision)
        return msgspec.structs.replace(table, exists=ref in named) if ref in named else table

    def _inbound_policy(
        self,
        resources: list[Resource],
        ref: ServiceRef,
        revision: int,
        create_revisions: dict[tuple[str, str, str], int] | None = None,
    ) -> InboundPolicy:
        return compile_inbound_policy(
            resources,
            ref,
            revision,
            self.settings.root_namespace,
            create_revisions=(
                self.snapshot.create_revisions() if create_revisions is None else create_revisions
            ),
        )

    # ------------------------------------------------------------ leader

    async def leader_work(self, token: int) -> None:
        self.published.clear()
        self.published_revisions.clear()
        self.published_tables.clear()
        self.published_at.clear()
        self.republished_at.clear()
        sub = await self.bus.serve(
            self.bus.subjects.config_proxy_status, ProxyStatusRequest, self.proxy_status
        )
        try:
            # catch up with anything that happened before we led, then follow changes
            await self._load_snapshot()
            self.leading = True
            self.pushes = PushScheduler(self.settings.push_debounce, self.settings.root_namespace)
            self.pushes.everything(self.clock())
            while True:
                batch = self.pushes.take(self.clock())
                if batch is None:
                    # nothing due: sleep until the debouncer's deadline or a new change
                    # (no await between take() and clear(): no change can slip by)
                    self.changed.clear()
                    due = self.pushes.due_at()
                    timeout = None if due is None else max(0.0, due - self.clock())
                    try:
                        await asyncio.wait_for(self.changed.wait(), timeout)
                    except TimeoutError:
                        pass
                    continue
                self.push_queue_depth.set(self.pushes.queue_depth)
                try:
                    await self._push(batch.request)
                finally:
                    self.pushes.done()
                self.push_latency.observe(self.clock() - batch.first_at)
        finally:
            self.leading = False
            await self.bus.unsubscribe(sub)

    def _destinations(self, named: set[ServiceRef]) -> set[ServiceRef]:
        wanted = set(named)
        route_base = f"{self.bus.subjects.prefix}.config.route"
        for subject in [*self.status.followed_subjects(), *self.published]:
            parsed = parse_service_subject(subject, route_base)
            if parsed:
                wanted.add(ServiceRef(*parsed))
        return wanted

    def _inbound_services(self, named: set[ServiceRef]) -> set[ServiceRef]:
        wanted = set(named)
        wanted.update(ServiceRef(ns, svc) for ns, svc in self.status.services())
        inbound_base = f"{self.bus.subjects.prefix}.config.inbound"
        for subject in [*self.status.followed_subjects(), *self.published]:
            parsed = parse_service_subject(subject, inbound_base)
            if parsed:
                wanted.add(ServiceRef(*parsed))
        return wanted

    async def _push(self, scope: PushScope) -> None:
        """Recompile what `scope` names among the subjects the leader serves, plus every
        served subject never published yet; publish what changed."""
        resources = self.snapshot.resources()
        revision = self.snapshot.revision
        subjects = self.bus.subjects
        started = time.perf_counter()
        pushed = 0
        compiled = {"route": 0, "gateway": 0, "inbound": 0}
        named = services_named(resources)
        destinations = self._destinations(named)
        due = scope.routes_among(destinations) & destinations
        due.update(d for d in destinations if subjects.route(*d) not in self.published)
        for ref in sorted(due):
            table = self._route_table(resources, ref, revision, named)
            compiled["route"] += 1
            pushed += await self._publish_if_changed(subjects.route(ref.namespace, ref.name), table)
        for gw in self.status.gateways():
            subject = subjects.gateway(gw.namespace, gw.service)
            if not (scope.full or scope.gateways or subject not in self.published):
                continue
            config = compile_gateway_config(resources, gw.namespace, gw.labels, revision)
            compiled["gateway"] += 1
            pushed += await self._publish_if_changed(subject, config)
        created = self.snapshot.create_revisions()
        services = self._inbound_services(named)
        affected = scope.inbound_among(services)
        for ref in sorted(services):
            try:
                subject = subjects.inbound(ref.namespace, ref.name)
            except ValueError:
                continue  # a status report naming no valid subject token (empty, dotted)
            if ref not in affected and subject in self.published:
                continue
            policy = self._inbound_policy(resources, ref, revision, created)
            compiled["inbound"] += 1
            pushed += await self._publish_if_changed(subject, policy)
        # one mesh-wide table for every proxy (ServiceEntry hosts, outbound policy)
        if (
            scope.full
            or scope.mesh_wide
            or subjects.config_mesh_wide not in self.published
            or not scope.routes.isdisjoint(service_entry_refs(resources))
        ):
            mesh_wide = compile_mesh_wide(resources, self.settings.root_namespace, revision)
            compiled["meshwide"] = 1
            pushed += await self._publish_if_changed(subjects.config_mesh_wide, mesh_wide)
        for kind, count in compiled.items():
            self.tables_compiled.labels(kind).inc(count)
        self.tables_compiled_last.set(sum(compiled.values()))
        self.subjects_published.inc(pushed)
        if pushed:
            self.log.info(
                "config.pushed",
                subjects=pushed,
                compiled=sum(compiled.values()),
                revision=revision,
                compile_ms=round((time.perf_counter() - started) * 1000, 2),
            )

    async def _publish_if_changed(self, subject: str, table: CompiledConfig) -> int:
        content = _content(table)
        previous = self.published.get(subject)
        if previous is not None and previous[1] == content:
            return 0
        table = msgspec.structs.replace(table, prev_revision=previous[0] if previous else 0)
        await self.bus.publish(subject, table)
        self.published[subject] = (table.revision, content)
        self.published_revisions[subject] = table.revision
        self.published_tables[subject] = table
        self.published_at[subject] = self.clock()
        return 1

    async def proxy_status(self, req: ProxyStatusRequest) -> ProxyStatusReply:
        if req.offset < 0 or req.limit < 0:
            raise errors.BadRequest("offset and limit must be 0 or more", field="limit")
        latest = self.published_revisions
        after = (req.after_proxy, req.after_subject) if req.after_proxy else None
        rows, total = self.status.page(
            latest, time.monotonic(), req.subject, offset=req.offset, limit=req.limit, after=after
        )
        reply = ProxyStatusReply(entries=rows, total=total)
        # a reply over the bus's maximum payload would never arrive: say so instead
        size = len(msgspec.msgpack.encode(reply))
        room = self.bus.nc.max_payload - REPLY_HEADROOM
        if size > room:
            rows_fit = max(1, len(reply.entries) * room // size)
            raise errors.BadRequest(
                f"proxy-status: {len(reply.entries)} rows are {size} bytes, more than one "
                f"bus message carries ({room}); ask for one subject, or pages of at most "
                f"about {rows_fit} rows (limit, offset)",
                field="limit",
            )
        return reply


__all__ = ["ConfigService"]
