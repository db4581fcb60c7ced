"""Interception of non-HTTP traffic (docs/architecture.md §5.4), with real sidecars,
control plane, namespace and nftables: a server-first protocol on a port declared
opaque is relayed at once (no detection wait), on another port after the detection
timeout (counted); excluded destinations are not captured; a grpcio client with
`grpc.enable_http_proxy=0` is captured as h2c and routed; the sidecar's own traffic
is never captured; unknown destinations follow MeshConfig's outbound traffic policy."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.grpc_support import EchoService
from tests.intercept_support import (
    host_address,
    intercept_state_dir,
    intercepted_client,
    namespace_of,
    python_in,
    skip_without_interception,
)
from tests.support import MeshHarness, eventually

pytestmark = pytest.mark.usefixtures("interception")

BANNER = b"220 smtp.example ESMTP ready\r\n"
HELO_REPLY = b"250 HELO me\r\n"


@pytest.fixture
def interception(tmp_path: Path) -> Path:
    skip_without_interception()
    return intercept_state_dir(tmp_path)


class BannerServer:
    """A server-first app (as SMTP, MySQL): speaks first, then echoes one line."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.peers: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> BannerServer:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername")[0])
        writer.write(BANNER)
        await writer.drain()
        line = await reader.readline()
        writer.write(b"250 " + line)
        await writer.drain()
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def banner_client(host: str, port: int) -> str:
    """Connect, read the server's greeting before sending anything, then say HELO."""
    return (
        "import socket\n"
        f"s = socket.create_connection(({host!r}, {port}), timeout=10)\n"
        "s.settimeout(10)\n"
        "greeting = s.recv(100)\n"
        "s.sendall(b'HELO me\\r\\n')\n"
        "reply = b''\n"
        "while not reply.endswith(b'\\n'):\n"
        "    chunk = s.recv(100)\n"
        "    if not chunk: break\n"
        "    reply += chunk\n"
        "print(repr(greeting), repr(reply))\n"
    )


def metric(sc: Any, name: str, labels: dict[str, str] | None = None) -> float:
    return sc.stats.registry.get_sample_value(name, labels or {}) or 0.0


def captured_total(sc: Any) -> float:
    return sum(
        sample.value
        for family in sc.stats.registry.collect()
        for sample in family.samples
        if sample.name == "meshwork_proxy_capture_connections_total"
    )


async def test_server_first_tcp_exclusions_and_grpc(nats_server, etcd_server, prefix) -> None:
    opaque, detected = await BannerServer().start(), await BannerServer().start()
    grpc_app = EchoService("greeter-v1").start()
    try:
        async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
            await mesh.sidecar("smtp", app=False, tcp_ports=[opaque.port, detected.port])
            await mesh.sidecar("greeter", app=False, app_port=grpc_app.port, app_protocol="grpc")
            # the host's own address, excluded: reached directly, not through the sidecar
            direct = await BannerServer("0.0.0.0").start()
            client = await intercepted_client(
                mesh,
                opaque_ports=(opaque.port,),
                exclude_outbound_cidrs=(f"{host_address()}/32",),
            )
            ns = namespace_of(client)
            app_ip = client.interception.addresses.app_ip
            timeouts = "meshwork_proxy_capture_detection_timeouts_total"

            # declared opaque: relayed without waiting for the client to speak
            code, out = await python_in(ns, banner_client("smtp", opaque.port))
            assert code == 0, out
            assert out.strip() == f"{BANNER!r} {HELO_REPLY!r}"
            assert metric(client, timeouts) == 0

            # not declared: the client is silent, detection times out, then TCP
            code, out = await python_in(ns, banner_client("smtp.default", detected.port))
            assert code == 0, out
            assert repr(BANNER) in out
            assert metric(client, timeouts) == 1

            # the relays went through the server's sidecar (its relay is the peer)
            assert opaque.peers == ["127.0.0.1"] and detected.peers == ["127.0.0.1"]

            # an excluded destination is reached directly, from the app's own address
            before = captured_total(client)
            host = host_address()
            code, out = await python_in(ns, banner_client(host, direct.port))
            assert code == 0, out
            assert direct.peers == [app_ip]
            assert captured_total(client) == before

            # grpcio with its proxy support off: captured as h2c and routed by :authority
            code, out = await python_in(
                ns,
                "import grpc\n"
                "ch = grpc.insecure_channel('greeter:9090', "
                "options=[('grpc.enable_http_proxy', 0)])\n"
                "call = ch.unary_unary('/mesh.test.Echo/Unary', "
                "request_serializer=lambda b: b, response_deserializer=lambda b: b)\n"
                "print(call(b'hi', timeout=10))\n",
                timeout=30,
            )
            assert code == 0, out
            assert "b'greeter-v1:hi'" in out
            assert (
                grpc_app.seen_metadata[-1]
                .get("x-forwarded-client-cert", "")
                .endswith("URI=spiffe://cluster.local/ns/default/sa/productpage")
            )
            assert (
                metric(
                    client,
                    "meshwork_proxy_capture_connections_total",
                    {"protocol": "h2c", "action": "route_http"},
                )
                == 1
            )

            # the sidecar's own traffic (NATS, etcd-backed requests, upstream mTLS) was
            # never captured: every captured connection is one the app made
            assert captured_total(client) == 3
            assert client.bus.connected
            direct.close()
    finally:
        opaque.close()
        detected.close()
        grpc_app.stop()


ALLOW_ANY_YAML = """
apiVersion: meshwork.io/v1
kind: MeshConfig
metadata: {name: mesh, namespace: istio-system}
spec:
  outboundTrafficPolicy: {mode: ALLOW_ANY}
"""


async def check_outbound_traffic_policy(mesh: Any, client: Any, outside: BannerServer) -> None:
    """A destination the mesh does not know: refused under REGISTRY_ONLY (the default),
    relayed as it is, from the host side, once MeshConfig says ALLOW_ANY."""
    ns = namespace_of(client)
    _code, out = await python_in(ns, banner_client(host_address(), outside.port))
    assert repr(BANNER) not in out and not outside.peers, out
    await mesh.apply(ALLOW_ANY_YAML)

    async def passed() -> bool:
        code, out = await python_in(ns, banner_client(host_address(), outside.port))
        return code == 0 and repr(BANNER) in out

    await eventually(passed, timeout=20)
    # relayed by the sidecar: the server's peer is a host address, not the app's
    assert outside.peers and outside.peers[-1] != client.interception.addresses.app_ip


async def test_allow_any_passes_unknown_destinations_through(
    nats_server, etcd_server, prefix
) -> None:
    outside = await BannerServer("0.0.0.0").start()
    try:
        async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
            client = await intercepted_client(mesh)
            await check_outbound_traffic_policy(mesh, client, outside)
            passed = metric(
                client,
                "meshwork_proxy_capture_connections_total",
                {"protocol": "tcp", "action": "passthrough"},
            )
            assert passed >= 1
    finally:
        outside.close()
