"""Ask an external HTTP authorizer (a CUSTOM AuthorizationPolicy's provider): the I/O
of `proxy.policy.ext_authz`.

The authorizer is a mesh service (`envoyExtAuthzHttp.service`): the check goes to one
of its endpoints through this proxy's destination cache and upstream pools, over
mTLS to its sidecar like any mesh call, bounded by the provider's `timeout`. Its
answer body is read up to `MAX_BODY` bytes. Failures are the provider's to decide
(`failOpen`, `statusOnError`), never a traceback.
"""

from __future__ import annotations

import asyncio
import random
import time

from mesh import errors
from mesh.compiled import ExtAuthzProvider
from mesh.hosts import canonical_host, service_of_host
from mesh.logs import get_logger
from proxy.destinations import DestinationCache
from proxy.forward import FLAGS_HEADER, Outcome, PoolSet, local_reply
from proxy.http import Exchange, Request, UpstreamError
from proxy.policy.ext_authz import (
    EXT_AUTHZ_FLAG,
    CheckRequest,
    CheckResult,
    check_failed,
    check_request,
    check_result,
)

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
    ) -> None:
        self.cache = cache
        self.pools = pools
        self.namespace = namespace
        self.rand = rand or random.Random()

    async def check(
        self,
        provider: ExtAuthzProvider,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
    ) -> CheckResult:
        request = check_request(provider, method, path, headers)
        try:
            async with asyncio.timeout(provider.timeout_ms / 1000):
                status, answer_headers, body = await self._exchange(provider, request)
        except TimeoutError:
            return self._failed(provider, "timeout")
        except (UpstreamError, errors.MeshError, OSError, ValueError) as e:
            return self._failed(provider, f"{type(e).__name__}: {e}")
        return check_result(provider, status, answer_headers, body)

    def _failed(self, provider: ExtAuthzProvider, error: str) -> CheckResult:
        log.warning("ext_authz.failed", provider=provider.name, error=error)
        return check_failed(provider, error)

    async def _exchange(
        self, provider: ExtAuthzProvider, request: CheckRequest
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        method, path, headers = request
        ref = service_of_host(canonical_host(provider.service, self.namespace))
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
        response = await pool.request(method, path, headers, b"")
        try:
            body = bytearray()
            async for chunk in response.body:
                body += chunk
                if len(body) > MAX_BODY:
                    raise ValueError(f"authorizer answer larger than {MAX_BODY} bytes")
            return response.status, list(response.headers), bytes(body)
        finally:
            response.close()


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
    result = await client.check(provider, req.method, req.path, req.headers)
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
