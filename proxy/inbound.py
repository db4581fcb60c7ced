"""The inbound listener's request path: identify the caller, authorize, forward to the
app on localhost.

The caller's identity is the SPIFFE ID of its client certificate (mTLS) and nothing
else: headers claiming an identity (`x-forwarded-client-cert`) are removed and
replaced by the one the handshake proved.
"""

from __future__ import annotations

from proxy.forward import Outcome, PoolSet, forward, local_reply
from proxy.http import Exchange, Request, ensure_request_id, strip_hop_by_hop
from proxy.peer import peer_of
from proxy.settings import SidecarSettings

XFCC = "x-forwarded-client-cert"


class InboundHandler:
    def __init__(self, settings: SidecarSettings, app_pools: PoolSet):
        self.settings = settings
        self.app_pools = app_pools
        self.app_address = f"127.0.0.1:{settings.app_port}"

    async def handle(self, req: Request, ex: Exchange) -> Outcome:
        if self.settings.app_port == 0:
            return await local_reply(ex, 503, "UH", "this sidecar has no app port")
        peer = peer_of(req.ssl_object)
        headers = [(n, v) for n, v in strip_hop_by_hop(req.headers) if n != XFCC]
        headers, _ = ensure_request_id(headers)
        if req.authority and not any(n == "host" for n, _ in headers):
            headers.append(("host", req.authority))
        if peer.mtls:
            headers.append((XFCC, f"By={self.settings.identity};URI={peer.spiffe_id}"))
        return await forward(
            ex,
            req,
            self.app_pools.get(self.app_address),
            method=req.method,
            path=req.path,
            headers=headers,
            upstream=self.app_address,
        )
