"""A DestinationRule applies to TCP relays to a mesh service, on both data planes: the
caller's relay sends through the TCP cluster of (service, port) (architecture §5.1 "The
upstream path"): `consistentHash.useSourceIp`, `connectionPool.tcp.maxConnections`
and `outlierDetection` (connect failures).

`tcp-pool` has two instances on one test host, each a Python sidecar relaying to its
own echo app on the same port P (127.0.0.2:P answers `|a`, 127.0.0.3:P `|b`); the
caller (`pool-client`, the data plane under test) relays 127.0.0.1:LOCAL to tcp-pool:P.
On Envoy the translation does not give TCP clusters the DestinationRule yet (§5.3):
those legs are strict expected failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from mesh.servers import free_port
from tests.scenarios.helpers import (
    Scenario,
    TcpEcho,
    metric_sum,
    tcp_exchange,
)
from tests.support import applied, eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")


class HostEcho(TcpEcho):
    """A `TcpEcho` on a loopback address of its own, so two share one port."""

    def __init__(self, name: str, host: str, port: int) -> None:
        super().__init__(name)
        self.host, self.port = host, port

    async def start(self) -> HostEcho:
        self.server = await asyncio.start_server(self._handle, self.host, self.port)
        return self


@dataclass
class Env:
    s: Scenario
    client: Any
    b: Any  # tcp-pool's second instance (its listener is taken down by the last test)
    port: int
    local: int

    async def apply(self, traffic_policy: str) -> None:
        await applied(
            self.s.mesh,
            f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: tcp-pool}}
spec:
  host: tcp-pool
  trafficPolicy: {traffic_policy}
""",
            self.client,
        )

    async def served_by(self, n: int) -> Counter[str]:
        seen: Counter[str] = Counter()
        for i in range(n):
            payload = f"hi {i}".encode()
            reply = await tcp_exchange(self.local, payload)
            assert reply is not None and reply.startswith(payload + b"|"), reply
            seen[reply[len(payload) + 1 :].decode()] += 1
        return seen


async def closed_at_once(port: int, data: bytes) -> bool:
    """The relay closed the connection without relaying `data` (reset before the
    client's half-close, too: Envoy's reset can come first)."""
    try:
        reply = await tcp_exchange(port, data)
    except OSError:  # ENOTCONN on the half-close: already reset
        return True
    if reply is None or reply == b"":
        return True
    assert reply.startswith(data + b"|"), reply
    return False


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(scenario: Scenario) -> Any:
    port = free_port()
    a_app = await HostEcho("a", "127.0.0.2", port).start()
    b_app = await HostEcho("b", "127.0.0.3", port).start()
    local = free_port()
    try:
        await scenario.sidecar(
            "tcp-pool", "v1", app=False, tcp_ports=[port], app_host="127.0.0.2", dataplane="python"
        )
        b = await scenario.sidecar(
            "tcp-pool", "v2", app=False, tcp_ports=[port], app_host="127.0.0.3", dataplane="python"
        )
        client = await scenario.sidecar("pool-client", tcp_upstreams=[f"tcp-pool:{port}={local}"])
        e = Env(scenario, client, b, port, local)

        async def both_serve() -> bool:
            return set(await e.served_by(4)) == {"a", "b"}

        await eventually(both_serve, timeout=30, interval=0.2)
        yield e
    finally:
        a_app.close()
        b_app.close()


async def test_consistent_hash_on_source_ip(env: Env) -> None:
    await env.apply("{loadBalancer: {consistentHash: {useSourceIp: true}}}")
    # every connection comes from 127.0.0.1: one endpoint takes them all
    assert len(await env.served_by(10)) == 1
    await env.apply("{loadBalancer: {simple: ROUND_ROBIN}}")
    assert set(await env.served_by(4)) == {"a", "b"}


async def test_max_connections(env: Env) -> None:
    await env.apply("{connectionPool: {tcp: {maxConnections: 1}}}")
    reader, writer = await asyncio.open_connection("127.0.0.1", env.local)
    try:
        writer.write(b"first")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"first"  # relayed
        # the second, while the first is open: closed at once (flag UO)
        assert await closed_at_once(env.local, b"second")
        writer.write_eof()
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"|")
    finally:
        writer.close()

    refused = 1  # the second; and any third closed before the first's slot is free

    async def accepted_again() -> bool:
        nonlocal refused
        if await closed_at_once(env.local, b"third"):
            refused += 1
            return False
        return True

    await eventually(accepted_again, timeout=5, interval=0.1)

    # the refused one is counted, flag UO, as other TCP failures are
    async def counted() -> bool:
        text = await env.s.admin(env.client, "/stats/prometheus")
        labels = {"reporter": "source", "response_flags": "UO"}
        return metric_sum(text, "istio_tcp_connections_closed_total", labels) == refused

    await eventually(counted, timeout=10, interval=0.2)
    if env.s.dataplane == "python":  # our /clusters lists the relay's TCP cluster
        listed = json.loads(await env.s.admin(env.client, "/clusters"))["clusters"]
        (tcp,) = [c for c in listed if c.get("tcp_port") == env.port]
        assert tcp["destination"] == "default/tcp-pool"
        assert tcp["circuit_breakers"]["max_connections"]["limit"] == 1
        assert tcp["circuit_breakers"]["max_connections"]["overflows"] == refused


async def test_outlier_detection_ejects_an_endpoint_whose_connects_fail(env: Env) -> None:
    await env.apply(
        "{outlierDetection: {consecutive5xxErrors: 1, interval: 60s, "
        "baseEjectionTime: 120s, maxEjectionPercent: 100}}"
    )
    # b's TCP listener goes away; in its place a socket that resets every connection
    # (a failed connect for both data planes: the mTLS handshake never completes)
    relays = env.b.dataplane.tcp
    listen_port = relays.ports[f"tcp-inbound:{env.port}"]
    relays.stop_accepting()
    attempts = 0

    def refuse(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.transport.abort()

    dead = await asyncio.start_server(refuse, "127.0.0.1", listen_port)
    try:
        tries = 0
        while not attempts and tries < 20:  # until a connection has tried b (round robin)
            tries += 1
            # Python tries a next; Envoy's one connect attempt fails (the client is reset)
            with contextlib.suppress(AssertionError, OSError):
                await env.served_by(1)
        assert attempts == 1, (attempts, tries)
        # b is ejected: nothing tries it again, every connection reaches a
        assert await env.served_by(10) == Counter({"a": 10})
        assert attempts == 1
    finally:
        dead.close()
