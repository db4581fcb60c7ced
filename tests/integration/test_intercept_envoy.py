"""Interception on the Envoy data plane (docs/architecture.md §5.4): the same namespace,
rules and DNS as the Python one, Envoy's capture listener (`original_dst` +
`http_inspector`) routing by Host over mTLS, TCP to a service's virtual IP relayed to
its TCP listeners; any other connection that is not HTTP is refused (BlackHoleCluster,
REGISTRY_ONLY); `--opaque-ports` without detection, the detection-timeout metric, and
raw addresses of instances (their TCP listeners relayed to them, HTTP to their inbound
listener routed by their service); unknown destinations refused under REGISTRY_ONLY
and passed through to the original destination once MeshConfig says ALLOW_ANY. Real Envoy, sidecars, control plane, nftables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh.messages import EndpointsGetReply, EndpointsGetRequest
from tests.envoy_support import requires_envoy
from tests.integration.test_envoy_dataplane import admin_get
from tests.integration.test_intercept_http import curl
from tests.integration.test_intercept_tcp import (
    BANNER,
    HELO_REPLY,
    BannerServer,
    banner_client,
    check_outbound_traffic_policy,
)
from tests.intercept_support import (
    gone,
    host_address,
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


async def detection_timeouts(sidecar: Any) -> int:
    status, text = await admin_get(sidecar, "/stats/prometheus")
    assert status == 200, text
    for line in text.splitlines():
        if line.startswith("meshwork_proxy_capture_detection_timeouts_total "):
            return int(float(line.split()[1]))
    named = [line for line in text.splitlines() if "pre_cx_timeout" in line]
    raise AssertionError(f"no meshwork_proxy_capture_detection_timeouts_total: {named}")


async def test_envoy_capture_opaque_ports_and_raw_instance_addresses(
    nats_server, etcd_server, prefix, state
) -> None:
    opaque, detected = await BannerServer().start(), await BannerServer().start()
    try:
        async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
            bind = host_address()
            # the TCP server's sidecar on Envoy too: Python relays frame the bytes
            # between them, Envoy sends them raw (a mixed TCP relay is not this test's)
            await mesh.sidecar(
                "smtp",
                app=False,
                tcp_ports=[opaque.port, detected.port],
                bind_host=bind,
                dataplane="envoy",
            )
            reviews = await mesh.sidecar("reviews", "v1", bind_host=bind)
            client = await intercepted_client(mesh, dataplane="envoy", opaque_ports=(opaque.port,))
            ns = namespace_of(client)
            # the virtual IPs and instances reach Envoy's capture listener by name first
            await eventually(lambda: _served_by_name(ns), timeout=30)
            assert await detection_timeouts(client) == 0

            # declared opaque: no HTTP detection, the greeting comes at once
            code, out = await python_in(ns, banner_client("smtp", opaque.port))
            assert code == 0 and out.strip() == f"{BANNER!r} {HELO_REPLY!r}", out
            assert await detection_timeouts(client) == 0
            # not declared: the silent client times the HTTP inspector out, counted
            code, out = await python_in(ns, banner_client("smtp", detected.port))
            assert code == 0 and repr(BANNER) in out, out
            assert await detection_timeouts(client) == 1

            # TCP to the raw address of the instance's TCP listener: relayed over mTLS
            # through that listener (its sidecar is the app's peer)
            reply = await client.bus.request(
                client.bus.subjects.registry_get, EndpointsGetRequest(), EndpointsGetReply
            )
            (smtp,) = [ep for eps in reply.sets if eps.service == "smtp" for ep in eps.endpoints]
            relay_host, _, relay_port = smtp.tcp_listeners[str(opaque.port)].rpartition(":")
            assert relay_host == bind
            before = len(opaque.peers)
            code, out = await python_in(ns, banner_client(relay_host, int(relay_port)))
            assert code == 0 and out.strip() == f"{BANNER!r} {HELO_REPLY!r}", out
            assert opaque.peers[before:] == ["127.0.0.1"]

            # HTTP to the raw address of an instance's inbound listener: routed as a
            # request for its service (by the route table), over mTLS
            address = f"{bind}:{reviews.ports['inbound']}"
            status, body = await curl(ns, f"http://{address}/raw")
            assert status == 200 and isinstance(body, dict), body
            assert body["service"] == "reviews" and body["path"] == "/raw"
            seen = {k.lower(): v for k, v in reviews.echo.seen_headers[-1].items()}
            assert seen["x-forwarded-client-cert"].endswith(
                "URI=spiffe://cluster.local/ns/default/sa/productpage"
            )
            # a non-HTTP connection to that inbound address is refused (no relay there)
            _code, out = await python_in(
                ns,
                "import socket\n"
                f"s = socket.create_connection(({bind!r}, {reviews.ports['inbound']}), timeout=5)\n"
                "s.settimeout(5)\n"
                "s.sendall(b'\\x00\\x00\\x00\\x08\\x04\\xd2\\x16\\x2f')\n"
                "print('data', s.recv(10))\n",
            )
            assert "data b''" in out or "reset" in out.lower(), out
            client.stop()
            await eventually(lambda: gone(ns), timeout=30)
    finally:
        opaque.close()
        detected.close()


async def _served_by_name(ns: str) -> bool:
    code, out = await in_namespace(
        ns, "curl", "-sS", "--noproxy", "*", "-m", "5", "http://reviews:9080/ready"
    )
    return code == 0 and '"path": "/ready"' in out


async def test_envoy_capture_follows_the_outbound_traffic_policy(
    nats_server, etcd_server, prefix, state
) -> None:
    outside = await BannerServer("0.0.0.0").start()
    try:
        async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
            client = await intercepted_client(mesh, dataplane="envoy")
            await check_outbound_traffic_policy(mesh, client, outside)
    finally:
        outside.close()
