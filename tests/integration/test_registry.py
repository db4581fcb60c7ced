"""The registry against real nats-server and etcd processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mesh import errors
from mesh.bus import Bus
from mesh.messages import (
    DeregisterReply,
    DeregisterRequest,
    EndpointSet,
    EndpointsGetReply,
    EndpointsGetRequest,
    HeartbeatReply,
    HeartbeatRequest,
    Instance,
    RegisterReply,
    RegisterRequest,
)
from services.registry import RegistryService
from services.registry.service import alive_ttl_s
from tests.support import ServiceProcess, eventually, running, service_config


def instance(
    name: str = "reviews-v1-0", service: str = "reviews", port: int = 9080, **kw: object
) -> Instance:
    return Instance(
        namespace="default",
        service=service,
        instance=name,
        address=f"127.0.0.1:{port}",
        version="v1",
        labels={"app": service, "version": "v1"},
        **kw,  # type: ignore[arg-type]
    )


class EndpointWatcher:
    """Collects every endpoint set published for a service."""

    def __init__(self) -> None:
        self.sets: list[EndpointSet] = []

    async def __call__(self, msg: EndpointSet, _subject: str) -> None:
        self.sets.append(msg)

    def latest_instances(self) -> set[str]:
        return {e.instance for e in self.sets[-1].endpoints} if self.sets else set()


async def test_register_lookup_and_event(nats_server, etcd_server, prefix) -> None:
    cfg = service_config(nats_server.url, etcd_server.url, prefix)
    async with running(RegistryService(cfg)):
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        watcher = EndpointWatcher()
        await bus.subscribe(bus.subjects.endpoints("default", "reviews"), EndpointSet, watcher)
        reply = await bus.request(
            bus.subjects.registry_register, RegisterRequest(instance=instance()), RegisterReply
        )
        assert reply.lease_id and reply.ttl == 10 and reply.revision > 0

        got = await bus.request(
            bus.subjects.registry_get, EndpointsGetRequest("default", "reviews"), EndpointsGetReply
        )
        assert [e.address for e in got.sets[0].endpoints] == ["127.0.0.1:9080"]
        assert got.sets[0].endpoints[0].labels == {"app": "reviews", "version": "v1"}

        await eventually(lambda: watcher.latest_instances() == {"reviews-v1-0"})
        assert watcher.sets[-1].revision >= reply.revision

        # draining status re-registered under the same lease is published
        draining = instance(status="draining")
        await bus.request(
            bus.subjects.registry_register,
            RegisterRequest(instance=draining, lease_id=reply.lease_id),
            RegisterReply,
        )
        await eventually(lambda: watcher.sets[-1].endpoints[0].status == "draining")

        await bus.request(
            bus.subjects.registry_deregister,
            DeregisterRequest("default", "reviews", "reviews-v1-0", reply.lease_id),
            DeregisterReply,
        )
        await eventually(lambda: watcher.sets[-1].endpoints == [])
        await bus.close()


async def test_instance_expires_without_heartbeats(nats_server, etcd_server, prefix) -> None:
    cfg = service_config(nats_server.url, etcd_server.url, prefix)
    async with running(RegistryService(cfg)):
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        watcher = EndpointWatcher()
        await bus.subscribe(bus.subjects.endpoints("default", "ratings"), EndpointSet, watcher)
        reply = await bus.request(
            bus.subjects.registry_register,
            RegisterRequest(instance=instance("ratings-0", "ratings"), ttl=2),
            RegisterReply,
        )
        # heartbeats keep it alive past its TTL
        for _ in range(4):
            await asyncio.sleep(0.7)
            hb = await bus.request(
                bus.subjects.registry_heartbeat,
                HeartbeatRequest(reply.lease_id, "default", "ratings", "ratings-0"),
                HeartbeatReply,
            )
            assert hb.ttl > 0
        assert watcher.latest_instances() == {"ratings-0"}
        # then it stops: the instance disappears by itself
        started = time.monotonic()
        await eventually(lambda: watcher.sets and watcher.latest_instances() == set(), timeout=10)
        assert time.monotonic() - started < 6
        with pytest.raises(errors.RemoteError) as e:
            await bus.request(
                bus.subjects.registry_heartbeat,
                HeartbeatRequest(reply.lease_id, "default", "ratings", "ratings-0"),
                HeartbeatReply,
            )
        assert e.value.code == 404
        await bus.close()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"namespace": "Bad_NS"}, "instance.namespace"),
        ({"service": ""}, "instance.service"),
        ({"address": "127.0.0.1"}, "instance.address"),
        ({"address": "127.0.0.1:99999"}, "instance.address"),
        ({"labels": {"app": "x y"}}, "instance.labels.app"),
        ({"instance": "a/b"}, "instance.instance"),
    ],
)
async def test_malformed_registration_rejected_with_field(
    nats_server, etcd_server, prefix, change, field
) -> None:
    cfg = service_config(nats_server.url, etcd_server.url, prefix)
    async with running(RegistryService(cfg)):
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        fields = {
            "namespace": "default", "service": "reviews", "instance": "r-0",
            "address": "127.0.0.1:9080", "labels": {"app": "reviews"},
        }  # fmt: skip
        fields.update(change)
        with pytest.raises(errors.RemoteError) as e:
            await bus.request(
                bus.subjects.registry_register,
                RegisterRequest(instance=Instance(**fields)),
                RegisterReply,
            )
        assert e.value.code == 400
        assert e.value.field == field
        assert field in e.value.message
        # the registry keeps serving
        ok = await bus.request(
            bus.subjects.registry_register, RegisterRequest(instance=instance()), RegisterReply
        )
        assert ok.lease_id
        await bus.close()


async def test_wrong_types_rejected_with_field(nats_server, etcd_server, prefix) -> None:
    cfg = service_config(nats_server.url, etcd_server.url, prefix)
    async with running(RegistryService(cfg)):
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        import msgspec

        raw = msgspec.msgpack.encode(
            {"type": "RegisterRequest", "instance": {"type": "Instance", "namespace": 5}}
        )
        resp = await bus.nc.request(bus.subjects.registry_register, raw, timeout=2)
        err = msgspec.msgpack.decode(resp.data)
        assert err["type"] == "ErrorReply" and err["code"] == 400
        assert err["field"] == "instance.namespace"
        await bus.close()


async def test_three_replicas_survive_killing_the_leader(
    nats_server, etcd_server, prefix, tmp_path: Path
) -> None:
    replicas = [
        ServiceProcess(
            "registry", nats_server.url, etcd_server.url, prefix, f"registry-{i}", tmp_path
        ).start()
        for i in range(3)
    ]
    try:
        await eventually(lambda: all(r.ready() for r in replicas), timeout=30)
        leaders = await eventually(
            lambda: [r for r in replicas if (r.health() or {}).get("leader")], timeout=15
        )
        assert len(leaders) == 1
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        watcher = EndpointWatcher()
        await bus.subscribe(bus.subjects.endpoints("default", "details"), EndpointSet, watcher)

        async def register(i: int) -> RegisterReply:
            return await bus.request(
                bus.subjects.registry_register,
                RegisterRequest(instance=instance(f"details-{i}", "details", 9000 + i)),
                RegisterReply,
            )

        await register(0)
        await eventually(lambda: watcher.latest_instances() == {"details-0"})

        leaders[0].process.kill()
        # every request is still answered while the others take over
        for i in range(1, 21):
            await register(i)
        new_leader = await eventually(
            lambda: [
                r for r in replicas if r is not leaders[0] and (r.health() or {}).get("leader")
            ],
            timeout=15,
        )
        assert len(new_leader) == 1
        # and endpoint events keep flowing from the new leader
        await eventually(
            lambda: watcher.latest_instances() == {f"details-{i}" for i in range(21)}, timeout=15
        )
        await bus.close()
    finally:
        for r in replicas:
            r.process.stop()


async def test_after_an_outage_longer_than_the_leases_no_live_instance_is_dropped(
    nats_server, etcd_server, prefix
) -> None:
    """No registry for longer than the instances' TTL: their leases lapse unrenewed. The
    leader that returns asks every sidecar to register again (`registry.resync`) and
    publishes nothing until they have: a proxy never sees a set without a live one."""
    from proxy.registration import Registration

    cfg = service_config(nats_server.url, etcd_server.url, prefix)
    bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
    watcher = EndpointWatcher()
    await bus.subscribe(bus.subjects.endpoints("default", "reviews"), EndpointSet, watcher)
    old = Registration(bus, instance("reviews-v1-0", port=9080), ttl=2)
    await old.listen_for_resync()
    try:
        async with running(RegistryService(cfg)):
            await old.register()
            await eventually(lambda: watcher.latest_instances() == {"reviews-v1-0"})
        # every registry gone: the lease (2 s) and the leader's liveness key (twice the
        # election TTL: longer than a handover) lapse
        await asyncio.sleep(alive_ttl_s(cfg.election_ttl) + 1.5)
        old.ttl = 10  # what it registers with next: outlives the registry's grace
        watcher.sets.clear()
        async with running(RegistryService(cfg)):
            new = Registration(bus, instance("reviews-v1-1", port=9081), ttl=10)
            await new.register_until_done()
            await eventually(
                lambda: watcher.latest_instances() == {"reviews-v1-0", "reviews-v1-1"},
                timeout=10,
            )
        assert all("reviews-v1-0" in {e.instance for e in s.endpoints} for s in watcher.sets), [
            [e.instance for e in s.endpoints] for s in watcher.sets
        ]
    finally:
        await bus.close()


async def test_a_burst_of_registrations_is_coalesced(nats_server, etcd_server, prefix) -> None:
    """200 instances starting at once: far fewer publishes than registrations, and the
    last set published for each service is the registry's own."""
    cfg = service_config(nats_server.url, etcd_server.url, prefix)
    async with running(RegistryService(cfg)) as svc:
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        watchers = {name: EndpointWatcher() for name in ("reviews", "ratings")}
        for name, watcher in watchers.items():
            await bus.subscribe(bus.subjects.endpoints("default", name), EndpointSet, watcher)
        await eventually(lambda: svc.leader_gauge._value.get() == 1)
        # leading is not yet watching: a registration written before the watch starts
        # is loaded, not counted as a change; one published instance shows the watch runs
        warmup = EndpointWatcher()
        await bus.subscribe(bus.subjects.endpoints("default", "warmup"), EndpointSet, warmup)
        await bus.request(
            bus.subjects.registry_register,
            RegisterRequest(instance=instance("warmup-0", "warmup", 9_999)),
            RegisterReply,
        )
        await eventually(lambda: warmup.latest_instances() == {"warmup-0"})
        changes_before = svc.registry.get_sample_value("mesh_registry_instance_changes_total")
        published_before = svc.registry.get_sample_value(
            "mesh_registry_endpoint_sets_published_total"
        )
        gate = asyncio.Semaphore(50)

        async def register(i: int) -> None:
            name = ("reviews", "ratings")[i % 2]
            async with gate:
                await bus.request(
                    bus.subjects.registry_register,
                    RegisterRequest(instance=instance(f"{name}-{i}", name, 10_000 + i)),
                    RegisterReply,
                )

        await asyncio.gather(*(register(i) for i in range(200)))
        for name, watcher in watchers.items():
            got = await bus.request(
                bus.subjects.registry_get, EndpointsGetRequest("default", name), EndpointsGetReply
            )
            want = {e.instance for e in got.sets[0].endpoints}
            assert len(want) == 100
            await eventually(lambda w=watcher, want=want: w.latest_instances() == want)  # type: ignore[misc]
        published = sum(len(w.sets) for w in watchers.values())
        changes = svc.registry.get_sample_value("mesh_registry_instance_changes_total")
        assert changes - changes_before == 200
        assert published == (
            svc.registry.get_sample_value("mesh_registry_endpoint_sets_published_total")
            - published_before
        )
        assert published < 200 / 4, published  # coalesced: far fewer than one per change
        await bus.close()
