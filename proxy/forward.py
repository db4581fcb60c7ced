"""The one forwarding step every listener shares: send a request to an upstream pool,
stream the answer back, and turn upstream failures into Envoy-style local replies.

Local replies carry `x-mesh-response-flags`, so a 503 always says why (UH no healthy
upstream, UF connect failure, UC upstream closed, UT timeout, NR no route, NC no such
subset), and are counted with their flags.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from proxy.http import (
    Exchange,
    Limits,
    Request,
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamResetError,
)

if TYPE_CHECKING:
    from proxy.telemetry import SpanContext, Workload

FLAGS_HEADER = "x-mesh-response-flags"

# hop-by-hop handling happens in the engine; these are what a proxy adds or rewrites
_SERVER = ("server", "meshwork")


@dataclass(slots=True)
class Outcome:
    """What became of one request: the status sent (0: none), Envoy response flags
    ("" for none) and the upstream address it went to.

    For telemetry, a routing handler also notes what it learns on the way: `service`
    (canonical host of the destination service) and `destination` (the chosen
    endpoint's workload), and once it forwards, the client span and request id it sent
    (`trace`, `request_id`); empty when the request was answered before that.
    """

    status: int
    flags: str = ""
    upstream: str = ""
    service: str = ""
    destination: Workload | None = None
    trace: SpanContext | None = None
    request_id: str = ""


async def local_reply(ex: Exchange, status: int, flags: str, message: str) -> Outcome:
    body = (message.rstrip("\n") + "\n").encode()
    headers = [("content-type", "text/plain; charset=utf-8"), (FLAGS_HEADER, flags), _SERVER]
    await ex.respond(status, headers, body)
    return Outcome(status, flags)


class UpstreamTls(Protocol):
    """Client-side mTLS for pools: a context per new connection (the certificate in
    force), and the check that the server is the identity the registry lists."""

    def client_context(self) -> ssl.SSLContext: ...

    def verifier(self, expected_identity: str) -> Callable[[ssl.SSLObject | None], object]: ...


class PoolSet:
    """One upstream connection pool per (endpoint address, expected identity), created
    on first use. With `tls`, an endpoint that registered an identity is reached over
    mTLS and must present exactly that identity; one without (no sidecar) in plaintext."""

    def __init__(self, limits: Limits, tls: UpstreamTls | None = None):
        self.limits = limits
        self.tls = tls
        self.pools: dict[tuple[str, str], UpstreamPool] = {}

    def get(self, address: str, identity: str = "") -> UpstreamPool:
        key = (address, identity)
        pool = self.pools.get(key)
        if pool is None:
            host, _, port = address.rpartition(":")
            if identity and self.tls is not None:
                pool = UpstreamPool(
                    host.strip("[]"),
                    int(port),
                    limits=self.limits,
                    ssl=self.tls.client_context,
                    verify_peer=self.tls.verifier(identity),
                )
            else:
                pool = UpstreamPool(host.strip("[]"), int(port), limits=self.limits)
            self.pools[key] = pool
        return pool

    def retain(self, addresses: set[str]) -> None:
        for key in list(self.pools):
            if key[0] not in addresses:
                self.pools.pop(key).close()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()


async def forward(
    ex: Exchange,
    req: Request,
    pool: UpstreamPool,
    *,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    timeout_ms: int = 0,
    response_headers: Callable[[list[tuple[str, str]]], list[tuple[str, str]]] | None = None,
    upstream: str = "",
) -> Outcome:
    """Send one request upstream and relay the response (or a tunnel after 101)."""
    try:
        if timeout_ms:
            async with asyncio.timeout(timeout_ms / 1000):
                resp = await pool.request(method, path, headers, req.body)
        else:
            resp = await pool.request(method, path, headers, req.body)
    except TimeoutError:
        return await local_reply(ex, 504, "UT", "upstream request timeout")
    except UpstreamConnectError as e:
        return await local_reply(ex, 503, "UF", f"upstream connect error: {e}")
    except UpstreamResetError as e:
        return await local_reply(ex, 503, "UC", f"upstream connection closed: {e}")
    except UpstreamError as e:
        return await local_reply(ex, 502, "UPE", f"upstream protocol error: {e}")
    if response_headers is not None:
        resp.headers = response_headers(resp.headers)
    if resp.status == 101:
        await ex.tunnel(resp)
    else:
        await ex.forward(resp)
    return Outcome(resp.status, "", upstream)
