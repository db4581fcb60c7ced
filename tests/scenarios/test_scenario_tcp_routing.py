"""VirtualService `tcp` / `tls` rules on both data planes: Istio's tcp-traffic-shifting
(100/0, then 80/20 between subsets) from a `sleep` sidecar's relay to tcp-echo v1/v2,
and a gateway's TCP server and TLS PASSTHROUGH server (routed by SNI).

On one test host the two versions' apps need ports of their own: v1 serves P1, v2
serves P2, and the rules send to `subset: v1, port: P1` and `subset: v2, port: P2`
(the destination's port replaces the addressed one, as in Istio)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from mesh.servers import free_port
from meshctl.sidecar_cmds import gateway_labels
from tests.envoy_support import _have_envoy
from tests.scenarios.helpers import Scenario, TcpEcho, metric_sum, tcp_exchange
from tests.support import applied, destination_rule_yaml, eventually
from tests.unit.test_sni_adversarial import client_hello as forged_hello
from tests.unit.test_sni_adversarial import server_name_ext

pytestmark = pytest.mark.asyncio(loop_scope="module")

N = 100


@dataclass
class Env:
    s: Scenario
    v1: TcpEcho
    v2: TcpEcho
    local: int  # the sleep sidecar's relay for tcp-echo:P1
    sleep: Any

    async def apply(self, text: str) -> None:
        """Apply and wait until the sleep sidecar runs it (on Envoy: ACKed)."""
        await applied(self.s.mesh, text, self.sleep)

    async def served_by(self, n: int) -> Counter[str]:
        seen: Counter[str] = Counter()
        for i in range(n):
            payload = f"hello {i}".encode()
            reply = await tcp_exchange(self.local, payload)
            assert reply is not None and reply.startswith(payload + b"|"), reply
            seen[reply[len(payload) + 1 :].decode()] += 1
        return seen

    def shift(self, v1_weight: int) -> str:
        p1, p2 = self.v1.port, self.v2.port
        destinations = f"""
    - destination: {{host: tcp-echo, subset: v1, port: {{number: {p1}}}}}
      weight: {v1_weight}"""
        if v1_weight < 100:
            destinations += f"""
    - destination: {{host: tcp-echo, subset: v2, port: {{number: {p2}}}}}
      weight: {100 - v1_weight}"""
        return (
            destination_rule_yaml("tcp-echo")
            + f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tcp-echo}}
spec:
  hosts: [tcp-echo]
  tcp:
  - match: [{{port: {p1}}}]
    route:{destinations}
"""
        )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(scenario: Scenario) -> Any:
    v1, v2 = await TcpEcho("one").start(), await TcpEcho("two").start()
    local = free_port()
    try:
        await scenario.sidecar("tcp-echo", "v1", app=False, tcp_ports=[v1.port])
        await scenario.sidecar("tcp-echo", "v2", app=False, tcp_ports=[v2.port])
        sleep = await scenario.sidecar("sleep", tcp_upstreams=[f"tcp-echo:{v1.port}={local}"])
        e = Env(scenario, v1, v2, local, sleep)

        async def served() -> bool:
            return await tcp_exchange(local, b"hi") == b"hi|one"

        await eventually(served, timeout=30, interval=0.2)
        yield e
    finally:
        v1.close()
        v2.close()


async def test_all_to_v1_then_80_20(env: Env) -> None:
    await env.apply(env.shift(100))
    assert await env.served_by(20) == Counter({"one": 20})

    await env.apply(env.shift(80))
    seen = await env.served_by(N)
    # v2 ~ Binomial(100, 0.2): mean 20, sd 4; 6 sigma is [0, 44], and both sides seen
    assert set(seen) == {"one", "two"}, seen
    assert 1 <= seen["two"] <= 44, seen


async def test_a_rule_for_another_port_leaves_the_default_route(env: Env) -> None:
    half = env.shift(50)
    await env.apply(half.replace(f"port: {env.v1.port}}}]", "port: 1}]", 1))
    # the only rule matches port 1: connections to P1 take the default route (the
    # service on P1, which only v1 serves); were the rule taken, half would reach v2
    assert await env.served_by(N) == Counter({"one": N})


# ---------------------------------------------------------------- gateway servers


def client_hello(host: str) -> bytes:
    """The first flight of a real TLS client for `host` (what a passthrough gateway
    reads the SNI from and relays unchanged)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=host)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def exchange(port: int, data: bytes) -> bytes | None:
    """As a TLS client would: send `data`, wait for the echo before the FIN (a client
    does not half-close after its ClientHello; Envoy closes a connection whose peer
    ends while its listener filters still inspect it), then read to EOF. None when
    refused, reset or closed early."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    try:
        writer.write(data)
        echoed = await asyncio.wait_for(reader.readexactly(len(data)), 10)
        writer.write_eof()
        return echoed + await asyncio.wait_for(reader.read(), 10)
    except (OSError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()


async def until_answered(port: int, data: bytes, reply: bytes) -> None:
    """Wait until `data` sent to `port` gets `reply`. Envoy ACKs a push before the
    clusters it adds have their endpoints (warming): a connection in between is
    closed, so each destination is waited for, not only the push."""

    async def answered() -> bool:
        return await exchange(port, data) == reply

    await eventually(answered, timeout=30, interval=0.2)


def gateway_yaml(tcp_port: int, tls_port: int, p1: int, p2: int) -> str:
    return (
        destination_rule_yaml("tcp-echo")
        + f"""---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {tcp_port}, name: tcp, protocol: TCP}}
    hosts: ["*"]
  - port: {{number: {tls_port}, name: tls, protocol: TLS}}
    tls: {{mode: PASSTHROUGH}}
    hosts: ["*.example.com"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: edge-tcp}}
spec:
  hosts: ["*"]
  gateways: [edge]
  tcp:
  - match: [{{port: {tcp_port}}}]
    route: [{{destination: {{host: tcp-echo, subset: v1, port: {{number: {p1}}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: edge-tls}}
spec:
  hosts: ["*.example.com"]
  gateways: [edge]
  tls:
  - match: [{{port: {tls_port}, sniHosts: [a.example.com]}}]
    route: [{{destination: {{host: tcp-echo, subset: v1, port: {{number: {p1}}}}}}}]
  - match: [{{port: {tls_port}, sniHosts: ["*.b.example.com"]}}]
    route: [{{destination: {{host: tcp-echo, subset: v2, port: {{number: {p2}}}}}}}]
"""
    )


async def test_gateway_tcp_server_and_tls_passthrough_by_sni(env: Env) -> None:
    s = env.s
    gw = await s.sidecar(
        "ingressgateway",
        "",
        app=False,
        gateway=True,
        gateway_port=free_port(),
        labels=gateway_labels("ingressgateway", {}),
    )
    tcp_port, tls_port = free_port(), free_port()
    await applied(s.mesh, gateway_yaml(tcp_port, tls_port, env.v1.port, env.v2.port), gw)

    async def tcp_served() -> bool:
        return await exchange(tcp_port, b"edge") == b"edge|one"

    await eventually(tcp_served, timeout=30, interval=0.2)
    a, b = client_hello("a.example.com"), client_hello("x.b.example.com")

    # the ClientHello reaches the app byte for byte, and the SNI chooses the version
    await until_answered(tls_port, a, a + b"|one")
    await until_answered(tls_port, b, b + b"|two")
    assert await exchange(tls_port, a) == a + b"|one"
    received = env.v1.received + env.v2.received
    # no rule for this SNI: closed, nothing reaches an app
    assert await exchange(tls_port, client_hello("c.example.com")) in (None, b"")
    assert env.v1.received + env.v2.received == received
    # forged server names (tests/unit/test_sni_adversarial.py): a NUL, two names: no
    # SNI, so no rule
    for forged in (
        forged_hello(server_name_ext(b"x.b.example.com\x00.a.example.com")),
        forged_hello(server_name_ext(b"c.example.com", b"x.b.example.com")),
    ):
        assert await exchange(tls_port, forged) in (None, b""), forged
    assert env.v1.received + env.v2.received == received
    # an empty first label: no DNS name (Python: no SNI, closed); Envoy's wildcard
    # lookup covers it by suffix, so it reaches that rule's destination, never another
    empty_label = forged_hello(server_name_ext(b".b.example.com"))
    reply = await exchange(tls_port, empty_label)
    assert reply in (None, b"") if s.dataplane == "python" else reply == empty_label + b"|two"


async def test_sidecar_tls_rules_route_by_sni_and_other_traffic_by_tcp_rules(env: Env) -> None:
    p1, p2 = env.v1.port, env.v2.port
    await env.apply(
        destination_rule_yaml("tcp-echo")
        + f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tcp-echo}}
spec:
  hosts: [tcp-echo, a.example.com]
  tls:
  - match: [{{port: {p1}, sniHosts: [a.example.com]}}]
    route: [{{destination: {{host: tcp-echo, subset: v2, port: {{number: {p2}}}}}}}]
  tcp:
  - route: [{{destination: {{host: tcp-echo, subset: v1, port: {{number: {p1}}}}}}}]
"""
    )
    hello = client_hello("a.example.com")
    await until_answered(env.local, hello, hello + b"|two")
    # another SNI, and bytes that are not TLS: the tcp rule
    other = client_hello("b.example.com")
    await until_answered(env.local, other, other + b"|one")
    await until_answered(env.local, b"plain", b"plain|one")
    # all of them settled: each goes its way every time
    for _ in range(5):
        assert await exchange(env.local, hello) == hello + b"|two"
        assert await exchange(env.local, other) == other + b"|one"
        assert await exchange(env.local, b"plain") == b"plain|one"


# ---------------------------------------------------------------- mixed data planes


async def test_tcp_between_envoy_and_python_sidecars_both_ways(env: Env) -> None:
    """Issue 14: a mesh running both data planes. This data plane's relay reaches the
    other's TCP listener and the reverse: the app's bytes inside mTLS, nothing more,
    a client's half-close passed on as a FIN (the echo answers only after it), and the
    serving side names the caller's identity in its `istio_tcp_*` metrics."""
    s = env.s
    other = "envoy" if s.dataplane == "python" else "python"
    if other == "envoy" and not _have_envoy():
        pytest.skip("envoy binary missing: the mixed leg needs both data planes")
    peer_echo = await TcpEcho("peer").start()
    to_peer, from_peer = free_port(), free_port()
    try:
        peer_server = await s.sidecar(
            "tcp-peer", app=False, tcp_ports=[peer_echo.port], dataplane=other
        )
        # this data plane -> the other's listener
        client = await s.sidecar(
            "sleep-mixed", tcp_upstreams=[f"tcp-peer:{peer_echo.port}={to_peer}"]
        )
        # the other data plane -> this one's (tcp-echo v1 and v2 serve on this data plane)
        peer_client = await s.sidecar(
            "sleep-peer", tcp_upstreams=[f"tcp-echo:{env.v1.port}={from_peer}"], dataplane=other
        )
        payload = bytes(range(256)) * 1024  # several TLS records each way

        async def answered(port: int, name: bytes) -> bool:
            return await tcp_exchange(port, payload) == payload + b"|" + name

        await eventually(lambda: answered(to_peer, b"peer"), timeout=30, interval=0.2)
        await eventually(lambda: answered(from_peer, b"one"), timeout=30, interval=0.2)
        for _ in range(3):
            assert await answered(to_peer, b"peer")
            assert await answered(from_peer, b"one")

        # the serving sidecars know who called, from the mTLS peer certificate
        v1_server = next(
            sc
            for sc in s.mesh.sidecars
            if sc.settings.service == "tcp-echo" and sc.settings.version == "v1"
        )
        for server, caller in ((peer_server, client), (v1_server, peer_client)):
            labels = {
                "reporter": "destination",
                "source_principal": caller.identity.spiffe_id,
                "source_workload": f"{caller.settings.service}-{caller.settings.version}",
            }

            async def counted(server: Any = server, labels: dict[str, str] = labels) -> bool:
                text = await s.admin(server, "/stats/prometheus")
                return metric_sum(text, "istio_tcp_connections_closed_total", labels) >= 1

            await eventually(counted, timeout=20, interval=0.2)

        # authorization after the handshake, on the caller's certificate: each server
        # denies the other data plane's caller, one at a time (the other path still
        # served shows the denial is the policy's)
        policy = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-{app}}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  action: DENY
  rules: [{{from: [{{source: {{principals: ["{principal}"]}}}}]}}]
"""
        steps = (
            ("tcp-peer", client, to_peer, from_peer),
            ("tcp-echo", peer_client, from_peer, None),
        )
        for app, caller, denied, still_served in steps:
            principal = caller.identity.spiffe_id.removeprefix("spiffe://")
            await applied(
                s.mesh, policy.format(app=app, principal=principal), peer_server, v1_server
            )
            assert await tcp_exchange(denied, payload) in (None, b""), app
            if still_served is not None:
                assert await answered(still_served, b"one"), app
    finally:
        peer_echo.close()
        for app in ("tcp-peer", "tcp-echo"):
            with contextlib.suppress(Exception):
                await s.delete("AuthorizationPolicy", f"deny-{app}")
