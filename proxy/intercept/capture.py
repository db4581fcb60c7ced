"""The capture listener: where the interception rules send the app's outbound TCP
(docs/architecture.md §5.4).

Per accepted connection: the original destination (`SO_ORIGINAL_DST`, kept by the
redirect's conntrack entry), its `Target` (a service's virtual IP, a registered
instance, or unknown), the protocol (`proxy.intercept.detect` on peeked bytes, which
stay in the socket; opaque ports skip it), then `targets.decide`:

- HTTP/1.1 and h2c: the socket is handed to the outbound HTTP engine and router
  (`HttpServerProtocol` + `RouteHandler`, the same path as the HTTP_PROXY listener):
  the Host (or `:authority`) names the service; where it names no mesh service but
  the destination was a service's virtual IP or instance, that service is used.
- TCP and TLS: relayed by `TcpRelays` (mTLS to one endpoint of the service's TCP
  port, or to the instance's own TCP listener); unknown destinations pass through
  (ALLOW_ANY) or are reset (REGISTRY_ONLY).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter

from mesh.hosts import canonical_host, service_of_host
from mesh.logs import get_logger
from proxy.http import Exchange, Limits, Request
from proxy.http.listen import ConnectionSet
from proxy.http.server import HttpServerProtocol
from proxy.intercept.detect import DETECT_TIMEOUT_S, MAX_DETECT_BYTES, Detected, detect
from proxy.intercept.targets import Action, CaptureTargets, Target, decide
from proxy.tcp import TcpRelays, TcpUpstream

log = get_logger("proxy.intercept.capture")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, level SOL_IP
_SOCKADDR_IN = struct.Struct("!HH4s8x")  # family is host order, but only port/addr are read
LISTENER = "capture"
# while a partial prefix waits for the rest of its bytes
PARTIAL_POLL_S = 0.005

Handler = Callable[[Request, Exchange], Awaitable[None]]


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """The destination the client connected to before the redirect."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
    _family, port, addr, *_ = _SOCKADDR_IN.unpack(raw)
    return str(ipaddress.IPv4Address(addr)), port


class CaptureStats:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Counter(
            "meshwork_proxy_capture_connections_total",
            "Captured outbound connections, by detected protocol and action",
            ["protocol", "action"],
            registry=registry,
        )
        self.detect_timeouts = Counter(
            "meshwork_proxy_capture_detection_timeouts_total",
            "Captured connections silent for the detection timeout (taken for TCP)",
            registry=registry,
        )


class CaptureListener:
    def __init__(
        self,
        *,
        http_handler: Handler,
        limits: Limits,
        tcp: TcpRelays,
        targets: CaptureTargets,
        registry: CollectorRegistry,
        namespace: str,
        policy: Callable[[], str],
        opaque_ports: tuple[int, ...] = (),
        detect_timeout_s: float = DETECT_TIMEOUT_S,
    ):
        self.http_handler = http_handler
        self.limits = limits
        self.tcp = tcp
        self.targets = targets
        self.namespace = namespace
        self.policy = policy
        self.opaque_ports = frozenset(opaque_ports)
        self.detect_timeout_s = detect_timeout_s
        self.stats = CaptureStats(registry)
        self.port = 0
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        # captured HTTP connections, closed with the listener
        self.http_connections = ConnectionSet()
        self._own: tuple[str, int] = ("", 0)

    async def start(self, host: str, port: int = 0) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._own = (host, self.port)
        self._accepting = asyncio.get_running_loop().create_task(
            self._accept_forever(sock), name="capture:accept"
        )
        log.info("capture.listening", address=f"{host}:{self.port}")
        return self.port

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        if self._sock is not None:
            self._sock.close()
        for task in list(self._pending):
            task.cancel()
        self.http_connections.abort()

    async def _accept_forever(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:
                log.warning("capture.accept_failed", error=str(e))
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._dispatch(conn), name="capture:dispatch")
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _dispatch(self, conn: socket.socket) -> None:
        try:
            host, port = original_destination(conn)
            if (host, port) == self._own:
                # not redirected: someone connected to this listener itself (it would
                # route anything it is sent, as if captured)
                log.info("capture.not_redirected", destination=f"{host}:{port}")
                _reset(conn)
                return
            target, protocol = await asyncio.gather(
                self.targets.resolve(host, port), self._detect(conn, port)
            )
            action = decide(target, protocol, self.policy())
            self.stats.connections.labels(protocol.value, action.value).inc()
            log.debug(
                "capture.accepted",
                destination=f"{host}:{port}",
                service=str(target.service) if target.service else "-",
                protocol=protocol.value,
                action=action.value,
            )
            await self._carry_out(conn, action, target, host, port)
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as e:
            log.warning("capture.failed", error=str(e), kind=type(e).__name__)
            _reset(conn)

    async def _carry_out(
        self, conn: socket.socket, action: Action, target: Target, host: str, port: int
    ) -> None:
        if action is Action.REFUSE:
            log.info("capture.refused", destination=f"{host}:{port}", reason="REGISTRY_ONLY")
            _reset(conn)
        elif action is Action.ROUTE_HTTP:
            handler = self._http_for(target)
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: HttpServerProtocol(handler, self.limits, self.http_connections), conn
            )
        elif action is Action.RELAY_SERVICE:
            assert target.service is not None
            upstream = TcpUpstream(target.service, target.port, 0)
            await self.tcp.adopt(conn, LISTENER, self.tcp.service_opener(upstream))
        elif action is Action.RELAY_ENDPOINT:
            assert target.endpoint is not None
            relay_host, _, relay_port = target.tcp_listener.rpartition(":")
            opener = self.tcp.address_opener(
                relay_host.strip("[]"), int(relay_port), target.endpoint.identity
            )
            await self.tcp.adopt(conn, LISTENER, opener)
        else:  # PASSTHROUGH
            await self.tcp.adopt(conn, LISTENER, self.tcp.address_opener(host, port))

    def _http_for(self, target: Target) -> Handler:
        """The router, with the target's service as the authority where the request's
        own names no mesh service (a virtual IP or an instance's address)."""
        if target.service is None:
            return self.http_handler
        fallback = (
            f"{target.service.fqdn}:{target.port}"
            if target.endpoint is None
            else (target.service.fqdn)
        )
        namespace, route = self.namespace, self.http_handler

        async def handler(req: Request, ex: Exchange) -> None:
            if service_of_host(canonical_host(req.authority, namespace)) is None:
                req.authority = fallback
                req.headers = [(n, v) for n, v in req.headers if n != "host"]
                req.headers.append(("host", fallback))
            await route(req, ex)

        return handler

    async def _detect(self, conn: socket.socket, port: int) -> Detected:
        """The protocol from peeked bytes (left in the socket), within the timeout."""
        if port in self.opaque_ports:
            return Detected.TCP
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.detect_timeout_s
        while True:
            try:
                prefix = conn.recv(MAX_DETECT_BYTES, socket.MSG_PEEK)
            except BlockingIOError:
                prefix = None
            if prefix is not None:
                found = detect(prefix)
                if found is not None:
                    return found
                if not prefix or len(prefix) >= MAX_DETECT_BYTES:
                    return Detected.TCP  # closed, or not one of ours
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.stats.detect_timeouts.inc()
                return Detected.TCP
            if prefix:
                # part of a prefix is there: the socket stays readable, so poll briefly
                await asyncio.sleep(min(PARTIAL_POLL_S, remaining))
            else:
                await _readable(loop, conn, remaining)


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket, timeout: float) -> None:
    """Until more bytes arrive or `timeout` passes."""
    ready = loop.create_future()
    fd = conn.fileno()
    loop.add_reader(fd, _set_once, ready)
    try:
        async with asyncio.timeout(timeout):
            await ready
    except TimeoutError:
        pass
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(fd)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _reset(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
