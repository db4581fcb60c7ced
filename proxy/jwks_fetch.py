"""Fetch `jwksUri` documents for RequestAuthentication: the I/O of `JwksCache`.

HTTPS is verified against the system's CAs, or the bundle in `--jwks-ca-file`
(`MESH_JWKS_CA_FILE`). A fetch is bounded in time (the rule's `timeout`) and size
(`MAX_JWKS_BYTES`); concurrent needs of one URI share one fetch. Scheduled refreshes
run in one task (`refresher`), started when the first URI is tracked and cancelled by
`close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Iterable

import aiohttp

from mesh.logs import get_logger
from proxy.policy.jwks import MAX_JWKS_BYTES, JwksCache
from proxy.policy.jwt import KeySet

log = get_logger("proxy.jwks")

DEFAULT_TIMEOUT_S = 5.0
# without URIs (or between refreshes) the refresher still wakes this often to see
# whether a retry became due
IDLE_WAKE_S = 5.0


class JwksFetcher:
    def __init__(
        self,
        ca_file: str = "",
        cache: JwksCache | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache or JwksCache()
        self.clock = clock
        self._ca_file = ca_file
        self._ssl: ssl.SSLContext | None = None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._timeouts: dict[str, float] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def track(self, uris: Iterable[str], timeouts: dict[str, float] | None = None) -> None:
        self.cache.track(uris)
        self._timeouts = dict(timeouts or {})
        if self.cache.uris and self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh_loop(), name="jwks:refresher"
            )
        self._wake.set()

    def keys(self, uri: str) -> KeySet | None:
        return self.cache.keys(uri)

    async def ensure(self, uri: str, kid: str, timeout_s: float) -> None:
        """Fetch `uri` now when the cache says a request may (`should_fetch`), and wait
        for it (at most `timeout_s`); a shared fetch continues for the others."""
        task = self._inflight.get(uri)
        if task is None:
            if not self.cache.should_fetch(uri, self.clock(), kid):
                return
            task = self._start(uri)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout_s)

    def _start(self, uri: str) -> asyncio.Task[None]:
        self.cache.started(uri, self.clock())
        task = asyncio.get_running_loop().create_task(self._fetch(uri), name=f"jwks:fetch:{uri}")
        self._inflight[uri] = task
        task.add_done_callback(lambda _t: self._inflight.pop(uri, None))
        return task

    async def _fetch(self, uri: str) -> None:
        timeout = self._timeouts.get(uri, DEFAULT_TIMEOUT_S)
        try:
            body = await self._get(uri, timeout)
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError, ValueError) as e:
            error = self.cache.failed(uri, f"{type(e).__name__}: {e}", self.clock())
            log.warning("jwks.fetch_failed", uri=uri, error=error)
            return
        error = self.cache.fetched(uri, body, self.clock())
        if error:
            log.warning("jwks.refused", uri=uri, error=error)
        else:
            log.info("jwks.fetched", uri=uri, keys=len(self.cache.keys(uri) or ()))

    async def _get(self, uri: str, timeout_s: float) -> bytes:
        connector = aiohttp.TCPConnector(ssl=self._context())
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as session,
            session.get(uri, allow_redirects=False) as response,
        ):
            if response.status != 200:
                raise ValueError(f"HTTP status {response.status}")
            body = await response.content.read(MAX_JWKS_BYTES + 1)
            return body

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=self._ca_file or None)
        return self._ssl

    async def _refresh_loop(self) -> None:
        while True:
            now = self.clock()
            for uri in self.cache.due(now):
                if uri not in self._inflight:
                    self._start(uri)
            next_due = self.cache.next_due()
            wait = IDLE_WAKE_S if next_due is None else max(0.05, next_due - self.clock())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(wait, IDLE_WAKE_S))

    async def close(self) -> None:
        tasks = [t for t in (self._refresher, *self._inflight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._refresher = None
