"""Istio's tcp-traffic-shifting task between sidecars, with the YAML of
examples/tcp-echo/ and its tcp-echo app: a client relay for tcp-echo:9000, two
tcp-echo instances (v1 prefixes "one", v2 "two") behind inbound relays, real NATS,
etcd, registry and config service.

Each instance would serve port 9000 on its own host; on one test host the two apps
need ports of their own, so each instance registers port 9000 -> the relay in front of
its app (as tests/integration/test_tcp_relay.py does)."""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from mesh.hosts import ServiceRef
from mesh.messages import Instance, RegisterReply, RegisterRequest
from mesh.servers import free_port
from proxy.destinations import DestinationCache
from proxy.stats import ProxyStats
from proxy.tcp import TcpRelays, TcpUpstream
from tests.support import MeshHarness, eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "tcp-echo"
TCP_ECHO = ServiceRef("default", "tcp-echo")
PORT = 9000
N = 100


class TcpEchoMesh:
    def __init__(self, mesh: MeshHarness) -> None:
        self.mesh = mesh
        self.cache = DestinationCache(mesh.bus, on_change=lambda: None, rand=random.Random(7))
        self.client = TcpRelays(
            self.cache,
            ProxyStats().registry,
            random.Random(11),
            source_labels={"app": "sleep", "version": "v1"},
            source_namespace="default",
        )
        self.port = 0
        self.apps: list[asyncio.subprocess.Process] = []
        self.relays: list[TcpRelays] = []

    async def start_version(self, version: str, prefix: str) -> None:
        app_port = free_port()
        app = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / "tcp_echo.py"),
            str(app_port),
            prefix,
            stdout=asyncio.subprocess.PIPE,
        )
        self.apps.append(app)
        assert app.stdout is not None
        line = await asyncio.wait_for(app.stdout.readline(), 10)
        assert line.decode().startswith(f"listening on 127.0.0.1:{app_port}, prefix: {prefix}")
        relays = TcpRelays(self.cache, ProxyStats().registry)
        self.relays.append(relays)
        listeners = await relays.start_inbound("127.0.0.1", [app_port])
        instance = Instance(
            namespace=TCP_ECHO.namespace,
            service=TCP_ECHO.name,
            instance=f"tcp-echo-{version}",
            version=version,
            address="127.0.0.1:9",
            tcp_ports=[PORT],
            tcp_listeners={str(PORT): listeners[str(app_port)]},
            status="healthy",
        )
        bus = self.mesh.bus
        await bus.request(
            bus.subjects.registry_register,
            RegisterRequest(instance=instance, ttl=60),
            RegisterReply,
        )

    async def close(self) -> None:
        for relays in (self.client, *self.relays):
            relays.close()
        for relays in (self.client, *self.relays):
            await asyncio.wait_for(relays.wait_closed(), 5)
        for app in self.apps:
            app.terminate()
            await asyncio.wait_for(app.wait(), 5)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(nats_server, etcd_server) -> AsyncIterator[TcpEchoMesh]:
    async with MeshHarness(nats_server.url, etcd_server.url, "tcpshift", ca=False) as mesh:
        env = TcpEchoMesh(mesh)
        try:
            await env.start_version("v1", "one")
            await env.start_version("v2", "two")
            await env.client.start_outbound([TcpUpstream(TCP_ECHO, PORT, local_port=0)])
            env.port = env.client.ports[f"tcp-outbound:tcp-echo.default:{PORT}"]
            yield env
        finally:
            await env.close()


async def say(port: int, line: str) -> str:
    """What tcp-echo answers to one line, as `nc` in the task shows it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{line}\n".encode())
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 10)).decode().rstrip("\n")
    finally:
        writer.close()


async def prefixes(port: int, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for i in range(n):
        answer = await say(port, f"hello {i}")
        prefix, _, rest = answer.partition(" ")
        assert rest == f"hello {i}", answer
        seen[prefix] += 1
    return seen


async def test_without_rules_both_versions_serve(env: TcpEchoMesh) -> None:
    async def both() -> bool:
        return set(await prefixes(env.port, 10)) == {"one", "two"}

    await eventually(both, timeout=20, interval=0.2)


async def test_all_v1_then_80_20(env: TcpEchoMesh) -> None:
    await env.mesh.apply((EXAMPLES / "tcp-echo-all-v1-mesh.yaml").read_text())

    async def only_v1() -> bool:
        return set(await prefixes(env.port, 10)) == {"one"}

    await eventually(only_v1, timeout=20, interval=0.2)
    assert await prefixes(env.port, 20) == Counter({"one": 20})

    await env.mesh.apply((EXAMPLES / "tcp-echo-20-v2-mesh.yaml").read_text())

    async def v2_seen() -> bool:
        return "two" in await prefixes(env.port, 10)

    await eventually(v2_seen, timeout=20, interval=0.2)
    seen = await prefixes(env.port, N)
    # v2 ~ Binomial(100, 0.2): mean 20, sd 4; 6 sigma is [0, 44], and both sides seen
    assert set(seen) == {"one", "two"}, seen
    assert 1 <= seen["two"] <= 44, seen
