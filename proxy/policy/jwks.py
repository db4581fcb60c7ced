"""The `jwksUri` key cache and its fetch schedule: pure, driven by the caller's clock.

The proxy, not the control plane, fetches a RequestAuthentication's `jwksUri`, as
Envoy's `remote_jwks` does (`proxy.jwks_fetch` is the I/O). This state machine decides
when:

- a URI without keys is fetched at once, then retried with capped exponential
  backoff while it fails;
- keys are refreshed every `refresh_s` (Envoy's `cache_duration`, default 10 min);
- a token whose `kid` the cached set lacks triggers a refresh, at most once per
  `unknown_kid_interval_s`, so a stream of forged `kid`s cannot turn every request
  into a fetch;
- a failed refresh keeps the last good set (a JWKS server that is down must not log
  every user out) and retries with backoff;
- it is bounded: at most `max_uris` URIs are tracked (extra ones are never fetched and
  their tokens fail), and a document larger than `MAX_JWKS_BYTES` is refused.

`track()` is given the URIs the current config needs; others are forgotten.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .jwt import KeySet, parse_jwks

MAX_JWKS_BYTES = 256 * 1024


@dataclass(slots=True)
class _Entry:
    keys: KeySet | None = None
    refresh_at: float = 0.0  # next scheduled fetch (0: as soon as possible)
    last_attempt: float | None = None
    last_kid_refresh: float | None = None  # the last fetch an unknown `kid` caused
    failures: int = 0
    error: str = ""


class JwksCache:
    def __init__(
        self,
        *,
        refresh_s: float = 600.0,
        retry_min_s: float = 1.0,
        retry_max_s: float = 60.0,
        unknown_kid_interval_s: float = 30.0,
        max_uris: int = 64,
    ) -> None:
        self.refresh_s = refresh_s
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.unknown_kid_interval_s = unknown_kid_interval_s
        self.max_uris = max_uris
        self._entries: dict[str, _Entry] = {}

    def track(self, uris: Iterable[str]) -> None:
        wanted = sorted(set(uris))[: self.max_uris]
        self._entries = {uri: self._entries.get(uri) or _Entry() for uri in wanted}

    @property
    def uris(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def keys(self, uri: str) -> KeySet | None:
        entry = self._entries.get(uri)
        return entry.keys if entry is not None else None

    def should_fetch(self, uri: str, now: float, kid: str = "") -> bool:
        """Whether a request needing `uri` (and `kid`) should fetch it now; a True for
        an unknown `kid` counts against its rate limit."""
        entry = self._entries.get(uri)
        if entry is None:
            return False
        if now >= entry.refresh_at:
            return True
        if entry.keys is not None and kid and all(key_id != kid for key_id, _ in entry.keys):
            last = entry.last_kid_refresh
            if last is None or now - last >= self.unknown_kid_interval_s:
                entry.last_kid_refresh = now
                return True
        return False

    def due(self, now: float) -> list[str]:
        """URIs whose scheduled refresh (or retry) is due."""
        return [uri for uri, entry in self._entries.items() if now >= entry.refresh_at]

    def next_due(self) -> float | None:
        return min((e.refresh_at for e in self._entries.values()), default=None)

    def started(self, uri: str, now: float) -> None:
        entry = self._entries.get(uri)
        if entry is not None:
            entry.last_attempt = now

    def fetched(self, uri: str, body: bytes, now: float) -> str:
        """Record a fetched document; returns "" or why it was not usable (then the
        last good set stays)."""
        if len(body) > MAX_JWKS_BYTES:
            return self.failed(uri, f"document larger than {MAX_JWKS_BYTES} bytes", now)
        try:
            keys = parse_jwks(body)
        except ValueError as e:
            return self.failed(uri, str(e), now)
        entry = self._entries.get(uri)
        if entry is not None:
            entry.keys, entry.failures, entry.error = keys, 0, ""
            entry.last_attempt = now
            entry.refresh_at = now + self.refresh_s
        return ""

    def failed(self, uri: str, error: str, now: float) -> str:
        entry = self._entries.get(uri)
        if entry is not None:
            entry.failures += 1
            entry.error = error
            entry.last_attempt = now
            backoff = min(self.retry_max_s, self.retry_min_s * 2 ** (entry.failures - 1))
            entry.refresh_at = now + backoff
        return error

    def status(self) -> dict[str, dict[str, object]]:
        """For the admin dump: per URI, how many keys, failures and the last error."""
        return {
            uri: {
                "keys": len(e.keys) if e.keys is not None else None,
                "failures": e.failures,
                "error": e.error,
            }
            for uri, e in self._entries.items()
        }
