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

Each attempt is `proxy.cluster_send.send` (endpoint, pool, request, outlier feed, the
one failure mapping); the retry bookkeeping is `proxy.resilience.RetryState`'s. This
module admits the request, waits and relays.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from mesh.compiled import HTTPRoute, RetryPolicy
from mesh.messages import Endpoint
from proxy import cluster_send
from proxy.cluster_send import Request, no_healthy_upstream, overflow
from proxy.clusters import Cluster
from proxy.forward import Outcome, PoolSet, ResponseHeaders, local_reply, relay
from proxy.http import BodyStream, Exchange, UpstreamResponse, get_header
from proxy.resilience import (
    REPLAY_LIMIT_BYTES,
    Failure,
    RetryConditions,
    RetryState,
    RetryVerdict,
    default_policy,
    retry_on,
)
from proxy.resilience import Outcome as AttemptResult
from proxy.response_flags import join_flags
from proxy.routing import HashContext
from proxy.upstream_failure import TIMED_OUT

__all__ = ["Request", "buffered_body", "send"]


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
        refused = overflow(cluster)
        return await local_reply(ex, refused.status, refused.flag, refused.details)
    policy = route.retries or _DEFAULT_POLICY
    state = RetryState(policy, _conditions(policy), route.timeout_ms, time.monotonic())
    body = request.body
    holding_retry = False
    try:
        while True:
            plan = state.plan(time.monotonic())
            if plan is None:  # the route's time is up
                cluster.counters["timeouts"] += 1
                return await local_reply(ex, TIMED_OUT.status, TIMED_OUT.flag, TIMED_OUT.details)
            attempt = await cluster_send.send(
                cluster,
                pools,
                request,
                hash_ctx=hash_ctx,
                exclude=plan.exclude,
                timeout_ms=plan.timeout_ms,
                on_endpoint=on_endpoint,
            )
            if holding_retry:
                # the retry this attempt was is over
                breaker.release_retry()
                holding_retry = False
            if attempt is None:
                return await local_reply(ex, *no_healthy_upstream(cluster))
            resp, failed = attempt.response, attempt.failure
            verdict = RetryVerdict.FINAL
            if resp is not None:
                if state.needs_judging(resp.status, grpc=request.grpc):
                    result = _result_of(resp, request.grpc, state.conditions.envoy_ratelimited)
                    verdict = state.judge(result, replayable=_replayable(body))
            else:
                assert failed is not None
                if failed.failure is Failure.OVERFLOW:  # never retried
                    return await local_reply(ex, failed.status, failed.flag, failed.details)
                if failed.failure is Failure.TIMEOUT and plan.route_bound:
                    cluster.counters["timeouts"] += 1
                    return await local_reply(ex, failed.status, failed.flag, failed.details)
                verdict = state.judge(
                    AttemptResult.failed(failed.failure), replayable=_replayable(body)
                )
            if verdict is RetryVerdict.RETRY and breaker.try_acquire_retry():
                holding_retry = True
                if resp is not None:
                    resp.close()
                    attempt.finished()
                cluster.counters["retries"] += 1
                now = time.monotonic()
                wait_ms = state.retried(attempt.endpoint.instance, now, rand.random())
                if wait_ms > 0:
                    await asyncio.sleep(wait_ms / 1000)
                continue
            exhausted = verdict.flag
            if exhausted:
                cluster.counters["retries_exhausted"] += 1
            if resp is None:
                assert failed is not None
                flags = join_flags(failed.flag, exhausted)
                outcome = await local_reply(ex, failed.status, flags, failed.details)
                outcome.upstream = attempt.endpoint.address  # where the last attempt went
                return outcome
            try:
                await relay(ex, resp, response_headers)
            finally:
                attempt.finished()
            return Outcome(resp.status, exhausted, attempt.endpoint.address)
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
