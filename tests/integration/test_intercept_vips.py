"""Virtual IPs of services (docs/architecture.md §4, §5.4): allocated by the registry
with a service's first instance, stored in etcd, the same whichever replica answers
and after a restart, answered both ways over `registry.vip`. Real NATS, etcd and
registry replicas."""

from __future__ import annotations

import ipaddress

from mesh.bus import Bus
from mesh.messages import RegisterReply, RegisterRequest, VipReply, VipRequest
from services.registry import RegistryService
from tests.integration.test_registry import instance
from tests.support import running, service_config


async def vip(bus: Bus, **req: str) -> VipReply:
    reply: VipReply = await bus.request(bus.subjects.registry_vip, VipRequest(**req), VipReply)
    return reply


async def test_virtual_ips_are_allocated_once_and_answered_both_ways(
    nats_server, etcd_server, prefix
) -> None:
    cfg = service_config(nats_server.url, etcd_server.url, prefix)
    bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
    try:
        async with running(RegistryService(cfg)):
            assert (await vip(bus, namespace="default", service="reviews")).address == ""
            for name, service in (("r1", "reviews"), ("r2", "reviews"), ("p1", "ratings")):
                await bus.request(
                    bus.subjects.registry_register,
                    RegisterRequest(instance=instance(name, service)),
                    RegisterReply,
                )
            reviews = (await vip(bus, namespace="default", service="reviews")).address
            ratings = (await vip(bus, namespace="default", service="ratings")).address
            assert reviews != ratings
            assert ipaddress.IPv4Address(reviews) in ipaddress.ip_network("240.240.0.0/16")
            back = await vip(bus, address=reviews)
            assert (back.namespace, back.service) == ("default", "reviews")
            free = next(
                a
                for a in ("240.240.0.1", "240.240.0.2", "240.240.0.3")
                if a not in (reviews, ratings)
            )
            assert (await vip(bus, address=free)).service == ""
            assert (await vip(bus, address="10.0.0.1")).service == ""
        # another replica (a restart): the same addresses, from etcd
        async with running(RegistryService(cfg)):
            await bus.request(
                bus.subjects.registry_register,
                RegisterRequest(instance=instance("r3", "reviews")),
                RegisterReply,
            )
            assert (await vip(bus, namespace="default", service="reviews")).address == reviews
            assert (await vip(bus, address=ratings)).service == "ratings"
    finally:
        await bus.close()
