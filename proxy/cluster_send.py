"""The one upstream path: what every listener does to send to a cluster.

`send(cluster, pools, request)` is one attempt: choose the endpoint (the cluster's
balancer, skipping ejected endpoints and the ones to avoid), take its pool (the
cluster's connection-pool options and TLS origination), send the request within the
attempt's timeout, turn a failure into an `UpstreamFailure` (the one mapping,
`proxy.upstream_failure`) and feed the outcome to the outlier detector. The request's
admission by the circuit breaker (`admit`) is the caller's, since it spans every
attempt of a request: `proxy.attempts` (outbound and gateway, with retries),
`exchange` (inbound: the app as a cluster of one endpoint), `proxy.mirroring` (the
copy). `connect` is the connect loop of a TCP connection (`proxy.tcp`): an
`EndpointChoice` chooses and learns each connect's outcome (`ClusterEndpoints`: a
cluster's balancer and outlier detector), around the relay's own connect.

The balancer counts the attempt as active (least-request) until `Attempt.finished`:
at once when it failed, after the response was relayed otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol

from mesh.messages import Endpoint
from proxy.clusters import Cluster
from proxy.forward import Outcome, PoolSet, ResponseHeaders, local_reply, relay, request_pool
from proxy.http import BodyStream, Exchange, UpstreamResponse
from proxy.resilience import Failure, LocalOrigin
from proxy.response_flags import ResponseFlag
from proxy.routing import Balancer, HashContext
from proxy.upstream_failure import UpstreamFailure

_NOTHING: frozenset[str] = frozenset()


class Request(NamedTuple):
    """What goes upstream, the same for every attempt."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes | BodyStream
    # the downstream request is gRPC (then `grpc-status` decides gRPC retry conditions)
    grpc: bool = False


class Attempt:
    """One attempt's result: a `response` or a `failure`, never both."""

    __slots__ = ("_balancer", "endpoint", "failure", "response")

    def __init__(
        self,
        balancer: Balancer,
        endpoint: Endpoint,
        response: UpstreamResponse | None,
        failure: UpstreamFailure | None,
    ) -> None:
        self._balancer = balancer
        self.endpoint = endpoint
        self.response = response
        self.failure = failure

    def finished(self) -> None:
        """The response was relayed (or discarded): the endpoint's request is over."""
        self._balancer.on_request_end(self.endpoint.instance)


def overflow(cluster: Cluster) -> UpstreamFailure:
    """The circuit breaker refused the request (`http2MaxRequests`): 503 `UO`."""
    return UpstreamFailure(
        Failure.OVERFLOW,
        ResponseFlag.UPSTREAM_OVERFLOW,
        503,
        f"upstream overflow: too many requests in flight to {cluster.name}",
    )


def no_healthy_upstream(cluster: Cluster) -> tuple[int, ResponseFlag, str]:
    """No endpoint to send to (none, or all ejected): 503 `UH`."""
    return 503, ResponseFlag.NO_HEALTHY_UPSTREAM, f"no healthy upstream for {cluster.name}"


async def send(
    cluster: Cluster,
    pools: PoolSet,
    request: Request,
    *,
    hash_ctx: HashContext | None = None,
    exclude: frozenset[str] = _NOTHING,
    timeout_ms: float | None = None,
    on_endpoint: Callable[[Endpoint], None] | None = None,
) -> Attempt | None:
    """One attempt of `request` to an endpoint of `cluster`; None when there is no
    endpoint to send to (no healthy upstream)."""
    endpoint = cluster.choose(hash_ctx, exclude, time.monotonic())
    if endpoint is None:
        return None
    if on_endpoint is not None:
        on_endpoint(endpoint)
    instance = endpoint.instance
    balancer = cluster.balancer
    pool = pools.get(endpoint.address, endpoint.identity, cluster.pool_options, cluster.origination)
    balancer.on_request_start(instance)
    try:
        answer = await request_pool(
            pool, request.method, request.path, request.headers, request.body, timeout_ms
        )
    except BaseException:
        balancer.on_request_end(instance)
        raise
    if isinstance(answer, UpstreamFailure):
        balancer.on_request_end(instance)
        origin = answer.local_origin
        if origin is not None:
            cluster.report(instance, origin, time.monotonic())
        else:  # the pool's pending queue is full (the breaker's)
            cluster.counters["overflows"] += 1
        return Attempt(balancer, endpoint, None, answer)
    if cluster.detector is not None:
        cluster.report(instance, answer.status, time.monotonic())
    return Attempt(balancer, endpoint, answer, None)


async def exchange(
    ex: Exchange,
    cluster: Cluster,
    pools: PoolSet,
    request: Request,
    *,
    response_headers: ResponseHeaders | None = None,
) -> Outcome:
    """Answer `ex` with `cluster`'s response to `request`, one attempt and no retries
    (the inbound listener's request to its app), or with a local reply."""
    breaker = cluster.breaker
    if not breaker.try_acquire_request():
        cluster.counters["overflows"] += 1
        refused = overflow(cluster)
        return await local_reply(ex, refused.status, refused.flag, refused.details)
    try:
        attempt = await send(cluster, pools, request)
        if attempt is None:
            return await local_reply(ex, *no_healthy_upstream(cluster))
        address = attempt.endpoint.address
        resp = attempt.response
        if resp is None:
            failed = attempt.failure
            assert failed is not None
            outcome = await local_reply(ex, failed.status, failed.flag, failed.details)
            outcome.upstream = address
            return outcome
        try:
            await relay(ex, resp, response_headers)
        finally:
            attempt.finished()
        return Outcome(resp.status, "", address)
    finally:
        breaker.release_request()


class EndpointChoice(Protocol):
    """Where a TCP connection's connect attempts go, and what they learn."""

    def choose(self, tried: frozenset[str]) -> Endpoint | None:
        """The next endpoint to try (avoiding `tried` as the policy says); None: none."""
        ...

    def connected(self, endpoint: Endpoint, ok: bool) -> None:
        """A connect attempt to `endpoint` succeeded (`ok`) or failed."""
        ...


class ClusterEndpoints:
    """A cluster's endpoint choice for TCP connections: its balancer (ejected endpoints
    skipped, tried ones avoided while others remain), connect outcomes fed to its
    outlier detector."""

    __slots__ = ("cluster",)

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def choose(self, tried: frozenset[str]) -> Endpoint | None:
        return self.cluster.choose(None, tried, time.monotonic())

    def connected(self, endpoint: Endpoint, ok: bool) -> None:
        # the connect is the connection's whole outcome (Envoy's tcp_proxy reports
        # LocalOriginConnectSuccessFinal): a success resets the consecutive counters
        origin = LocalOrigin.CONNECT_SUCCESS_FINAL if ok else LocalOrigin.CONNECT_FAILED
        self.cluster.report(endpoint.instance, origin, time.monotonic())


async def connect(
    endpoints: EndpointChoice,
    open_endpoint: Callable[[Endpoint], Awaitable[bool]],
    attempts: int,
) -> tuple[Endpoint | None, set[str]]:
    """Connect a TCP connection to one of `endpoints`, up to `attempts` connect
    attempts (`open_endpoint` connects and says whether it did). The endpoint
    connected to (None: none did) and the instances tried."""
    tried: set[str] = set()
    for _ in range(attempts):
        endpoint = endpoints.choose(frozenset(tried))
        if endpoint is None:
            break
        tried.add(endpoint.instance)
        ok = await open_endpoint(endpoint)
        endpoints.connected(endpoint, ok)
        if ok:
            return endpoint, tried
    return None, tried
