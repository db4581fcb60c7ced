"""A pool of keep-alive connections to one upstream endpoint.

Optionally bounded (a DestinationRule's `connectionPool`): a `ConnectionLimit` shared
by the pools of one upstream cluster caps the connections they open together; a
request that finds none free waits as *pending* for one of this pool's connections
(bounded too: beyond it `PoolOverflowError`). A pool may always open its first
connection, so an endpoint never starves while the cluster's other endpoints hold
every slot (as Envoy's per-host pools do). Connections may also be limited in the
requests they serve (`max_requests_per_connection`) and in how long they stay idle.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .body import BodyStream
from .client import StaleConnectionError, UpstreamConnection, UpstreamResponse
from .errors import UpstreamConnectError, UpstreamError, UpstreamResetError
from .h1.events import RequestHead
from .limits import Limits


class PoolOverflowError(UpstreamError):
    """No connection could be opened (the cluster's limit) and the pending queue is full."""


class ConnectionLimit(Protocol):
    """Slots for connections and pending requests, shared by the pools of one cluster
    (`proxy.resilience.CircuitBreaker` is one)."""

    def try_acquire_connection(self) -> bool: ...
    def release_connection(self) -> None: ...
    def try_acquire_pending(self) -> bool: ...
    def release_pending(self) -> None: ...


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
        idle_timeout: float | None = None,
        max_requests_per_connection: int = 0,
        connection_limit: ConnectionLimit | None = None,
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
        self._idle_timeout = idle_timeout or limits.upstream_idle_timeout
        self._max_requests = max_requests_per_connection
        self._limit = connection_limit
        # connections holding one of the limit's slots (released when they close)
        self._slotted: dict[UpstreamConnection, ConnectionLimit] = {}
        self._connecting = 0
        # pending requests, first come first served: each gets a connection handed
        # over, or None when a slot may have come free (then it tries again)
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
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
        if isinstance(body, BodyStream):
            length = body.length
        else:
            length = len(body) if body else 0
        head = RequestHead(method, path, headers, length)
        connection = self._take_idle()
        fresh = False
        if connection is None:
            connection, fresh = await self._obtain()
        if fresh:
            return await connection.exchange(head, body)
        try:
            return await connection.exchange(head, body)
        except StaleConnectionError:
            # The upstream closed the idle connection as we reused it. Retrying is safe
            # only when the request can be sent again exactly.
            if isinstance(body, BodyStream) and not (body.complete and body.bytes_received == 0):
                raise UpstreamResetError("pooled connection closed by upstream") from None
        connection, _ = await self._obtain()
        return await connection.exchange(head, body)

    def configure(
        self,
        *,
        connect_timeout: float | None = None,
        idle_timeout: float | None = None,
        max_requests_per_connection: int | None = None,
        connection_limit: ConnectionLimit | None = None,
        max_concurrent_streams: int | None = None,
    ) -> None:
        """New settings (a changed DestinationRule); they apply to what happens next,
        connections already open stay. `max_concurrent_streams` is HTTP/2's: an
        HTTP/1.1 connection carries one request at a time anyway."""
        if connect_timeout is not None:
            self._connect_timeout = connect_timeout
        if idle_timeout is not None and idle_timeout != self._idle_timeout:
            self._idle_timeout = idle_timeout
            if self._sweeper is not None:  # the next sweep is due at another time now
                self._sweeper.cancel()
                self._sweeper = None
                if self._idle:
                    self._sweeper = self._get_loop().call_at(
                        self._idle[0].idle_since + idle_timeout, self._sweep
                    )
        if max_requests_per_connection is not None:
            self._max_requests = max_requests_per_connection
        if connection_limit is not None:
            # slots taken under a previous limit go back to it as their connections close
            self._limit = connection_limit

    @property
    def pending(self) -> int:
        """Requests waiting for a connection."""
        return sum(1 for w in self._waiters if not w.done())

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
        self._wake_waiters(all_of_them=True)

    # -- connections -----------------------------------------------------------------------

    def _take_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        if not idle:
            return None
        now = self._get_loop().time()
        deadline = now - self._idle_timeout
        while idle:
            connection = idle.pop()
            if connection.usable and connection.idle_since > deadline:
                self._active.add(connection)
                return connection
            connection.close()
        return None

    async def _obtain(self) -> tuple[UpstreamConnection, bool]:
        """A connection for a request that found none idle: a new one (True), or, at
        the connection limit, one handed over by a finishing request (False)."""
        limit = self._limit
        if limit is None:
            return await self._connect(), True
        while True:
            if limit.try_acquire_connection():
                return await self._connect(slotted=True), True
            if not (self._active or self._idle or self._connecting):
                # the first connection of an endpoint is always allowed
                return await self._connect(), True
            if not limit.try_acquire_pending():
                raise PoolOverflowError(f"too many requests waiting for {self._authority}")
            waiter: asyncio.Future[UpstreamConnection | None] = self._get_loop().create_future()
            self._waiters.append(waiter)
            try:
                connection = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    # woken as we were cancelled: pass the connection or the turn on
                    handed = waiter.result()
                    if handed is not None:
                        self._active.discard(handed)
                        self._release(handed, handed.usable)
                    else:
                        self._wake_waiters()
                raise
            finally:
                limit.release_pending()
                if not waiter.done():
                    waiter.cancel()
            if connection is not None:
                return connection, False
            if self._closed:
                raise UpstreamConnectError("upstream pool is closed")

    async def _connect(self, *, slotted: bool = False) -> UpstreamConnection:
        self._connecting += 1
        limit = self._limit if slotted else None
        connection: UpstreamConnection | None = None
        try:
            connection = await self._open()
        finally:
            self._connecting -= 1
            if limit is not None:
                if connection is None:
                    self._release_slot(limit)
                else:
                    self._slotted[connection] = limit
        return connection

    async def open_connection(self) -> UpstreamConnection:
        """A new connection of this pool's kind that no request will share (a CONNECT
        tunnel's upstream); it is forgotten when it closes."""
        return await self._open()

    async def _open(self) -> UpstreamConnection:
        if self._closed:
            raise UpstreamConnectError("upstream pool is closed")
        loop = self._get_loop()
        limits = self._limits
        context = self._tls_context() if callable(self._ssl) else self._ssl
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, connection = await loop.create_connection(
                    lambda: UpstreamConnection(self, limits, self._authority),
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

    def _release_slot(self, limit: ConnectionLimit) -> None:
        limit.release_connection()
        self._wake_waiters()

    def _wake_waiters(self, *, all_of_them: bool = False) -> None:
        """Tell the first pending request (or every one) to try again."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not all_of_them:
                    return

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
        if self._max_requests and connection._exchanges >= self._max_requests:
            reusable = False
        if not reusable or self._closed:
            connection.close()  # its slot is released when it is gone (_forget)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._active.add(connection)
                waiter.set_result(connection)
                return
        if len(self._idle) >= self._max_idle:
            connection.close()
            return
        loop = self._get_loop()
        connection.idle_since = loop.time()
        self._idle.append(connection)
        if self._sweeper is None:
            self._sweeper = loop.call_at(connection.idle_since + self._idle_timeout, self._sweep)

    def _forget(self, connection: UpstreamConnection) -> None:
        self._active.discard(connection)
        try:
            self._idle.remove(connection)
        except ValueError:
            pass
        limit = self._slotted.pop(connection, None)
        if limit is not None:
            self._release_slot(limit)
        elif self._waiters:
            # an unslotted connection is gone: a waiter may now open the pool's first
            self._wake_waiters()

    def _note_write_peak(self, buffered: int) -> None:
        if buffered > self._peak_write_buffer:
            self._peak_write_buffer = buffered

    def _sweep(self) -> None:
        """Close connections idle for longer than upstream_idle_timeout (oldest first)."""
        self._sweeper = None
        idle = self._idle
        timeout = self._idle_timeout
        loop = self._get_loop()
        now = loop.time()
        while idle and idle[0].idle_since + timeout <= now:
            idle.pop(0).close()
        if idle:
            self._sweeper = loop.call_at(idle[0].idle_since + timeout, self._sweep)
