"""Starting listeners, tracking their connections, and choosing the event loop."""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module
from typing import Protocol

from .limits import Limits
from .server import Handler, HttpServerProtocol
from .target import DEFAULT_NORMALIZATION, Normalization


class Drainable(Protocol):
    """A served connection, HTTP/1.1 or HTTP/2."""

    def close_when_idle(self) -> None: ...
    def abort(self) -> None: ...


class ConnectionSet:
    """The live connections of one or more listeners, for an ordered shutdown.

    `asyncio.Server.close()` only stops accepting; `drain()` then lets each connection
    finish the response it is writing, closes idle ones, and resets whatever remains
    after the grace period.
    """

    def __init__(self) -> None:
        self._protocols: set[Drainable] = set()
        self._empty: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._protocols)

    def add(self, protocol: Drainable) -> None:
        self._protocols.add(protocol)

    def discard(self, protocol: Drainable) -> None:
        self._protocols.discard(protocol)
        if not self._protocols and self._empty is not None:
            self._empty.set()

    def close_idle(self) -> None:
        """Close idle connections now and every other one after its current response."""
        for protocol in list(self._protocols):
            protocol.close_when_idle()

    def abort(self) -> None:
        for protocol in list(self._protocols):
            protocol.abort()

    async def drain(self, grace: float) -> None:
        """close_idle(), wait up to `grace` seconds for connections to end, abort the rest."""
        self.close_idle()
        if self._protocols:
            self._empty = asyncio.Event()
            try:
                async with asyncio.timeout(grace):
                    await self._empty.wait()
            except TimeoutError:
                self.abort()
            finally:
                self._empty = None


async def serve(
    handler: Handler,
    host: str | None,
    port: int,
    *,
    ssl: ssl_module.SSLContext | None = None,
    limits: Limits | None = None,
    sock: socket.socket | None = None,
    connections: ConnectionSet | None = None,
    backlog: int = 1024,
    normalization: Normalization = DEFAULT_NORMALIZATION,
) -> asyncio.Server:
    """Listen on host:port (or `sock`) and run `handler` for every request.

    Pass a ConnectionSet to be able to drain the listener's connections on shutdown;
    `normalization` chooses how request paths and Hosts are normalised.
    """
    loop = asyncio.get_running_loop()
    resolved = limits if limits is not None else Limits()

    def protocol_factory() -> HttpServerProtocol:
        return HttpServerProtocol(handler, resolved, connections, normalization)

    if sock is not None:
        return await loop.create_server(protocol_factory, sock=sock, ssl=ssl, backlog=backlog)
    return await loop.create_server(
        protocol_factory, host, port, ssl=ssl, backlog=backlog, reuse_address=True
    )


def install_uvloop() -> bool:
    """Make uvloop the event loop policy when it is installed; True if it was."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
