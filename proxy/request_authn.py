"""The RequestAuthentication step of a listener (sidecar inbound, gateway): validate
the request's JWT with `proxy.policy.jwt`, fetching `jwksUri` keys when the decision
needs them, and rewrite the request as forwarded (token removed, claims added).

`authenticate` returns the verdict; a verdict with `error` is answered 401 by the
caller (`reply_unauthenticated`), before authorization, as Envoy's `jwt_authn` filter
runs before RBAC.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.forward import Outcome, local_reply
from proxy.http import Exchange, Request
from proxy.jwks_fetch import JwksFetcher
from proxy.policy.jwt import (
    NO_TOKEN,
    Authenticator,
    KeysNeeded,
    Verdict,
    challenge,
    forwarded_request,
)


class RequestAuthentication:
    """The authenticator in force (swapped whole per config revision) and the JWKS
    fetcher that outlives revisions."""

    def __init__(self, fetcher: JwksFetcher, clock: Callable[[], float] = time.time) -> None:
        self.fetcher = fetcher
        self.clock = clock
        self.authenticator = Authenticator()

    def update(self, authenticator: Authenticator) -> None:
        timeouts = {r.key_uri: r.timeout_ms / 1000 for r in authenticator.rules if r.key_uri}
        discovered = {r.key_uri for r in authenticator.rules if not r.jwks and not r.jwks_uri}
        self.fetcher.track(authenticator.key_uris, timeouts, discovered)
        self.authenticator = authenticator

    async def authenticate(self, req: Request) -> Verdict:
        """The verdict; when it lets the request through, `req.headers` and `req.path`
        are rewritten as they must be forwarded."""
        authenticator = self.authenticator
        if authenticator.empty:
            return NO_TOKEN
        fetched: frozenset[str] = frozenset()
        while True:
            result = authenticator.authenticate(
                req.headers, req.path, self.clock(), self.fetcher.keys, fetched
            )
            if not isinstance(result, KeysNeeded):
                break
            timeout_s = next(
                (r.timeout_ms / 1000 for r in authenticator.rules if r.key_uri == result.uri),
                5.0,
            )
            await self.fetcher.ensure(result.uri, result.kid, timeout_s)
            fetched |= {result.uri}
        if not result.error:
            req.headers, req.path = forwarded_request(result, authenticator, req.headers, req.path)
        return result


async def reply_unauthenticated(req: Request, ex: Exchange, verdict: Verdict) -> Outcome:
    """401 as Envoy's jwt_authn answers it: the reason as the body, a Bearer challenge
    naming the request URL as realm."""
    realm = f"{req.scheme or 'http'}://{req.authority}{req.path.partition('?')[0]}"
    return await local_reply(
        ex, 401, "", verdict.error, [("www-authenticate", challenge(_quoted(realm)))]
    )


def _quoted(value: str) -> str:
    return "".join(c for c in value if c not in '"\\\r\n')
