"""A pool of keep-alive connections to one upstream endpoint."""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import Callable
from dataclasses import dataclass

from .body import BodyStream
from .client import StaleConnectionError, UpstreamConnection, UpstreamResponse
from .errors import UpstreamConnectError, UpstreamResetError
from .limits import Limits
from .wire import encode_lines, request_line

# Framing is the pool's job: it follows the body it is given, not the caller's headers.
_FRAMING_FIELDS = frozenset({"content-length", "transfer-encoding"})
# Methods whose empty body is still worth announcing (RFC 9110 §8.6).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True, slots=True)
class PoolStats:
    """active: connections carrying an exchange; idle: pooled; opened: ever connected;
    peak_write_buffer: the largest transport write buffer any connection reached."""

    active: int
    idle: int
    opened: int
    peak_write_buffer: int


class UpstreamPool:
    """Keep-alive connections to one endpoint, reused last-in first-out.

    LIFO keeps the hottest connections busy and lets the rest age out through
    `upstream_idle_timeout`, so the pool shrinks after a burst.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: ssl_module.SSLContext | Callable[[], ssl_module.SSLContext] | None = None,
        server_hostname: str | None = None,
        verify_peer: Callable[[ssl_module.SSLObject | None], object] | None = None,
        limits: Limits,
        connect_timeout: float = 5.0,
        max_idle: int = 64,
    ) -> None:
        self.host = host
        self.port = port
        # a callable is asked per connection (renewed certificates apply to new ones)
        self._ssl = ssl
        self._server_hostname = server_hostname
        # called after each TLS handshake with the connection's SSLObject; raising
        # refuses the connection before anything is sent on it
        self._verify_peer = verify_peer
        self._limits = limits
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._idle: list[UpstreamConnection] = []
        self._active: set[UpstreamConnection] = set()
        self._opened = 0
        self._peak_write_buffer = 0
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: BodyStream | bytes | None = None,
    ) -> UpstreamResponse:
        """Send a request; return when the response head has arrived.

        The body is framed as given: bytes and BodyStreams with a length get
        Content-Length, BodyStreams without one (chunked from the client) are sent
        chunked. Content-Length/Transfer-Encoding in `headers` are ignored; Host is
        added when absent. A request carrying `Connection: upgrade` may get a 101.
        """
        if self._closed:
            raise UpstreamConnectError("upstream pool is closed")
        if callable(self._ssl):
            self._tls_context()  # refuses when no client certificate is in force
        head, upgrade = self._encode_head(method, path, headers, body)
        head_request = method == "HEAD"
        connection = self._take_idle()
        if connection is None:
            connection = await self._connect()
            return await connection.exchange(head, body, head_request=head_request, upgrade=upgrade)
        try:
            return await connection.exchange(head, body, head_request=head_request, upgrade=upgrade)
        except StaleConnectionError:
            # The upstream closed the idle connection as we reused it. Retrying is safe
            # only when the request can be sent again exactly.
            if isinstance(body, BodyStream) and not (body.complete and body.bytes_received == 0):
                raise UpstreamResetError("pooled connection closed by upstream") from None
        connection = await self._connect()
        return await connection.exchange(head, body, head_request=head_request, upgrade=upgrade)

    def stats(self) -> PoolStats:
        return PoolStats(
            active=len(self._active),
            idle=len(self._idle),
            opened=self._opened,
            peak_write_buffer=self._peak_write_buffer,
        )

    def close(self) -> None:
        """Close every connection; requests made afterwards fail."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        for connection in list(self._active):
            connection.abort()

    # -- connections -----------------------------------------------------------------------

    def _encode_head(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: BodyStream | bytes | None,
    ) -> tuple[bytes, bool]:
        lines: list[str] = []
        has_host = False
        upgrade_header = False
        connection_upgrade = False
        for name, value in headers:
            lowered = name.lower()
            if lowered in _FRAMING_FIELDS:
                continue
            if lowered == "host":
                has_host = True
            elif lowered == "upgrade":
                upgrade_header = True
            elif lowered == "connection" and "upgrade" in value.lower():
                connection_upgrade = True
            lines.append(f"{name}: {value}\r\n")
        extra = "" if has_host else f"host: {self._authority}\r\n"
        if isinstance(body, BodyStream):
            length = body.length
        else:
            length = len(body) if body else 0
        if length is None:
            extra += "transfer-encoding: chunked\r\n"
        elif length or method in _BODY_METHODS:
            extra += f"content-length: {length}\r\n"
        upgrade = upgrade_header and connection_upgrade
        if upgrade and length != 0:
            raise ValueError("an upgrade request cannot carry a body")
        return request_line(method, path).encode("ascii") + encode_lines(lines, extra), upgrade

    def _take_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        if not idle:
            return None
        now = self._get_loop().time()
        deadline = now - self._limits.upstream_idle_timeout
        while idle:
            connection = idle.pop()
            if connection.usable and connection.idle_since > deadline:
                self._active.add(connection)
                return connection
            connection.close()
        return None

    async def _connect(self) -> UpstreamConnection:
        if self._closed:
            raise UpstreamConnectError("upstream pool is closed")
        loop = self._get_loop()
        limits = self._limits
        context = self._tls_context() if callable(self._ssl) else self._ssl
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, connection = await loop.create_connection(
                    lambda: UpstreamConnection(self, limits),
                    self.host,
                    self.port,
                    ssl=context,
                    server_hostname=self._server_hostname if context is not None else None,
                )
        except TimeoutError as error:
            raise UpstreamConnectError(f"connect to {self._authority} timed out") from error
        except OSError as error:  # refused, unreachable, TLS handshake/verification
            raise UpstreamConnectError(f"connect to {self._authority} failed: {error}") from error
        if self._verify_peer is not None:
            try:
                self._verify_peer(transport.get_extra_info("ssl_object"))
            except Exception as error:
                connection.abort()
                raise UpstreamConnectError(
                    f"connect to {self._authority} refused: {error}"
                ) from error
        self._opened += 1
        if self._closed:
            connection.abort()
            raise UpstreamConnectError("upstream pool is closed")
        self._active.add(connection)
        return connection

    def _tls_context(self) -> ssl_module.SSLContext:
        assert callable(self._ssl)
        try:
            return self._ssl()
        except Exception as error:
            # fail closed: drop the connections made with the old certificate too
            idle, self._idle = self._idle, []
            for connection in idle:
                connection.close()
            raise UpstreamConnectError(f"no TLS to {self._authority}: {error}") from error

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # -- hooks called by UpstreamConnection --------------------------------------------------

    def _release(self, connection: UpstreamConnection, reusable: bool) -> None:
        self._active.discard(connection)
        if not reusable or self._closed or len(self._idle) >= self._max_idle:
            connection.close()
            return
        loop = self._get_loop()
        connection.idle_since = loop.time()
        self._idle.append(connection)
        if self._sweeper is None:
            self._sweeper = loop.call_at(
                connection.idle_since + self._limits.upstream_idle_timeout, self._sweep
            )

    def _forget(self, connection: UpstreamConnection) -> None:
        self._active.discard(connection)
        try:
            self._idle.remove(connection)
        except ValueError:
            pass

    def _note_write_peak(self, buffered: int) -> None:
        if buffered > self._peak_write_buffer:
            self._peak_write_buffer = buffered

    def _sweep(self) -> None:
        """Close connections idle for longer than upstream_idle_timeout (oldest first)."""
        self._sweeper = None
        idle = self._idle
        timeout = self._limits.upstream_idle_timeout
        loop = self._get_loop()
        now = loop.time()
        while idle and idle[0].idle_since + timeout <= now:
            idle.pop(0).close()
        if idle:
            self._sweeper = loop.call_at(idle[0].idle_since + timeout, self._sweep)
