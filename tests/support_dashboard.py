"""A small mesh with traffic for the dashboard's tests: the control plane (registry,
config, CA) and the telemetry service in this event loop, reviews v2 (an echo app),
productpage v1 (the test is its app) and a three-hop chain svc-a -> svc-b -> svc-c."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from services.telemetry import TelemetryService
from tests.support import ForwardingApp, MeshHarness, replace_app, running, service_config

REVIEWS_ABORT_YAML = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - fault:
      abort:
        percentage: {value: 100.0}
        httpStatus: 500
    route:
    - destination: {host: reviews}
"""


def outbound(sc: Any) -> str:
    return f"http://127.0.0.1:{sc.ports['outbound']}"


@dataclass
class SmallMesh:
    mesh: MeshHarness
    telemetry: TelemetryService
    productpage: Any
    chain_start: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.telemetry.http_port}"

    async def send(self, n: int, path: str = "/reviews/1") -> list[int]:
        """N requests productpage -> reviews; their status codes."""
        codes = []
        async with aiohttp.ClientSession() as session:
            for _ in range(n):
                async with session.get(
                    f"http://reviews:9080{path}", proxy=outbound(self.productpage)
                ) as r:
                    await r.read()
                    codes.append(r.status)
        return codes

    async def traced_chain(self) -> str:
        """One request svc-a -> svc-b -> svc-c (sampled at svc-a); its trace id."""
        async with (
            aiohttp.ClientSession() as session,
            session.get("http://svc-b/start", proxy=outbound(self.chain_start)) as r,
        ):
            assert r.status == 200
            answer = await r.json()
        return str(answer["headers"]["traceparent"].split("-")[1])


@contextlib.asynccontextmanager
async def small_mesh(
    nats_url: str, etcd_url: str, prefix: str, **telemetry_options: str
) -> AsyncIterator[SmallMesh]:
    async with (
        MeshHarness(nats_url, etcd_url, prefix) as mesh,
        running(
            TelemetryService(
                service_config(nats_url, etcd_url, prefix, replica="tel-0", **telemetry_options)
            )
        ) as tel,
    ):
        assert isinstance(tel, TelemetryService)
        await mesh.sidecar("reviews", "v2")
        productpage = await mesh.sidecar("productpage", "v1", app=False)
        await mesh.sidecar("svc-c", "v1", trace_sampling=0)
        b = await mesh.sidecar("svc-b", "v1", trace_sampling=0)
        await replace_app(mesh, b, ForwardingApp("http://svc-c/hello", outbound(b)))
        a = await mesh.sidecar("svc-a", "v1", app=False, trace_sampling=100)
        yield SmallMesh(mesh, tel, productpage, a)
