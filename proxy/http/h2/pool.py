"""One endpoint reached over HTTP/2 when it can be, HTTP/1.1 otherwise.

Upgrade requests (WebSocket) always take HTTP/1.1: extended CONNECT (RFC 8441) is not
implemented. With `grpc_only`, only gRPC requests take HTTP/2 (they need trailers):
for clusters with a DestinationRule `connectionPool`, whose limits then count HTTP/1.1
connections for HTTP/1.1 traffic, as under Istio's default `h2UpgradePolicy`; both
pools enforce them.

Over TLS, an endpoint that does not negotiate ALPN h2 is remembered and reached over
HTTP/1.1 from then on (an older sidecar, or one without h2).
"""

from __future__ import annotations

from typing import Any

from ..body import BodyStream
from ..client import UpstreamResponse
from ..pool import PoolStats, UpstreamPool
from .client import H2NotNegotiated, H2UpstreamPool


class NegotiatingPool:
    """`UpstreamPool`'s interface over an HTTP/2 pool and an HTTP/1.1 one."""

    def __init__(self, h2: H2UpstreamPool, h1: UpstreamPool, *, grpc_only: bool = False) -> None:
        self.h2 = h2
        self.h1 = h1
        self.grpc_only = grpc_only
        self.h2_refused = False

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: BodyStream | bytes | None = None,
    ) -> UpstreamResponse:
        if self.h2_refused or _takes_h1(headers, self.grpc_only):
            return await self.h1.request(method, path, headers, body)
        try:
            return await self.h2.request(method, path, headers, body)
        except H2NotNegotiated:
            self.h2_refused = True
        return await self.h1.request(method, path, headers, body)

    def configure(self, **settings: Any) -> None:
        self.h1.configure(**settings)
        self.h2.configure(**settings)

    def stats(self) -> PoolStats:
        h1, h2 = self.h1.stats(), self.h2.stats()
        return PoolStats(
            active=h1.active + h2.active,
            idle=h1.idle + h2.idle,
            opened=h1.opened + h2.opened,
            peak_write_buffer=max(h1.peak_write_buffer, h2.peak_write_buffer),
        )

    def close(self) -> None:
        self.h2.close()
        self.h1.close()


def _takes_h1(headers: list[tuple[str, str]], grpc_only: bool) -> bool:
    grpc = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == "upgrade":
            return True
        if lowered == "content-type":
            grpc = value.startswith("application/grpc")
    return grpc_only and not grpc
