"""The sidecar's DNS server (proxy.intercept.dns_server) over real UDP and TCP sockets:
mesh names answered with the virtual IP the directory gives, other names forwarded to
the upstream resolver by the protocol they came by, SERVFAIL when it does not answer."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from mesh.hosts import ServiceRef
from proxy.intercept import dns
from proxy.intercept.dns_server import DnsServer

REVIEWS_VIP = "240.240.7.9"


def query(name: str, qtype: int = dns.QTYPE_A, qid: int = 0x4242) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return (
        struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack("!HH", qtype, 1)
    )


def answers(reply: bytes) -> list[str]:
    """The A records of a reply built by `dns.answer` (or an upstream like it)."""
    (count,) = struct.unpack_from("!H", reply, 6)
    return [
        ".".join(
            str(b) for b in reply[len(reply) - 4 * (count - i) : len(reply) - 4 * (count - i) + 4]
        )
        for i in range(count)
    ]


async def address_of(ref: ServiceRef) -> str:
    return REVIEWS_VIP if ref == ServiceRef("default", "reviews") else ""


class Upstream(asyncio.DatagramProtocol):
    """A resolver that knows one name (UDP and TCP), or answers nothing (`silent`)."""

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.transport: asyncio.DatagramTransport | None = None
        self.asked: list[str] = []

    def reply(self, data: bytes, proto: str) -> bytes:
        q = dns.parse_query(data)
        self.asked.append(f"{proto}:{q.name}")
        return dns.answer(q, ["192.0.2.80"] if q.name == "example.org" else [], rcode=0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.silent and self.transport is not None:
            self.transport.sendto(self.reply(data, "udp"), addr)

    async def tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        reply = self.reply(await reader.readexactly(length), "tcp")
        writer.write(struct.pack("!H", len(reply)) + reply)
        await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def resolver(silent: bool = False) -> AsyncIterator[tuple[DnsServer, int, Upstream]]:
    loop = asyncio.get_running_loop()
    upstream = Upstream(silent)
    for _attempt in range(8):  # a port number free for UDP may be taken for TCP
        transport, _ = await loop.create_datagram_endpoint(
            lambda: upstream, local_addr=("127.0.0.1", 0)
        )
        port = transport.get_extra_info("sockname")[1]
        try:
            tcp = await asyncio.start_server(upstream.tcp, "127.0.0.1", port)
            break
        except OSError:
            transport.close()
    else:
        pytest.fail("no port number free for both UDP and TCP")
    server = DnsServer(address_of, "default", CollectorRegistry(), "127.0.0.1", port)
    bound = await server.start("127.0.0.1")
    try:
        yield server, bound, upstream
    finally:
        server.close()
        transport.close()
        tcp.close()


async def ask_udp(port: int, data: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, reply: bytes, _addr: tuple[str, int]) -> None:
            if not got.done():
                got.set_result(reply)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(data)
        return await asyncio.wait_for(got, 10)
    finally:
        transport.close()


async def ask_tcp(port: int, *messages: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = []
    for data in messages:
        writer.write(struct.pack("!H", len(data)) + data)
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        replies.append(await reader.readexactly(length))
    writer.close()
    return replies


async def test_mesh_names_answered_others_forwarded_udp_and_tcp() -> None:
    async with resolver() as (server, port, upstream):
        for name in ("reviews", "reviews.default", "reviews.default.svc.cluster.local"):
            reply = await ask_udp(port, query(name))
            assert reply[:2] == b"\x42\x42" and answers(reply) == [REVIEWS_VIP], name
        assert answers(await ask_udp(port, query("reviews", dns.QTYPE_AAAA))) == []
        assert answers(await ask_udp(port, query("example.org"))) == ["192.0.2.80"]
        # TCP: two queries on one connection, one mesh name, one forwarded over TCP
        mesh_reply, forwarded = await ask_tcp(port, query("reviews"), query("example.org"))
        assert answers(mesh_reply) == [REVIEWS_VIP]
        assert answers(forwarded) == ["192.0.2.80"]
        # a name the registry has no service for is the upstream's to answer
        await ask_udp(port, query("ratings"))
        assert upstream.asked == ["udp:example.org", "tcp:example.org", "udp:ratings"]
        assert server.queries.labels("mesh")._value.get() == 5


async def test_a_silent_upstream_gives_servfail(monkeypatch) -> None:
    from proxy.intercept import dns_server

    monkeypatch.setattr(dns_server, "FORWARD_TIMEOUT_S", 0.2)
    async with resolver(silent=True) as (_server, port, _upstream):
        reply = await ask_udp(port, query("example.org"))
        assert reply[:2] == b"\x42\x42"
        assert struct.unpack_from("!H", reply, 2)[0] & 0xF == 2  # SERVFAIL


async def test_garbage_is_not_answered_as_a_mesh_name(monkeypatch) -> None:
    from proxy.intercept import dns_server

    monkeypatch.setattr(dns_server, "FORWARD_TIMEOUT_S", 0.2)
    async with resolver(silent=True) as (_server, port, _upstream):
        # a response (QR set) is not a query: forwarded, the silent upstream gives SERVFAIL
        bogus = bytearray(query("reviews"))
        bogus[2] |= 0x80
        reply = await ask_udp(port, bytes(bogus))
        assert REVIEWS_VIP not in answers(reply)
        assert struct.unpack_from("!H", reply, 2)[0] & 0xF == 2
