"""Interception on the Envoy data plane (docs/architecture.md §5.4): the same namespace,
rules and DNS as the Python one, Envoy's capture listener (`original_dst` +
`http_inspector`) routing by Host over mTLS, TCP to a service's virtual IP relayed to
its TCP listeners; any other connection that is not HTTP is refused (BlackHoleCluster,
REGISTRY_ONLY). Real Envoy, sidecars, control plane, nftables."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.envoy_support import requires_envoy
from tests.integration.test_intercept_tcp import BANNER, BannerServer, banner_client
from tests.intercept_support import (
    gone,
    in_namespace,
    intercept_state_dir,
    intercepted_client,
    namespace_of,
    python_in,
    skip_without_interception,
)
from tests.support import MeshHarness, eventually

pytestmark = requires_envoy


@pytest.fixture
def state(tmp_path: Path) -> Path:
    skip_without_interception()
    return intercept_state_dir(tmp_path)


async def test_envoy_capture_routes_http_by_name(nats_server, etcd_server, prefix, state) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        reviews = await mesh.sidecar("reviews", "v1")
        banner = await BannerServer().start()
        await mesh.sidecar("smtp", app=False, tcp_ports=[banner.port], dataplane="envoy")
        client = await intercepted_client(mesh, dataplane="envoy")
        ns = namespace_of(client)

        async def served() -> bool:
            code, out = await in_namespace(
                ns, "curl", "-sS", "--noproxy", "*", "-m", "5", "http://reviews:9080/envoy"
            )
            return code == 0 and '"path": "/envoy"' in out

        await eventually(served, timeout=30)
        seen = {k.lower(): v for k, v in reviews.echo.seen_headers[-1].items()}
        assert seen["x-forwarded-client-cert"].endswith(
            "URI=spiffe://cluster.local/ns/default/sa/productpage"
        )
        # TCP to a service's virtual IP and TCP port: relayed to its TCP listener (a
        # server-first protocol: Envoy's http_inspector gives up after its timeout)
        code, out = await python_in(ns, banner_client("smtp", banner.port))
        assert code == 0 and repr(BANNER) in out, out
        assert banner.peers == ["127.0.0.1"]  # through the smtp sidecar's relay

        # not HTTP (a silent client, then bytes): refused, never relayed anywhere
        _code, out = await python_in(
            ns,
            "import socket\n"
            "s = socket.create_connection(('reviews', 5432), timeout=5)\n"
            "s.settimeout(5)\n"
            "s.sendall(b'\\x00\\x00\\x00\\x08\\x04\\xd2\\x16\\x2f')\n"
            "print('data', s.recv(10))\n",
        )
        assert "data b''" in out or "reset" in out.lower(), out
        client.stop()
        await eventually(lambda: gone(ns), timeout=30)
        banner.close()
