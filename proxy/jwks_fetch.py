"""Fetch `jwksUri` documents for RequestAuthentication: the I/O of `JwksCache`.

A rule with neither `jwks` nor `jwksUri` is tracked under its issuer's OpenID
configuration URL (`JwtRule.key_uri`): each fetch of it reads that document's
`jwks_uri` and then the key set there (OIDC discovery, as Istio does), on the same
schedule, bounds and last-good-set rules as a `jwksUri`. While discovery fails, the
rule has no keys and tokens for it get 401, as in Istio.

HTTPS is verified against the system's CAs, or the bundle in `--jwks-ca-file`
(`MESH_JWKS_CA_FILE`). A fetch is bounded in time (the rule's `timeout`) and size
(`MAX_JWKS_BYTES`); concurrent needs of one URI share one fetch. Scheduled refreshes
run in one task (`refresher`), started when the first URI is tracked and cancelled by
`close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
import urllib.parse
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
        self._discovered: frozenset[str] = frozenset()
        self._refresher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def track(
        self,
        uris: Iterable[str],
        timeouts: dict[str, float] | None = None,
        discovered: Iterable[str] = (),
    ) -> None:
        """Keep the keys of `uris` fresh; those in `discovered` are OpenID
        configuration URLs to follow to the key set."""
        self.cache.track(uris)
        self._timeouts = dict(timeouts or {})
        self._discovered = frozenset(discovered)
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
            async with asyncio.timeout(timeout):
                if uri in self._discovered:
                    jwks_uri = jwks_uri_of(await self.fetch_document(uri, timeout))
                    log.debug("jwks.discovered", uri=uri, jwks_uri=jwks_uri)
                    body = await self.fetch_document(jwks_uri, timeout)
                else:
                    body = await self.fetch_document(uri, timeout)
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError, ValueError) as e:
            error = self.cache.failed(uri, f"{type(e).__name__}: {e}", self.clock())
            log.warning("jwks.fetch_failed", uri=uri, error=error)
            return
        error = self.cache.fetched(uri, body, self.clock())
        if error:
            log.warning("jwks.refused", uri=uri, error=error)
        else:
            log.info("jwks.fetched", uri=uri, keys=len(self.cache.keys(uri) or ()))

    async def fetch_document(self, uri: str, timeout_s: float) -> bytes:
        """GET `uri` (200 only, verified TLS, bounded in time and size)."""
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


def jwks_uri_of(document: bytes) -> str:
    """The `jwks_uri` of an OpenID configuration document; ValueError saying what is
    wrong with it otherwise."""
    if len(document) > MAX_JWKS_BYTES:
        raise ValueError(f"OpenID configuration larger than {MAX_JWKS_BYTES} bytes")
    try:
        config = json.loads(document)
    except ValueError as e:
        raise ValueError(f"OpenID configuration is not JSON: {e}") from None
    uri = config.get("jwks_uri") if isinstance(config, dict) else None
    if not isinstance(uri, str) or not uri:
        raise ValueError("OpenID configuration has no jwks_uri")
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise ValueError(f"OpenID configuration's jwks_uri is not an http(s) URL: {uri!r}")
    return uri


class OidcDiscovery:
    """The Envoy agent's half of OIDC discovery (Envoy's `jwt_authn` cannot discover):
    for each wanted OpenID configuration URL, the `jwks_uri` it names, re-read every
    `refresh_s` and retried with capped backoff while it fails (the last good answer
    stays). `on_change` is called when the answers change, to push a new config."""

    def __init__(
        self,
        ca_file: str,
        on_change: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        refresh_s: float = 600.0,
    ) -> None:
        self.resolved: dict[str, str] = {}
        self._fetcher = JwksFetcher(ca_file)
        self._on_change = on_change
        self._clock = clock
        self._refresh_s = refresh_s
        self._due: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def want(self, uris: Iterable[str]) -> None:
        wanted = set(uris)
        self._due = {
            u: self._due.get(u, 0.0) for u in sorted(wanted)[: self._fetcher.cache.max_uris]
        }
        forgotten = set(self.resolved) - set(self._due)
        for uri in forgotten:
            del self.resolved[uri]
        if self._due and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="oidc:discovery")
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            now = self._clock()
            changed = False
            for uri in [u for u, at in self._due.items() if at <= now]:
                changed |= await self._resolve(uri)
            if changed:
                self._on_change()
            wait = min((at for at in self._due.values()), default=now + IDLE_WAKE_S) - now
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.05, min(wait, IDLE_WAKE_S)))

    async def _resolve(self, uri: str) -> bool:
        try:
            jwks_uri = jwks_uri_of(await self._fetcher.fetch_document(uri, DEFAULT_TIMEOUT_S))
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError, ValueError) as e:
            failures = self._failures[uri] = self._failures.get(uri, 0) + 1
            self._due[uri] = self._clock() + min(60.0, 2 ** (failures - 1))
            log.warning("oidc.discovery_failed", uri=uri, error=f"{type(e).__name__}: {e}")
            return False
        self._failures.pop(uri, None)
        self._due[uri] = self._clock() + self._refresh_s
        if self.resolved.get(uri) == jwks_uri:
            return False
        self.resolved[uri] = jwks_uri
        log.info("oidc.discovered", uri=uri, jwks_uri=jwks_uri)
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
