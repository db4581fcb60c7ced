"""What every listener shares around an upstream request: the pools (`PoolSet`),
sending on a pool with the one failure mapping (`request_pool`), relaying the answer
(`relay`) and Envoy-style local replies (`local_reply`). Sending to a cluster is
`proxy.cluster_send`'s; `forward` is a request to a pool with no cluster around it
(ALLOW_ANY's passthrough).

Local replies carry `x-mesh-response-flags`, so a 503 always says why (UH no healthy
upstream, UF connect failure, UC upstream closed, UT timeout, NR no route, NC no such
subset, UO circuit breaker overflow, URX retries exhausted, DI/FI fault injected, RL
rate limited), and are counted with their flags. Several flags are joined with commas
in Envoy's order (`UF,URX`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from proxy.http import (
    BodyStream,
    Exchange,
    Limits,
    Request,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from proxy.http.h2.client import H2UpstreamPool
from proxy.http.h2.pool import NegotiatingPool
from proxy.http.local_reply import grpc_local_reply, is_grpc
from proxy.upstream_failure import UpstreamFailure, upstream_failure

if TYPE_CHECKING:
    from proxy.clusters import PoolOptions
    from proxy.policy import ShadowDecision
    from proxy.telemetry import SpanContext, Workload
    from proxy.upstream_tls import Origination

FLAGS_HEADER = "x-mesh-response-flags"

# rewrites the upstream response's headers before they are relayed
ResponseHeaders = Callable[[list[tuple[str, str]]], list[tuple[str, str]]]

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
    The inbound handler notes what dry-run AuthorizationPolicies would have decided
    (`authz_shadow`).
    """

    status: int
    flags: str = ""
    upstream: str = ""
    service: str = ""
    destination: Workload | None = None
    trace: SpanContext | None = None
    request_id: str = ""
    # the inbound handler's dry-run authorization result, for the access record
    authz_shadow: ShadowDecision | None = None


async def local_reply(
    ex: Exchange,
    status: int,
    flags: str,
    message: str,
    extra_headers: list[tuple[str, str]] | None = None,
    *,
    grpc_status: int | None = None,
) -> Outcome:
    """Our own answer. `grpc_status` overrides the status a gRPC request gets (a fault's
    `grpcStatus`); other requests ignore it, as Envoy's `sendLocalReply` does."""
    if is_grpc(ex.request.headers):
        # gRPC clients read the status from grpc-status, not from HTTP: a
        # trailers-only answer, as Envoy's local replies to gRPC requests are
        reply_status, headers = grpc_local_reply(status, flags, message, grpc_status)
        headers += [(FLAGS_HEADER, flags), _SERVER]
        if extra_headers:
            headers += extra_headers
        await ex.respond(reply_status, headers, b"")
        # recorded with the HTTP status Envoy reports for it (its response_code is the
        # local reply's code, 200 on the wire)
        return Outcome(reply_status, flags)
    body = (message.rstrip("\n") + "\n").encode()
    headers = [("content-type", "text/plain; charset=utf-8"), (FLAGS_HEADER, flags), _SERVER]
    if extra_headers:
        headers += extra_headers
    await ex.respond(status, headers, body)
    return Outcome(status, flags)


class UpstreamTls(Protocol):
    """Client-side mTLS for pools: a context per new connection (the certificate in
    force), and the check that the server is the identity the registry lists."""

    def client_context(self) -> ssl.SSLContext: ...

    def h2_client_context(self) -> ssl.SSLContext: ...

    def verifier(self, expected_identity: str) -> Callable[[ssl.SSLObject | None], object]: ...


class PoolSet:
    """One upstream connection pool per (endpoint address, expected identity), created
    on first use. With `tls`, an endpoint that registered an identity is reached over
    mTLS and must present exactly that identity; one without (no sidecar) in plaintext.

    Protocol: between sidecars (mTLS) HTTP/2, one multiplexed connection per endpoint,
    when the peer negotiates ALPN h2 (HTTP/1.1 otherwise, and always for upgrades);
    HTTP/1.1 requests of the app travel over it too. In plaintext, HTTP/2 with prior
    knowledge (h2c) when `h2c` is set (the app declared `--app-protocol grpc|http2`),
    HTTP/1.1 otherwise.

    A cluster with a `connectionPool` (`options`) gets pools of its own, made and
    limited as it says, both the HTTP/1.1 and the HTTP/2 one (`h2.streams`). Its
    requests keep HTTP/1.1 between sidecars, except gRPC ones, which need HTTP/2: the
    limits then count what Istio's sidecars count for HTTP/1.1 traffic (its default
    `h2UpgradePolicy` keeps HTTP/1.1); every other cluster shares the default pools."""

    def __init__(self, limits: Limits, tls: UpstreamTls | None = None, *, h2c: bool = False):
        self.limits = limits
        self.tls = tls
        self.h2c = h2c
        self.pools: dict[tuple[str, str, str, Origination | None], UpstreamPool] = {}
        self._options: dict[tuple[str, str, str, Origination | None], PoolOptions] = {}

    def get(
        self,
        address: str,
        identity: str = "",
        options: PoolOptions | None = None,
        origination: Origination | None = None,
    ) -> UpstreamPool:
        """The pool for one endpoint. `origination` (a DestinationRule `tls` other than
        ISTIO_MUTUAL) replaces the mesh's mTLS: plaintext for DISABLE, else the TLS it
        describes (`proxy.upstream_tls`)."""
        key = (address, identity, options.owner if options is not None else "", origination)
        pool = self.pools.get(key)
        if pool is None:
            if origination is not None:
                pool = self._originating_pool(address, origination)
            else:
                pool = self._new_pool(address, identity, limited=options is not None)
            self.pools[key] = pool
        if options is not None and self._options.get(key) is not options:
            self._options[key] = options
            pool.configure(
                connect_timeout=options.connect_timeout_s,
                idle_timeout=options.idle_timeout_s,
                max_requests_per_connection=options.max_requests_per_connection,
                max_concurrent_streams=options.max_concurrent_streams,
                connection_limit=options.limit,
            )
        return pool

    def _originating_pool(self, address: str, origination: Origination) -> UpstreamPool:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        if origination.plaintext:
            return UpstreamPool(host, int(port), limits=self.limits)
        return UpstreamPool(
            host,
            int(port),
            limits=self.limits,
            ssl=origination.context,
            server_hostname=origination.server_name,
            verify_peer=origination.verify_peer,
        )

    def _new_pool(self, address: str, identity: str, *, limited: bool = False) -> UpstreamPool:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        if identity and self.tls is not None:
            verify = self.tls.verifier(identity)
            h1 = UpstreamPool(
                host, int(port), limits=self.limits, ssl=self.tls.client_context, verify_peer=verify
            )
            h2 = H2UpstreamPool(
                host,
                int(port),
                limits=self.limits,
                ssl=self.tls.h2_client_context,
                verify_peer=verify,
            )
            # quacks like UpstreamPool (request, configure, close); a cluster with a
            # connectionPool keeps HTTP/1.1 but for gRPC (see the class docstring)
            return cast(UpstreamPool, NegotiatingPool(h2, h1, grpc_only=limited))
        h1 = UpstreamPool(host, int(port), limits=self.limits)
        if self.h2c:
            return cast(
                UpstreamPool,
                NegotiatingPool(H2UpstreamPool(host, int(port), limits=self.limits), h1),
            )
        return h1

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
        self._options.clear()


async def forward(
    ex: Exchange,
    req: Request,
    pool: UpstreamPool,
    *,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    timeout_ms: int = 0,
    response_headers: ResponseHeaders | None = None,
    upstream: str = "",
) -> Outcome:
    """Send one request to `pool`, no cluster around it (ALLOW_ANY's passthrough), and
    relay the response (or a tunnel after 101)."""
    answer = await request_pool(pool, method, path, headers, req.body, timeout_ms or None)
    if isinstance(answer, UpstreamFailure):
        return await local_reply(ex, answer.status, answer.flag, answer.details)
    await relay(ex, answer, response_headers)
    return Outcome(answer.status, "", upstream)


async def request_pool(
    pool: UpstreamPool,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes | BodyStream,
    timeout_ms: float | None = None,
) -> UpstreamResponse | UpstreamFailure:
    """Send a request on `pool` and wait for the response head (at most `timeout_ms`);
    a failure is mapped once, here (`proxy.upstream_failure`)."""
    try:
        if timeout_ms is None:
            return await pool.request(method, path, headers, body)
        async with asyncio.timeout(timeout_ms / 1000):
            return await pool.request(method, path, headers, body)
    except (TimeoutError, UpstreamError) as e:
        failure = upstream_failure(e)
        assert failure is not None  # every UpstreamError and TimeoutError is one
        return failure


async def relay(
    ex: Exchange,
    resp: UpstreamResponse,
    response_headers: ResponseHeaders | None = None,
) -> None:
    """Stream an upstream response (or a tunnel after 101) to the client."""
    if response_headers is not None:
        resp.headers = response_headers(resp.headers)
    if resp.status == 101:
        await ex.tunnel(resp)
    else:
        await ex.forward(resp)
