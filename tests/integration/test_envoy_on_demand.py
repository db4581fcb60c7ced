"""Envoy on demand (`--envoy-on-demand`, VHDS over delta xDS): a sidecar whose mesh has
many services holds only the destinations its app called, a service registered after
the sidecar started works on its first request, a routing change for a followed
destination reaches Envoy, and an unknown host gets 502 as from the Python proxy. Real NATS, etcd, control
plane and Envoy processes."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from mesh.messages import Instance, RegisterReply, RegisterRequest
from tests.envoy_support import requires_envoy
from tests.support import MeshHarness, admin_json, eventually

pytestmark = requires_envoy

# services registered besides the ones the test calls (none of them answers)
IDLE_SERVICES = 40


async def call(sc: Any, url: str) -> tuple[int, str, dict[str, str]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session,
        session.get(url, proxy=f"http://127.0.0.1:{sc.ports['outbound']}") as r,
    ):
        return r.status, await r.text(), dict(r.headers)


async def register_idle(mesh: MeshHarness, n: int) -> None:
    async def one(i: int) -> None:
        await mesh.bus.request(
            mesh.bus.subjects.registry_register,
            RegisterRequest(
                instance=Instance(
                    namespace="default",
                    service=f"idle{i}",
                    instance=f"idle{i}-v1-0",
                    address=f"127.0.0.1:{20000 + i}",
                    version="v1",
                ),
                ttl=300,
            ),
            RegisterReply,
        )

    await asyncio.gather(*(one(i) for i in range(n)))


def cluster_names(clusters: Any) -> set[str]:
    return {c["name"] for c in clusters.get("cluster_statuses", [])}


async def test_on_demand_envoy_holds_only_what_its_app_called(
    nats_server, etcd_server, prefix
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        await register_idle(mesh, IDLE_SERVICES)
        await mesh.sidecar("reviews", dataplane="envoy")
        client = await mesh.sidecar("productpage", dataplane="envoy", envoy_on_demand=True)

        # the first request for a host Envoy has never seen waits for its virtual host
        status, body, _ = await call(client, "http://reviews:9080/hello")
        assert status == 200, body
        assert '"service": "reviews"' in body or '"service":"reviews"' in body, body

        clusters = cluster_names(await admin_json(client, "/clusters"))
        outbound = {c for c in clusters if c.startswith("outbound|")}
        assert outbound == {"outbound|0||reviews.default.svc.cluster.local"}, outbound
        assert client.dataplane.info()["following"] == ["default/reviews"]

        # a service that appears after the sidecar started: its first request works
        await mesh.sidecar("ratings", dataplane="envoy")
        status, body, _ = await call(client, "http://ratings.default.svc.cluster.local/")
        assert status == 200, body

        # a host that is no mesh service: 502 as from the Python proxy
        status, body, _ = await call(client, "http://nosuch.default.svc.cluster.local/")
        assert status == 502 and "unknown host" in body, body
        # asked again (Envoy subscribes again): answered again, not left waiting
        status, _, _ = await call(client, "http://nosuch.default.svc.cluster.local/")
        assert status == 502
        # a host that is published after Envoy was told it does not exist
        status, _, _ = await call(client, "http://details/")
        assert status == 502
        await mesh.sidecar("details", dataplane="envoy")

        async def details_found() -> bool:
            status, _, _ = await call(client, "http://details/")
            return status == 200

        await eventually(details_found, timeout=20, interval=0.2)

        # a routing change for a followed destination reaches Envoy
        await mesh.apply(FAULT_REVIEWS)

        async def aborted() -> bool:
            status, _, _ = await call(client, "http://reviews:9080/")
            return status == 418

        await eventually(aborted, timeout=20, interval=0.2)
        clusters = cluster_names(await admin_json(client, "/clusters"))
        assert not any("idle" in c for c in clusters), clusters


FAULT_REVIEWS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route:
    - destination: {host: reviews}
"""
