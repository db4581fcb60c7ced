"""The sidecar's DNS server for its intercepted app (UDP; docs/architecture.md §5.4):
mesh names get the service's virtual IP, every other query is forwarded to the host's
resolver (the first `nameserver` of /etc/resolv.conf) and its answer relayed."""

from __future__ import annotations

import asyncio
import contextlib
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
    ):
        self.address_of = address_of
        self.namespace = namespace
        self.upstream = upstream or host_resolver()
        self.queries = Counter(
            "meshwork_proxy_dns_queries_total",
            "DNS queries of the intercepted app, by how they were answered",
            ["answer"],
            registry=registry,
        )
        self._udp: _Udp | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int = 0) -> int:
        transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Udp(self), local_addr=(host, port)
        )
        self._udp = protocol
        bound = int(transport.get_extra_info("sockname")[1])
        log.info("dns.listening", address=f"{host}:{bound}", upstream=self.upstream or "-")
        return bound

    def close(self) -> None:
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        for task in list(self._tasks):
            task.cancel()

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

    async def _reply(self, data: bytes) -> bytes | None:
        try:
            query = dns.parse_query(data)
        except dns.DnsFormatError:
            return await self._forward(data)
        ref = dns.mesh_service(query.name, self.namespace)
        if ref is not None and query.qclass == dns.QCLASS_IN:
            address = await self.address_of(ref)
            if address:
                self.queries.labels("mesh").inc()
                # a mesh name has an IPv4 address only: AAAA is answered empty (NODATA)
                found = [address] if query.qtype == dns.QTYPE_A else []
                return dns.answer(query, found)
        return await self._forward(data)

    async def _forward(self, data: bytes) -> bytes | None:
        if not self.upstream:
            self.queries.labels("servfail").inc()
            return dns.error_reply(data, dns.RCODE_SERVFAIL)
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[bytes] = loop.create_future()

        class _Reply(asyncio.DatagramProtocol):
            def datagram_received(self, reply: bytes, _addr: tuple[str, int]) -> None:
                if not answered.done() and reply[:2] == data[:2]:
                    answered.set_result(reply)

        transport, _ = await loop.create_datagram_endpoint(
            _Reply, remote_addr=(self.upstream, DNS_PORT)
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
