"""Sending one routed request to its cluster, resiliently: circuit-breaker admission,
attempts under the per-try and route timeouts, retries on other endpoints after a
jittered backoff and within the retry budget, and every attempt's result fed to the
outlier detector. The decisions are `proxy.resilience`'s; this module waits and sends.

Semantics (Envoy's router as Istio configures it):
- the route's `timeout` bounds the whole exchange up to the response head, every
  attempt and backoff included: when it passes, 504 `UT`, no further retry;
- `perTryTimeout` bounds one attempt; one that times out is a retriable failure
  (504 `UT,URX` when it was the last);
- a request is admitted when the cluster has room for one more in flight
  (`http2MaxRequests`), else 503 `UO` at once; waiting for a connection beyond
  `http1MaxPendingRequests` is refused the same way; overflows are never retried;
- each retry must find room under `maxRetries` and the retry budget (20 % of the
  requests in flight, at least 3); when it does not, the last answer stands;
- a request can be sent again only while its body can: `body` as bytes (buffered by
  the caller), an empty body, or a stream nothing was read from yet (the first
  attempt could not connect). A streamed body already (partly) sent is not retried;
- when the attempts run out, the last response is relayed with flag `URX`, or the
  last failure answered locally with its flag and `URX` (`UF,URX`).

Timeouts cover the wait for the response head; once it is relayed, the body streams
at the pace of both ends (as the existing route `timeout` always did here).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import NamedTuple

from mesh.compiled import HTTPRoute, RetryPolicy
from mesh.messages import Endpoint
from proxy.clusters import Cluster
from proxy.forward import Outcome, PoolSet, local_reply, relay
from proxy.http import (
    BodyStream,
    Exchange,
    UpstreamError,
    UpstreamResponse,
    get_header,
)
from proxy.resilience import (
    REPLAY_LIMIT_BYTES,
    Failure,
    RetryConditions,
    RetryVerdict,
    attempt_timeout_ms,
    backoff_ms,
    decide_retry,
    default_policy,
    retry_on,
)
from proxy.resilience import Outcome as AttemptResult
from proxy.response_flags import ResponseFlag, join_flags
from proxy.routing import HashContext
from proxy.upstream_failure import TIMED_OUT, UpstreamFailure, upstream_failure

ResponseHeaders = Callable[[list[tuple[str, str]]], list[tuple[str, str]]]

_NOTHING: frozenset[str] = frozenset()


class Request(NamedTuple):
    """What goes upstream, the same for every attempt."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes | BodyStream
    # the downstream request is gRPC (then `grpc-status` decides gRPC retry conditions)
    grpc: bool = False


async def buffered_body(body: BodyStream) -> bytes | BodyStream:
    """The request body as bytes when it may be kept for replays (and mirrors): a
    declared length up to 64 KiB (read now), or a chunked body that already arrived
    whole within that size. Anything else stays a stream and is sent as it comes."""
    length = body.length
    if length == 0:
        return b""
    if length is not None:
        return await body.read_all(REPLAY_LIMIT_BYTES) if length <= REPLAY_LIMIT_BYTES else body
    if body.complete and not body.failed and body.untouched and body.buffered <= REPLAY_LIMIT_BYTES:
        return b"".join(body.take_ready())
    return body


async def send(
    ex: Exchange,
    request: Request,
    *,
    cluster: Cluster,
    pools: PoolSet,
    route: HTTPRoute,
    hash_ctx: HashContext | None,
    rand: random.Random,
    response_headers: ResponseHeaders | None = None,
    on_endpoint: Callable[[Endpoint], None] | None = None,
) -> Outcome:
    """Answer `ex` with the cluster's response to `request` (or a local reply)."""
    breaker = cluster.breaker
    if not breaker.try_acquire_request():
        cluster.counters["overflows"] += 1
        return await local_reply(
            ex,
            503,
            ResponseFlag.UPSTREAM_OVERFLOW,
            f"upstream overflow: too many requests in flight to {cluster.name}",
        )
    # One coroutine for the whole request, and no retry bookkeeping until a first
    # attempt fails: a request without resilience settings costs little more than
    # a plain forward.
    policy = route.retries or _DEFAULT_POLICY
    conditions = _conditions(policy)
    route_ms = route.timeout_ms
    per_try_ms = policy.per_try_timeout_ms
    started = now = time.monotonic()
    body = request.body
    tried: set[str] | None = None
    retries = 0
    holding_retry = False
    try:
        while True:
            limit_ms: float | None = None
            route_bound = False
            if route_ms or per_try_ms:
                elapsed_ms = (now - started) * 1000
                limit_ms = attempt_timeout_ms(per_try_ms, route_ms, elapsed_ms)
                if limit_ms is not None and limit_ms <= 0:
                    cluster.counters["timeouts"] += 1
                    return await local_reply(
                        ex, TIMED_OUT.status, TIMED_OUT.flag, TIMED_OUT.details
                    )
                # a timeout is the route's when what is left of it is the tighter bound
                route_bound = bool(route_ms) and (
                    not per_try_ms or route_ms - elapsed_ms <= per_try_ms
                )
            exclude = (
                frozenset(tried) if tried is not None and policy.ignore_previous_hosts else _NOTHING
            )
            endpoint = cluster.choose(hash_ctx, exclude, now)
            if endpoint is None:
                return await local_reply(
                    ex,
                    503,
                    ResponseFlag.NO_HEALTHY_UPSTREAM,
                    f"no healthy upstream for {cluster.name}",
                )
            if on_endpoint is not None:
                on_endpoint(endpoint)
            instance = endpoint.instance
            balancer = cluster.balancer
            pool = pools.get(
                endpoint.address, endpoint.identity, cluster.pool_options, cluster.origination
            )
            resp: UpstreamResponse | None = None
            failed: UpstreamFailure | None = None
            balancer.on_request_start(instance)
            try:
                if limit_ms is None:
                    resp = await pool.request(request.method, request.path, request.headers, body)
                else:
                    async with asyncio.timeout(limit_ms / 1000):
                        resp = await pool.request(
                            request.method, request.path, request.headers, body
                        )
            except (TimeoutError, UpstreamError) as e:
                failed = upstream_failure(e)
                assert failed is not None  # every UpstreamError and TimeoutError is one
                if failed.failure is Failure.OVERFLOW:
                    balancer.on_request_end(instance)
                    cluster.counters["overflows"] += 1
                    return await local_reply(ex, failed.status, failed.flag, failed.details)
            except BaseException:
                balancer.on_request_end(instance)
                raise
            if holding_retry:
                # the retry this attempt was is over
                breaker.release_retry()
                holding_retry = False
            verdict = RetryVerdict.FINAL
            if resp is not None:
                status = resp.status
                if cluster.detector is not None:
                    cluster.report(instance, status, time.monotonic())
                if (
                    status >= 400
                    or status in conditions.status_codes
                    or request.grpc
                    or conditions.envoy_ratelimited
                ):
                    result = _result_of(resp, request.grpc, conditions.envoy_ratelimited)
                    verdict = decide_retry(
                        conditions,
                        result,
                        retries_done=retries,
                        attempts=policy.attempts,
                        replayable=_replayable(body),
                    )
            else:
                assert failed is not None
                balancer.on_request_end(instance)
                origin = failed.local_origin
                if origin is not None:
                    cluster.report(instance, origin, time.monotonic())
                if failed.failure is Failure.TIMEOUT and route_bound:
                    cluster.counters["timeouts"] += 1
                    return await local_reply(ex, failed.status, failed.flag, failed.details)
                verdict = decide_retry(
                    conditions,
                    AttemptResult.failed(failed.failure),
                    retries_done=retries,
                    attempts=policy.attempts,
                    replayable=_replayable(body),
                )
            if verdict is RetryVerdict.RETRY and breaker.try_acquire_retry():
                holding_retry = True
                if resp is not None:
                    resp.close()
                    balancer.on_request_end(instance)
                retries += 1
                cluster.counters["retries"] += 1
                if tried is None:
                    tried = set()
                tried.add(instance)
                now = time.monotonic()
                wait_ms = backoff_ms(retries, rand.random(), policy.backoff_base_ms)
                if route_ms:
                    wait_ms = min(wait_ms, route_ms - (now - started) * 1000)
                if wait_ms > 0:
                    await asyncio.sleep(wait_ms / 1000)
                    now = time.monotonic()
                continue
            exhausted = verdict.flag
            if exhausted:
                cluster.counters["retries_exhausted"] += 1
            if resp is None:
                assert failed is not None
                flags = join_flags(failed.flag, exhausted)
                outcome = await local_reply(ex, failed.status, flags, failed.details)
                outcome.upstream = endpoint.address  # the endpoint the last attempt went to
                return outcome
            try:
                await relay(ex, resp, response_headers)
            finally:
                balancer.on_request_end(instance)
            return Outcome(resp.status, exhausted, endpoint.address)
    finally:
        if holding_retry:
            breaker.release_retry()
        breaker.release_request()


_DEFAULT_POLICY = default_policy()
_DEFAULT_CONDITIONS = retry_on(_DEFAULT_POLICY)
# explicit policies' conditions by object (hashing a policy costs more than parsing it)
_CONDITIONS: dict[int, tuple[RetryPolicy, RetryConditions]] = {}


def _conditions(policy: RetryPolicy) -> RetryConditions:
    if policy is _DEFAULT_POLICY:
        return _DEFAULT_CONDITIONS
    hit = _CONDITIONS.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    if len(_CONDITIONS) >= 1024:
        _CONDITIONS.clear()
    conditions = retry_on(policy)
    _CONDITIONS[id(policy)] = (policy, conditions)
    return conditions


def _replayable(body: bytes | BodyStream) -> bool:
    return isinstance(body, bytes) or body.untouched


def _result_of(resp: UpstreamResponse, grpc: bool, ratelimited: bool) -> AttemptResult:
    grpc_status: int | None = None
    if grpc:
        value = get_header(resp.headers, "grpc-status")
        if value is not None and value.isdigit():
            grpc_status = int(value)
    limited = ratelimited and get_header(resp.headers, "x-envoy-ratelimited") is not None
    return AttemptResult.response(resp.status, grpc_status=grpc_status, ratelimited=limited)
