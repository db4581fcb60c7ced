"""The sidecar's DNS server for its intercepted app (UDP and TCP on one port number;
docs/architecture.md §5.4): mesh names get the service's virtual IP, every other
query is forwarded to the host's resolver (the first `nameserver` of
/etc/resolv.conf, over the protocol the query came by: a truncated UDP answer makes
the client ask again over TCP) and its answer relayed."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from mesh.hosts import ServiceRef
from mesh.logs import get_logger
from proxy.intercept import dns

log = get_logger("proxy.intercept.dns")

FORWARD_TIMEOUT_S = 3.0
DNS_PORT = 53
MAX_IN_FLIGHT = 256
# a free port number for UDP may be taken for TCP: tried again with another
BIND_ATTEMPTS = 8
_TCP_LENGTH = struct.Struct("!H")
TCP_IDLE_S = 10.0

AddressOf = Callable[[ServiceRef], Awaitable[str]]


def host_resolver(resolv_conf: Path = Path("/etc/resolv.conf")) -> str:
    """The host's first nameserver ("" if none)."""
    try:
        for line in resolv_conf.read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                return words[1]
    except OSError:
        pass
    return ""


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server.received(data, addr)


class DnsServer:
    def __init__(
        self,
        address_of: AddressOf,
        namespace: str,
        registry: CollectorRegistry,
        upstream: str = "",
        upstream_port: int = DNS_PORT,
    ):
        self.address_of = address_of
        self.namespace = namespace
        self.upstream = upstream or host_resolver()
        self.upstream_port = upstream_port
        self.queries = Counter(
            "meshwork_proxy_dns_queries_total",
            "DNS queries of the intercepted app, by how they were answered",
            ["answer"],
            registry=registry,
        )
        self._udp: _Udp | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int = 0) -> int:
        """UDP and TCP on `host`:`port` (0: a port number free for both)."""
        loop = asyncio.get_running_loop()
        for attempt in range(BIND_ATTEMPTS):
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(host, port)
            )
            bound = int(transport.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound)
            except OSError:
                transport.close()
                if port or attempt == BIND_ATTEMPTS - 1:
                    raise
                continue
            self._udp = protocol
            log.info("dns.listening", address=f"{host}:{bound}", upstream=self.upstream or "-")
            return bound
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._tasks):
            task.cancel()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Length-prefixed messages (RFC 1035 §4.2.2), answered in order."""
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_S):
                    (length,) = _TCP_LENGTH.unpack(await reader.readexactly(_TCP_LENGTH.size))
                    data = await reader.readexactly(length)
                try:
                    reply = await self._reply(data, tcp=True)
                except Exception as e:
                    log.warning("dns.failed", error=str(e), kind=type(e).__name__)
                    reply = dns.error_reply(data, dns.RCODE_SERVFAIL)
                if reply is None:
                    return
                writer.write(_TCP_LENGTH.pack(len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def received(self, data: bytes, client: tuple[str, int]) -> None:
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.queries.labels("dropped").inc()
            return
        task = asyncio.get_running_loop().create_task(self._answer(data, client), name="dns:query")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, data: bytes, client: tuple[str, int]) -> None:
        try:
            reply = await self._reply(data)
        except Exception as e:
            log.warning("dns.failed", error=str(e), kind=type(e).__name__)
            reply = dns.error_reply(data, dns.RCODE_SERVFAIL)
        if reply is not None and self._udp is not None and self._udp.transport is not None:
            self._udp.transport.sendto(reply, client)

    async def _reply(self, data: bytes, tcp: bool = False) -> bytes | None:
        try:
            query = dns.parse_query(data)
        except dns.DnsFormatError:
            return await self._forward(data, tcp)
        ref = dns.mesh_service(query.name, self.namespace)
        if ref is not None and query.qclass == dns.QCLASS_IN:
            address = await self.address_of(ref)
            if address:
                self.queries.labels("mesh").inc()
                # a mesh name has an IPv4 address only: AAAA is answered empty (NODATA)
                found = [address] if query.qtype == dns.QTYPE_A else []
                return dns.answer(query, found)
        return await self._forward(data, tcp)

    async def _forward(self, data: bytes, tcp: bool = False) -> bytes | None:
        if not self.upstream:
            self.queries.labels("servfail").inc()
            return dns.error_reply(data, dns.RCODE_SERVFAIL)
        if tcp:
            return await self._forward_tcp(data)
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[bytes] = loop.create_future()

        class _Reply(asyncio.DatagramProtocol):
            def datagram_received(self, reply: bytes, _addr: tuple[str, int]) -> None:
                if not answered.done() and reply[:2] == data[:2]:
                    answered.set_result(reply)

        transport, _ = await loop.create_datagram_endpoint(
            _Reply, remote_addr=(self.upstream, self.upstream_port)
        )
        try:
            transport.sendto(data)
            async with asyncio.timeout(FORWARD_TIMEOUT_S):
                reply = await answered
        except TimeoutError:
            self.queries.labels("timeout").inc()
            return dns.error_reply(data, dns.RCODE_SERVFAIL)
        finally:
            with contextlib.suppress(Exception):
                transport.close()
        self.queries.labels("forwarded").inc()
        return reply

    async def _forward_tcp(self, data: bytes) -> bytes | None:
        try:
            async with asyncio.timeout(FORWARD_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(self.upstream, self.upstream_port)
                try:
                    writer.write(_TCP_LENGTH.pack(len(data)) + data)
                    (length,) = _TCP_LENGTH.unpack(await reader.readexactly(_TCP_LENGTH.size))
                    reply = await reader.readexactly(length)
                finally:
                    writer.close()
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            self.queries.labels("timeout").inc()
            return dns.error_reply(data, dns.RCODE_SERVFAIL)
        self.queries.labels("forwarded").inc()
        return reply
