"""Ask an external authorizer (a CUSTOM AuthorizationPolicy's provider): the I/O of
`proxy.policy.ext_authz` (HTTP) and `proxy.policy.ext_authz_grpc` (gRPC).

The authorizer is a mesh service (`envoyExtAuthzHttp.service` or
`envoyExtAuthzGrpc.service`): the check goes to one of its endpoints through this
proxy's destination cache and upstream pools, over mTLS to its sidecar like any mesh
call, bounded by the provider's `timeout`. A gRPC check is one unary call of
`envoy.service.auth.v3.Authorization/Check` over the pool's HTTP/2 connection (the
messages are xds-protos' protobuf classes; the pool already verifies the authorizer's
SPIFFE identity, which a grpcio channel could not). Answer bodies are read up to
`MAX_BODY` bytes. Failures are the provider's to decide (`failOpen`,
`statusOnError`), never a traceback.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

from mesh import errors
from mesh.compiled import ExtAuthzProvider
from mesh.hosts import canonical_host, service_of_host
from mesh.logs import get_logger
from proxy.destinations import DestinationCache
from proxy.forward import FLAGS_HEADER, Outcome, PoolSet, local_reply
from proxy.http import Exchange, Request, UpstreamError
from proxy.http.pool import UpstreamPool
from proxy.peer import peer_of
from proxy.policy import ext_authz_grpc
from proxy.policy.ext_authz import (
    EXT_AUTHZ_FLAG,
    CheckRequest,
    CheckResult,
    check_failed,
    check_request,
    check_result,
)
from proxy.policy.ext_authz_grpc import CheckFacts, GrpcCallError, GrpcCheckResult

SERVER_HEADER = ("server", "meshwork")

log = get_logger("proxy.ext_authz")

MAX_BODY = 64 * 1024


class ExtAuthzClient:
    def __init__(
        self,
        cache: DestinationCache,
        pools: PoolSet,
        namespace: str,
        rand: random.Random | None = None,
        identity: str = "",
    ) -> None:
        self.cache = cache
        self.pools = pools
        self.namespace = namespace
        self.rand = rand or random.Random()
        # this workload's SPIFFE ID: the gRPC check's destination principal
        self.identity = identity

    async def check(self, provider: ExtAuthzProvider, req: Request) -> CheckResult:
        """One HTTP check about `req` (its body buffered first when the provider
        includes it)."""
        try:
            async with asyncio.timeout(provider.timeout_ms / 1000):
                peeked = await peek_body(provider, req)
                if peeked is None:
                    return TOO_LARGE
                body, partial = peeked
                request = check_request(
                    provider, req.method, req.path, req.headers, body, partial_body=partial
                )
                status, answer_headers, body = await self._exchange(provider, request)
        except TimeoutError:
            return self._failed(provider, "timeout")
        except (UpstreamError, errors.MeshError, OSError, ValueError) as e:
            return self._failed(provider, f"{type(e).__name__}: {e}")
        return check_result(provider, status, answer_headers, body)

    def _failed(self, provider: ExtAuthzProvider, error: str) -> CheckResult:
        log.warning("ext_authz.failed", provider=provider.name, error=error)
        return check_failed(provider, error)

    async def check_grpc(self, provider: ExtAuthzProvider, req: Request) -> GrpcCheckResult:
        """One `Authorization/Check` call about `req` (its body buffered first when the
        provider includes it)."""
        try:
            async with asyncio.timeout(provider.timeout_ms / 1000):
                facts = await self._facts(provider, req)
                if facts is None:
                    return GrpcCheckResult(TOO_LARGE)
                message = ext_authz_grpc.check_request(provider, facts)
                pool, authority = await self._pool(provider)
                headers = ext_authz_grpc.grpc_headers(provider, authority)
                response = await pool.request(
                    "POST", ext_authz_grpc.CHECK_PATH, headers, ext_authz_grpc.frame(message)
                )
                try:
                    body = await _read(response.body)
                    ext_authz_grpc.call_status(
                        response.status, response.headers, response.body.trailers
                    )
                finally:
                    response.close()
                return ext_authz_grpc.check_response(provider, ext_authz_grpc.unframe(body))
        except TimeoutError:
            return GrpcCheckResult(self._failed(provider, "timeout"))
        except (GrpcCallError, UpstreamError, errors.MeshError, OSError, ValueError) as e:
            return GrpcCheckResult(self._failed(provider, f"{type(e).__name__}: {e}"))

    async def _facts(self, provider: ExtAuthzProvider, req: Request) -> CheckFacts | None:
        """What the check says of `req`; None when its body is larger than the
        provider's `maxRequestBytes` and a partial one is not allowed (Envoy answers
        413 without asking)."""
        peeked = await peek_body(provider, req)
        if peeked is None:
            return None
        body, partial = peeked
        size = req.content_length if req.content_length is not None else -1
        if provider.max_request_bytes and req.body.complete and not partial:
            size = len(body)
        return CheckFacts(
            method=req.method,
            path=req.path,
            host=req.authority,
            scheme=req.scheme or ("https" if req.ssl_object is not None else "http"),
            protocol=f"HTTP/{req.http_version}" if req.http_version else "HTTP/1.1",
            headers=req.headers,
            source=req.peer or ("", 0),
            source_principal=peer_of(req.ssl_object).spiffe_id,
            destination=req.local or ("", 0),
            destination_principal=self.identity,
            body=body,
            body_size=size,
            partial_body=partial,
        )

    async def _pool(self, provider: ExtAuthzProvider) -> tuple[UpstreamPool, str]:
        """The pool of one endpoint of the provider's service, and its authority."""
        fqdn = canonical_host(provider.service, self.namespace)
        ref = service_of_host(fqdn)
        if ref is None or ref.name == "*":
            raise ValueError(f"{provider.service} is not a mesh service")
        dest = await self.cache.get(ref)
        cluster = dest.cluster("", self.rand)
        if cluster is None:
            raise ValueError(f"no cluster for {ref}")
        endpoint = cluster.choose(None, frozenset(), time.monotonic())
        if endpoint is None:
            raise ValueError(f"no endpoint of {ref}")
        pool = self.pools.get(endpoint.address, endpoint.identity, cluster.pool_options)
        return pool, f"{fqdn}:{provider.port}"

    async def _exchange(
        self, provider: ExtAuthzProvider, request: CheckRequest
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        method, path, headers, body = request
        pool, _ = await self._pool(provider)
        response = await pool.request(method, path, headers, body)
        try:
            body = await _read(response.body)
            return response.status, list(response.headers), body
        finally:
            response.close()


# Envoy's answer when the body is larger than `maxRequestBytes` and a partial one is
# not allowed: the authorizer is not asked
TOO_LARGE = CheckResult(False, 413, b"Payload Too Large")


async def peek_body(provider: ExtAuthzProvider, req: Request) -> tuple[bytes, bool] | None:
    """(the body to send in the check, whether it was cut short): nothing unless the
    provider includes the body; None when it is larger than `maxRequestBytes` and a
    partial one is not allowed. The body stays in the stream for the upstream."""
    if not provider.max_request_bytes:
        return b"", False
    # one byte more than allowed tells "larger"
    peeked = await req.body.peek(provider.max_request_bytes + 1)
    if len(peeked) <= provider.max_request_bytes:
        return peeked, False
    if not provider.allow_partial_message:
        return None
    return peeked[: provider.max_request_bytes], True


async def _read(stream: AsyncIterator[bytes]) -> bytes:
    body = bytearray()
    async for chunk in stream:
        body += chunk
        if len(body) > MAX_BODY:
            raise ValueError(f"authorizer answer larger than {MAX_BODY} bytes")
    return bytes(body)


async def check_custom(
    client: ExtAuthzClient | None,
    providers: dict[str, ExtAuthzProvider],
    provider_name: str,
    policy_ref: str,
    req: Request,
    ex: Exchange,
) -> tuple[Outcome | None, CheckResult | None]:
    """Ask the CUSTOM policy's provider about `req`: (the reply sent when it refused,
    None) or (None, its allowing result: headers for upstream and downstream)."""
    provider = providers.get(provider_name)
    if provider is None or client is None:
        # Istio: a CUSTOM policy naming an undefined provider denies what it matches
        outcome = await local_reply(
            ex,
            403,
            EXT_AUTHZ_FLAG,
            f"RBAC: access denied (CUSTOM policy {policy_ref}: extension provider "
            f"{provider_name!r} is not defined in the root namespace's MeshConfig)",
        )
        return outcome, None
    if provider.protocol == "grpc":
        checked = await client.check_grpc(provider, req)
        result = checked.result
        if result.allowed:
            # applied here: removals and appends are beyond `with_upstream_headers`
            req.headers = ext_authz_grpc.with_grpc_headers(req.headers, checked)
            return None, result._replace(upstream_headers=())
    else:
        result = await client.check(provider, req)
    if result.allowed:
        return None, result
    if not result.body:
        reason = "ext_authz check failed" if result.error else "denied by ext_authz"
        outcome = await local_reply(
            ex, result.status, EXT_AUTHZ_FLAG, reason, list(result.downstream_headers)
        )
        return outcome, None
    headers = [*result.downstream_headers, (FLAGS_HEADER, EXT_AUTHZ_FLAG), SERVER_HEADER]
    await ex.respond(result.status, headers, result.body)
    return Outcome(result.status, EXT_AUTHZ_FLAG), None
