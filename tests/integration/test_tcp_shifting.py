"""Istio's tcp-traffic-shifting task, with the YAML of examples/tcp-echo/ and its
tcp-echo app: two tcp-echo instances (v1 prefixes "one", v2 "two") behind inbound
relays, reached through a client relay for tcp-echo:9000 (the mesh variant) and
through `meshctl gateway`'s TCP server (the task's files as written); TLS
PASSTHROUGH routed by SNI; real NATS, etcd, registry and config service.

Each instance would serve port 9000 on its own host; on one test host the two apps
need ports of their own, so each instance registers port 9000 -> the relay in front of
its app (as tests/integration/test_tcp_relay.py does)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
import ssl
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.hosts import ServiceRef
from mesh.messages import (
    DeleteReply,
    DeleteRequest,
    Instance,
    RegisterReply,
    RegisterRequest,
    ResourceRef,
)
from mesh.servers import free_port
from meshctl.sidecar_cmds import gateway_labels
from proxy.destinations import DestinationCache
from proxy.stats import ProxyStats
from proxy.tcp import TcpRelays, TcpUpstream
from tests.support import MeshHarness, applied, eventually

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
        await self.register(TCP_ECHO.name, version, app_port, PORT)

    async def register(self, service: str, version: str, app_port: int, port: int) -> None:
        """An inbound relay for the app on `app_port`, registered as `service`'s
        instance serving `port`."""
        relays = TcpRelays(self.cache, ProxyStats().registry)
        self.relays.append(relays)
        listeners = await relays.start_inbound("127.0.0.1", [app_port])
        instance = Instance(
            namespace="default",
            service=service,
            instance=f"{service}-{version}",
            version=version,
            address="127.0.0.1:9",
            tcp_ports=[port],
            tcp_listeners={str(port): listeners[str(app_port)]},
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


# ---------------------------------------------------------------- through the ingress gateway


def task_yaml(name: str, port: int) -> str:
    """The task's file as written, but for the gateway port: 31400 may be taken on a
    shared test host."""
    return (EXAMPLES / name).read_text().replace("31400", str(port))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(env: TcpEchoMesh) -> Any:
    """`meshctl gateway` as run by default: Istio's labels, which the task selects."""
    return await env.mesh.sidecar(
        "ingressgateway",
        "",
        app=False,
        gateway=True,
        gateway_port=free_port(),
        labels=gateway_labels("ingressgateway", {}),
    )


async def test_the_tasks_gateway_yaml_as_written(env: TcpEchoMesh, gw: Any) -> None:
    port = free_port()
    await applied(env.mesh, task_yaml("tcp-echo-all-v1.yaml", port), gw)

    async def v1_answers() -> bool:
        try:
            return await prefixes(port, 5) == Counter({"one": 5})
        except OSError:
            return False  # the listener for the new server is not open yet

    await eventually(v1_answers, timeout=20, interval=0.2)
    assert await prefixes(port, 20) == Counter({"one": 20})

    await applied(env.mesh, task_yaml("tcp-echo-20-v2.yaml", port), gw)
    seen = await prefixes(port, N)
    assert set(seen) == {"one", "two"}, seen
    assert 1 <= seen["two"] <= 44, seen

    # an AuthorizationPolicy selecting the gateway applies to its TCP servers too
    await applied(env.mesh, DENY_LOCAL.format(port=port), gw)

    async def refused() -> bool:
        try:
            return await asyncio.wait_for(say(port, "denied"), 5) == ""
        except (OSError, TimeoutError):
            return True

    await eventually(refused, timeout=20, interval=0.2)
    bus = env.mesh.bus
    await bus.request(
        bus.subjects.config_delete,
        DeleteRequest(
            refs=[ResourceRef(kind="AuthorizationPolicy", namespace="default", name="no-local")]
        ),
        DeleteReply,
    )


DENY_LOCAL = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-local, namespace: default}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  action: DENY
  rules:
  - from: [{{source: {{ipBlocks: [127.0.0.0/8]}}}}]
    to: [{{operation: {{ports: ["{port}"]}}}}]
"""


def certificate(host: str) -> tuple[bytes, bytes]:
    """A self-signed certificate for `host` (PEM) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def tls_app(host: str, tmp: Path) -> tuple[asyncio.Server, bytes]:
    """A TLS server for `host` answering `<host> <line>`; its certificate (PEM)."""
    cert, key = certificate(host)
    (tmp / f"{host}.crt").write_bytes(cert)
    (tmp / f"{host}.key").write_bytes(key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp / f"{host}.crt", tmp / f"{host}.key")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            line = await reader.readline()
            writer.write(host.encode() + b" " + line)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context), cert


PASSTHROUGH = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: tls-gateway}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {port}, name: tls, protocol: TLS}}
    tls: {{mode: PASSTHROUGH}}
    hosts: ["*.example.com"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: by-sni}}
spec:
  hosts: ["*.example.com"]
  gateways: [tls-gateway]
  tls:
  - match: [{{port: {port}, sniHosts: [a.example.com]}}]
    route: [{{destination: {{host: tls-a, port: {{number: 443}}}}}}]
  - match: [{{port: {port}, sniHosts: [b.example.com]}}]
    route: [{{destination: {{host: tls-b, port: {{number: 443}}}}}}]
"""


async def test_tls_passthrough_routes_by_sni(env: TcpEchoMesh, gw: Any, tmp_path: Path) -> None:
    apps = {h: await tls_app(h, tmp_path) for h in ("a.example.com", "b.example.com")}
    try:
        for host, (server, _) in apps.items():
            app_port = server.sockets[0].getsockname()[1]
            await env.register(f"tls-{host[0]}", "v1", app_port, 443)
        port = free_port()
        await applied(env.mesh, PASSTHROUGH.format(port=port), gw)

        async def hello(host: str) -> str | None:
            """The app's answer over TLS it terminates itself (its certificate checked
            by the client); None when the connection fails."""
            context = ssl.create_default_context(cadata=apps[host][1].decode())
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname=host
                )
            except (OSError, ssl.SSLError):
                return None
            try:
                writer.write(b"hello\n")
                return (await asyncio.wait_for(reader.readline(), 10)).decode()
            except (OSError, ssl.SSLError):
                return None
            finally:
                writer.close()

        async def routed() -> bool:
            return await hello("a.example.com") == "a.example.com hello\n"

        await eventually(routed, timeout=20, interval=0.2)
        assert await hello("b.example.com") == "b.example.com hello\n"
        # an SNI no rule names is closed before a byte reaches any app
        context = ssl.create_default_context()
        with pytest.raises((OSError, ssl.SSLError)):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="c.example.com"
            )
    finally:
        for server, _ in apps.values():
            server.close()
