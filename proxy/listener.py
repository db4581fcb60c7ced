"""The inbound listeners' accept path: mTLS, plaintext, or either on one port.

Every accepted connection is classified before any protocol sees it by its first
byte, peeked at without consuming it (0x16, a TLS handshake record, means TLS; anything
else plaintext), and by the mode in force *at accept time* (PeerAuthentication can
change live):

- STRICT: TLS only. The handshake requires a client certificate chaining to the trust
  bundle; a plaintext client is closed without an answer.
- PERMISSIVE: TLS or plaintext as the first byte says — Istio's behaviour on one port.
- DISABLE: as PERMISSIVE. Our client sidecars always use mTLS towards an endpoint
  that registered an identity, so a DISABLE server still accepts their TLS; what
  DISABLE changes is that plaintext callers are accepted (as under PERMISSIVE).

`connect_accepted_socket` then hands the socket (with or without TLS) to the
listener's protocol, on asyncio and uvloop alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable

from mesh.logs import get_logger

log = get_logger("proxy.listener")

TLS_HANDSHAKE = 0x16
PEEK_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 10.0

Mode = str  # "STRICT" | "PERMISSIVE" | "DISABLE"


class HandshakeCounts:
    def __init__(self) -> None:
        self.tls = 0
        self.plaintext = 0
        self.refused_plaintext = 0
        self.failed = 0


class MeshListener:
    """A listening socket whose connections are TLS or plaintext as `mode()` says.

    Quacks like the part of `asyncio.Server` the sidecar uses (`close`, `sockets`)."""

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        context: Callable[[], ssl.SSLContext | None],
        mode: Callable[[], Mode],
        *,
        name: str = "inbound",
        tls_protocol_factory: Callable[
            [ssl.SSLContext, Callable[[bool], None]], asyncio.BaseProtocol
        ]
        | None = None,
    ):
        self.protocol_factory = protocol_factory
        # a protocol that runs the TLS handshake itself on the plain socket (the TCP
        # relays, `proxy.tls_pipe`): given the context and a callback for the
        # handshake's outcome (counted), it gets the socket as it came
        self.tls_protocol_factory = tls_protocol_factory
        self.context = context
        self.mode = mode
        self.name = name
        self.counts = HandshakeCounts()
        self.sockets: list[socket.socket] = []
        self._accepting: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, backlog: int = 1024) -> int:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sockets = [sock]
        self._accepting = loop.create_task(self._accept_forever(sock), name=f"{self.name}:accept")
        return int(sock.getsockname()[1])

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        for sock in self.sockets:
            sock.close()
        for task in list(self._pending):
            task.cancel()

    async def _accept_forever(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                log.warning("listener.accept_failed", listener=self.name, error=str(e))
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._dispatch(conn), name=f"{self.name}:handshake")
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _dispatch(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            mode = self.mode()
            first = await _peek(loop, conn)
            if first is None:
                conn.close()
                return
            tls = first == TLS_HANDSHAKE
            if not tls and mode == "STRICT":
                # refused without a handshake attempt; counted apart from TLS clients
                # whose handshake fails (a foreign or missing certificate)
                self.counts.refused_plaintext += 1
                log.debug("listener.plaintext_refused", listener=self.name, mode=mode)
                conn.close()
                return
            context = self.context() if tls else None
            if tls and context is None:
                # no certificate of our own (mTLS turned off): TLS cannot be answered
                self.counts.failed += 1
                conn.close()
                return
            if context is not None and self.tls_protocol_factory is not None:
                tls_factory = self.tls_protocol_factory
                await loop.connect_accepted_socket(
                    lambda: tls_factory(context, self._handshake_done), conn
                )
                return  # counted when the protocol's handshake ends
            await loop.connect_accepted_socket(
                self.protocol_factory,
                conn,
                ssl=context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if context is not None else None,
            )
        except asyncio.CancelledError:
            conn.close()
            raise
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            self.counts.failed += 1
            log.debug("listener.handshake_failed", listener=self.name, mode=mode, error=str(e))
            conn.close()
            return
        if tls:
            self.counts.tls += 1
        else:
            self.counts.plaintext += 1

    def _handshake_done(self, ok: bool) -> None:
        if ok:
            self.counts.tls += 1
        else:
            self.counts.failed += 1


async def _peek(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> int | None:
    """The first byte the client sent, left in the socket; None if it sent nothing
    (closed, or silent past PEEK_TIMEOUT_S)."""
    while True:
        try:
            data = conn.recv(1, socket.MSG_PEEK)
            return data[0] if data else None
        except BlockingIOError:
            pass
        except OSError:
            return None
        readable = loop.create_future()
        fd = conn.fileno()
        loop.add_reader(fd, _set_once, readable)
        try:
            async with asyncio.timeout(PEEK_TIMEOUT_S):
                await readable
        except TimeoutError:
            return None
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
