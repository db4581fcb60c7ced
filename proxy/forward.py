"""The one forwarding step every listener shares: send a request to an upstream pool,
stream the answer back, and turn upstream failures into Envoy-style local replies.

Local replies carry `x-mesh-response-flags`, so a 503 always says why (UH no healthy
upstream, UF connect failure, UC upstream closed, UT timeout, NR no route, NC no such
subset), and are counted with their flags.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.http import (
    Exchange,
    Limits,
    Request,
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamResetError,
)

FLAGS_HEADER = "x-mesh-response-flags"

# hop-by-hop handling happens in the engine; these are what a proxy adds or rewrites
_SERVER = ("server", "meshwork")


@dataclass(slots=True)
class Outcome:
    status: int
    flags: str = ""
    upstream: str = ""


async def local_reply(ex: Exchange, status: int, flags: str, message: str) -> Outcome:
    body = (message.rstrip("\n") + "\n").encode()
    headers = [("content-type", "text/plain; charset=utf-8"), (FLAGS_HEADER, flags), _SERVER]
    await ex.respond(status, headers, body)
    return Outcome(status, flags)


class PoolSet:
    """One upstream connection pool per endpoint address, created on first use and
    closed when the endpoint leaves every endpoint set."""

    def __init__(self, limits: Limits, ssl_for: Callable[[str], Any] | None = None):
        self.limits = limits
        self.ssl_for = ssl_for
        self.pools: dict[str, UpstreamPool] = {}

    def get(self, address: str) -> UpstreamPool:
        pool = self.pools.get(address)
        if pool is None:
            host, _, port = address.rpartition(":")
            pool = UpstreamPool(host.strip("[]"), int(port), limits=self.limits)
            self.pools[address] = pool
        return pool

    def retain(self, addresses: set[str]) -> None:
        for address in list(self.pools):
            if address not in addresses:
                self.pools.pop(address).close()

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
