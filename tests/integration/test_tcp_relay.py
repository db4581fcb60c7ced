"""L4 TCP relays: client relay -> server relay -> TCP app, with real NATS, etcd, registry
and config service. The client relay finds the servers through a real `DestinationCache`
following what the "server" instances registered over the bus."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import socket
import ssl
import struct
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from mesh.compiled import OutlierDetection, RouteTable, TrafficPolicy
from mesh.hosts import ServiceRef
from mesh.messages import (
    DeregisterReply,
    DeregisterRequest,
    Instance,
    InstanceStatus,
    RegisterReply,
    RegisterRequest,
)
from mesh.servers import free_port
from proxy.destinations import DestinationCache
from proxy.stats import ProxyStats
from proxy.tcp import CONNECT_ATTEMPTS, TcpRelays, TcpUpstream
from tests.support import MeshHarness, eventually

SERVICE = ServiceRef("default", "redis")
PORT = 6379
UPSTREAM = TcpUpstream(SERVICE, PORT, local_port=0)


class EchoServer:
    """A TCP app: echoes what it reads; once the client half-closes, it sends `|<name>`
    and closes, so every reply says which instance served it and that the FIN got through."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.connections = 0
        self.active = 0
        self.resets = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> EchoServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.active += 1
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
            writer.write(b"|" + self.name.encode())
            await writer.drain()
        except ConnectionError:
            self.resets += 1
        finally:
            self.active -= 1
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class TcpMesh:
    """Fake "redis" instances (echo app + inbound relay, registered over the bus) and a
    client relay in front of them."""

    def __init__(self, mesh: MeshHarness) -> None:
        self.mesh = mesh
        self.cache = DestinationCache(mesh.bus, on_change=lambda: None, rand=random.Random(7))
        self.client_stats = ProxyStats()
        self.client = TcpRelays(self.cache, self.client_stats.registry, random.Random(1))
        self.port = 0
        self.apps: dict[str, EchoServer] = {}
        self.server_relays: dict[str, TcpRelays] = {}
        self.server_stats: dict[str, ProxyStats] = {}
        self.leases: dict[str, int] = {}
        self.instances: dict[str, Instance] = {}

    async def start_client(self) -> None:
        await self.client.start_outbound([UPSTREAM])
        self.port = self.client.ports[UPSTREAM.listener]

    async def add_server(self, name: str) -> EchoServer:
        app = await EchoServer(name).start()
        stats = ProxyStats()
        relays = TcpRelays(self.cache, stats.registry)
        self.apps[name], self.server_relays[name], self.server_stats[name] = app, relays, stats
        listeners = await relays.start_inbound("127.0.0.1", [app.port])
        assert listeners == {str(app.port): f"127.0.0.1:{relays.ports[f'tcp-inbound:{app.port}']}"}
        # Each instance would serve 6379 on its own host; on one test host the echo apps
        # need ports of their own, so the instance declares 6379 -> the relay for its app.
        await self.register(name, {str(PORT): listeners[str(app.port)]})
        return app

    async def register(
        self, name: str, tcp_listeners: dict[str, str], status: InstanceStatus = "healthy"
    ) -> RegisterReply:
        instance = Instance(
            namespace=SERVICE.namespace, service=SERVICE.name, instance=name,
            address="127.0.0.1:9", tcp_ports=[PORT], tcp_listeners=tcp_listeners, status=status,
        )  # fmt: skip
        bus = self.mesh.bus
        reply = await bus.request(
            bus.subjects.registry_register,
            RegisterRequest(instance=instance, ttl=60, lease_id=self.leases.get(name, 0)),
            RegisterReply,
        )
        self.leases[name] = reply.lease_id
        self.instances[name] = instance
        return reply

    async def deregister(self, name: str) -> None:
        bus = self.mesh.bus
        await bus.request(
            bus.subjects.registry_deregister,
            DeregisterRequest(SERVICE.namespace, SERVICE.name, name, self.leases.pop(name)),
            DeregisterReply,
        )

    async def until_client_sees(self, statuses: dict[str, str]) -> None:
        """Wait until the client's cache holds exactly these instances, in these states."""

        async def seen() -> bool:
            dest = await self.cache.get(SERVICE)
            eps = dest.endpoints.endpoints if dest.endpoints else []
            return {ep.instance: ep.status for ep in eps} == statuses

        await eventually(seen, timeout=10)

    def client_metric(self, name: str) -> float:
        value = self.client_stats.registry.get_sample_value(name, {"listener": UPSTREAM.listener})
        return value or 0.0

    async def close(self) -> None:
        relays = [self.client, *self.server_relays.values()]
        for r in relays:
            r.close()
        for r in relays:
            await asyncio.wait_for(r.wait_closed(), 5)
        for app in self.apps.values():
            app.close()


@contextlib.asynccontextmanager
async def tcp_mesh(nats_url: str, etcd_url: str, prefix: str) -> AsyncIterator[TcpMesh]:
    async with MeshHarness(nats_url, etcd_url, prefix) as mesh:
        env = TcpMesh(mesh)
        try:
            await env.start_client()
            yield env
        finally:
            await env.close()


@pytest.fixture
async def tcp(nats_server, etcd_server, prefix) -> AsyncIterator[TcpMesh]:
    async with tcp_mesh(nats_server.url, etcd_server.url, prefix) as env:
        yield env


async def exchange(port: int, data: bytes) -> bytes:
    """Send `data`, half-close, and read the reply until the other side closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def closed_without_reply(port: int, data: bytes) -> bool:
    """The relay accepted, then reset (or closed) the connection without sending anything."""
    try:
        return await exchange(port, data) == b""
    except ConnectionError:
        return True


def served_by(reply: bytes, sent: bytes) -> str:
    assert reply.startswith(sent) and reply[len(sent) : len(sent) + 1] == b"|", reply[:80]
    return reply[len(sent) + 1 :].decode()


async def spread(port: int, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for i in range(n):
        payload = f"ping {i}".encode()
        seen[served_by(await exchange(port, payload), payload)] += 1
    return seen


async def test_round_trip_spread_over_instances_and_counted(tcp: TcpMesh) -> None:
    await tcp.add_server("redis-a")
    await tcp.add_server("redis-b")
    await tcp.until_client_sees({"redis-a": "healthy", "redis-b": "healthy"})
    payloads = [f"ping {i}".encode() for i in range(10)]
    replies = [await exchange(tcp.port, p) for p in payloads]
    assert Counter(served_by(r, p) for r, p in zip(replies, payloads, strict=True)) == Counter(
        {"redis-a": 5, "redis-b": 5}
    )
    assert tcp.apps["redis-a"].connections == tcp.apps["redis-b"].connections == 5
    await eventually(lambda: tcp.client.active_connections() == 0)
    assert tcp.client_metric("meshwork_proxy_tcp_connections_opened_total") == 10
    assert tcp.client_metric("meshwork_proxy_tcp_connections_closed_total") == 10
    assert tcp.client_metric("meshwork_proxy_tcp_sent_bytes_total") == sum(map(len, payloads))
    assert tcp.client_metric("meshwork_proxy_tcp_received_bytes_total") == sum(map(len, replies))
    assert tcp.client_metric("meshwork_proxy_tcp_active_connections") == 0
    server = tcp.server_stats["redis-a"].registry
    inbound = {"listener": f"tcp-inbound:{tcp.apps['redis-a'].port}"}
    assert server.get_sample_value("meshwork_proxy_tcp_connections_opened_total", inbound) == 5


async def test_five_megabytes_stream_both_ways(tcp: TcpMesh) -> None:
    await tcp.add_server("redis-a")
    await tcp.until_client_sees({"redis-a": "healthy"})
    data = os.urandom(5 * 1024 * 1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp.port)

    async def send() -> None:
        view = memoryview(data)
        for i in range(0, len(data), 64 * 1024):
            writer.write(view[i : i + 64 * 1024])
            await writer.drain()
        writer.write_eof()

    sending = asyncio.create_task(send())
    # read while sending: an echo that nobody reads would stall the upload (flow control)
    reply = await asyncio.wait_for(reader.read(), 30)
    await sending
    writer.close()
    assert len(reply) == len(data) + len(b"|redis-a")
    assert reply == data + b"|redis-a"
    assert tcp.client_metric("meshwork_proxy_tcp_sent_bytes_total") == len(data)


async def test_half_close_keeps_the_other_direction_open(tcp: TcpMesh) -> None:
    app = await tcp.add_server("redis-a")
    await tcp.until_client_sees({"redis-a": "healthy"})
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp.port)
    # interactive before any FIN
    writer.write(b"first")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"first"
    writer.write(b"second")
    writer.write_eof()
    # the app saw the FIN (it answers its name only then) and could still send to us
    assert await asyncio.wait_for(reader.read(), 5) == b"second|redis-a"
    writer.close()
    await eventually(lambda: app.active == 0 and tcp.client.active_connections() == 0)
    await eventually(lambda: tcp.server_relays["redis-a"].active_connections() == 0)
    assert app.resets == 0


async def test_app_reading_slowly_pushes_back_to_the_client(tcp: TcpMesh) -> None:
    """Flow control: while the app does not read, the relay stops reading the client, so
    the client's writes block instead of piling up in the relay's memory; when the app
    reads again, everything arrives."""
    release = asyncio.Event()
    received = 0

    async def slow_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await release.wait()
        while chunk := await reader.read(1 << 20):
            received += len(chunk)
        writer.close()

    listening = socket.create_server(("127.0.0.1", 0))
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # inherited on accept
    app = await asyncio.start_server(slow_app, sock=listening)
    relays = tcp.server_relays["slow"] = TcpRelays(tcp.cache, ProxyStats().registry)
    listeners = await relays.start_inbound("127.0.0.1", [listening.getsockname()[1]])
    host, port = next(iter(listeners.values())).rsplit(":", 1)
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        chunk = b"x" * (1 << 20)
        limit = 256  # MB: beyond any kernel buffering between client and app
        written = 0
        blocked = False
        while written < limit * len(chunk):
            writer.write(chunk)
            written += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:
                blocked = True
                break
        assert blocked, f"wrote {written >> 20} MB without being pushed back"
        release.set()
        await asyncio.wait_for(writer.drain(), 30)
        writer.write_eof()
        await eventually(lambda: received == written, timeout=30)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        app.close()


async def test_removed_endpoint_gets_no_new_connections(tcp: TcpMesh) -> None:
    await tcp.add_server("redis-a")
    b = await tcp.add_server("redis-b")
    await tcp.until_client_sees({"redis-a": "healthy", "redis-b": "healthy"})
    # a long-lived connection that landed on b
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    while b.active == 0:
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp.port)
        writer.write(b"hi")
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
        held.append((reader, writer))
    on_b = held[-1]
    await tcp.deregister("redis-b")
    await tcp.until_client_sees({"redis-a": "healthy"})
    before = b.connections
    assert await spread(tcp.port, 6) == Counter({"redis-a": 6})
    assert b.connections == before
    # removing an endpoint does not cut the connections it already has
    on_b[1].write(b"still there")
    on_b[1].write_eof()
    assert await asyncio.wait_for(on_b[0].read(), 5) == b"still there|redis-b"
    for _, writer in held:
        writer.close()


async def test_draining_endpoint_used_only_when_all_drain(tcp: TcpMesh) -> None:
    await tcp.add_server("redis-a")
    await tcp.add_server("redis-b")
    await tcp.register("redis-b", tcp.instances["redis-b"].tcp_listeners, status="draining")
    await tcp.until_client_sees({"redis-a": "healthy", "redis-b": "draining"})
    assert await spread(tcp.port, 6) == Counter({"redis-a": 6})
    await tcp.register("redis-a", tcp.instances["redis-a"].tcp_listeners, status="draining")
    await tcp.until_client_sees({"redis-a": "draining", "redis-b": "draining"})
    assert await spread(tcp.port, 6) == Counter({"redis-a": 3, "redis-b": 3})


async def test_refused_endpoint_is_skipped(tcp: TcpMesh) -> None:
    await tcp.add_server("redis-a")
    # registered, but nothing listens there any more (a crashed sidecar's stale record)
    await tcp.register("redis-dead", {str(PORT): f"127.0.0.1:{free_port()}"})
    await tcp.until_client_sees({"redis-a": "healthy", "redis-dead": "healthy"})
    # a connection whose first connect is refused goes on to the next endpoint
    assert await spread(tcp.port, 10) == Counter({"redis-a": 10})
    failed = tcp.client_metric("meshwork_proxy_tcp_upstream_connect_failures_total")
    # without outlier detection round robin keeps trying the dead one (as Envoy does)
    assert failed >= 1
    # with it (the DestinationRule's, on the TCP cluster) one refused connect ejects it
    dest = await tcp.cache.get(SERVICE)
    detection = OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100)
    assert tcp.cache.apply_route(
        RouteTable(
            namespace=SERVICE.namespace,
            service=SERVICE.name,
            host=SERVICE.fqdn,
            revision=(dest.table.revision if dest.table else 0) + 1000,
            traffic_policy=TrafficPolicy(outlier_detection=detection),
        )
    )
    assert await spread(tcp.port, 10) == Counter({"redis-a": 10})
    assert tcp.client_metric("meshwork_proxy_tcp_upstream_connect_failures_total") <= failed + 1


async def test_client_closed_when_no_endpoint_accepts(tcp: TcpMesh) -> None:
    for i in range(CONNECT_ATTEMPTS + 1):
        await tcp.register(f"redis-dead-{i}", {str(PORT): f"127.0.0.1:{free_port()}"})
    await tcp.until_client_sees({f"redis-dead-{i}": "healthy" for i in range(CONNECT_ATTEMPTS + 1)})
    assert await closed_without_reply(tcp.port, b"anyone?")
    assert (
        tcp.client_metric("meshwork_proxy_tcp_upstream_connect_failures_total") == CONNECT_ATTEMPTS
    )
    await eventually(lambda: tcp.client.active_connections() == 0)
    assert tcp.client_metric("meshwork_proxy_tcp_connections_closed_total") == 1


async def test_client_closed_when_service_has_no_tcp_endpoint(tcp: TcpMesh) -> None:
    # an instance that serves another TCP port only
    await tcp.register("redis-other", {"5432": "127.0.0.1:1"})
    await tcp.until_client_sees({"redis-other": "healthy"})
    assert await closed_without_reply(tcp.port, b"anyone?")
    assert tcp.client_metric("meshwork_proxy_tcp_upstream_connect_failures_total") == 0


async def test_inbound_closes_client_when_app_is_down(tcp: TcpMesh) -> None:
    stats = ProxyStats()
    relays = tcp.server_relays["down"] = TcpRelays(tcp.cache, stats.registry)
    app_port = free_port()
    listeners = await relays.start_inbound("127.0.0.1", [app_port])
    host, port = listeners[str(app_port)].rsplit(":", 1)
    assert await closed_without_reply(int(port), b"hello")
    listener = {"listener": f"tcp-inbound:{app_port}"}
    failures = "meshwork_proxy_tcp_upstream_connect_failures_total"
    assert stats.registry.get_sample_value(failures, listener) == 1
    assert host == "127.0.0.1"


async def test_reset_by_client_closes_the_app_side(tcp: TcpMesh) -> None:
    app = await tcp.add_server("redis-a")
    await tcp.until_client_sees({"redis-a": "healthy"})
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp.port)
    writer.write(b"hi")
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
    assert app.active == 1
    # close with SO_LINGER 0: an RST, not a FIN
    writer.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    writer.transport.abort()
    await eventually(lambda: app.active == 0)
    await eventually(lambda: tcp.client.active_connections() == 0)
    await eventually(lambda: tcp.server_relays["redis-a"].active_connections() == 0)
    # the app's side ended without the FIN that a clean close sends: no `|name` was owed
    assert app.resets == 1


async def test_close_aborts_relayed_connections_and_stops_accepting(tcp: TcpMesh) -> None:
    app = await tcp.add_server("redis-a")
    await tcp.until_client_sees({"redis-a": "healthy"})
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp.port)
    writer.write(b"hi")
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
    tcp.client.close()
    await asyncio.wait_for(tcp.client.wait_closed(), 5)
    assert tcp.client.active_connections() == 0
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    await eventually(lambda: app.active == 0)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", tcp.port)
    writer.close()


# `meshctl sidecar` runs on uvloop, which schedules reads differently (it starts reading
# an accepted socket whatever `connection_made` did): every scenario above, again on it.
SCENARIOS = {
    name: fn
    for name, fn in list(globals().items())
    if name.startswith("test_") and inspect.iscoroutinefunction(fn)
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_on_uvloop(nats_server, etcd_server, prefix, scenario: str) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def run() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        async with tcp_mesh(nats_server.url, etcd_server.url, prefix) as env:
            await SCENARIOS[scenario](env)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


async def test_relay_between_sidecars_is_mtls_and_strict_refuses_plaintext(
    nats_server, etcd_server, prefix
) -> None:
    """Real sidecars with certificates: the client relay reaches the server's TCP
    listener over mTLS (the server listener counts a TLS connection and no plaintext);
    under STRICT a plaintext client straight to that listener gets nothing."""
    app = await EchoServer("redis-0").start()
    local = free_port()
    try:
        async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
            server = await mesh.sidecar("redis", app=False, tcp_ports=[app.port])
            client = await mesh.sidecar("worker", tcp_upstreams=[f"redis:{app.port}={local}"])
            assert client.identity is not None and server.identity is not None
            reply = await exchange(local, b"ping")
            assert served_by(reply, b"ping") == "redis-0"
            (listener,) = [
                x
                for x in server.dataplane.tcp._servers
                if getattr(x, "name", "").startswith("tcp-inbound")
            ]
            assert listener.counts.tls >= 1
            assert listener.counts.plaintext == 0
            relay_port = server.dataplane.tcp.ports[f"tcp-inbound:{app.port}"]

            # between sidecars the app's bytes travel as plain TLS data, as Envoy's
            # tcp_proxy sends them (architecture §5.1): any TLS client with a mesh
            # certificate is echoed byte for byte, no framing of ours around them
            context = client.dataplane.tcp.tls.client_context()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", relay_port, ssl=context, server_hostname=""
            )
            try:
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
                # a FIN without a close_notify is a cut stream: the app is reset, not
                # told the upload ended
                resets = app.resets
                writer.transport.get_extra_info("socket").shutdown(socket.SHUT_WR)
                await eventually(lambda: app.resets == resets + 1, timeout=10)
            finally:
                writer.close()
            # a TLS client without a mesh certificate fails the handshake, counted so
            failed = listener.counts.failed
            anonymous = ssl.create_default_context()
            anonymous.check_hostname, anonymous.verify_mode = False, ssl.CERT_NONE
            with contextlib.suppress(OSError, ssl.SSLError):
                _r, w = await asyncio.open_connection(
                    "127.0.0.1", relay_port, ssl=anonymous, server_hostname=""
                )
                w.write(b"ping")  # TLS 1.3: the refusal comes after the client's flight
                await asyncio.wait_for(_r.read(), 10)
                w.close()
            await eventually(lambda: listener.counts.failed == failed + 1, timeout=10)

            await mesh.apply(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
                "metadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRICT}}\n"
            )
            await eventually(lambda: server.inbound_policy.mode(app.port) == "STRICT", timeout=5)
            before = app.connections
            assert await closed_without_reply(relay_port, b"plain")
            assert app.connections == before
            # the mesh path still works under STRICT
            assert served_by(await exchange(local, b"again"), b"again") == "redis-0"
    finally:
        app.close()
