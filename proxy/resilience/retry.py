"""Retry decisions with Envoy's semantics, as Istio configures them. Pure, no I/O.

The data path keeps one `RetryState` per request, a small state machine over
attempt outcomes: `plan` says how long the next attempt may take (per-try timeout cut
to what is left of the route's) and which endpoints to avoid; `judge` classifies an
attempt's `Outcome` against the policy's conditions (`decide_retry`: retry, final,
attempts exhausted (flag URX), or the body cannot be replayed); on RETRY the data path
reserves a retry with the destination's `CircuitBreaker.try_acquire_retry` (the retry
budget, state shared by every request to the cluster, so not the state machine's),
and `retried` counts it, remembers the endpoint and says how long to back off.

Conditions follow Envoy's router (`x-envoy-retry-on` / `x-envoy-retry-grpc-on`):
- `5xx`: any 5xx response, and any attempt that got no response (connect failure,
  reset, refused stream, per-try timeout);
- `gateway-error`: 502, 503, 504, and likewise any attempt without a response (Envoy
  counts a reset as the 503 it turns into);
- `reset`: any attempt without a response (disconnect, reset, per-try timeout);
- `reset-before-request`: a failure before the request was sent (connect failure, or
  a reset before the request headers went out);
- `connect-failure`: connection failures (refused, unreachable, connect timeout);
- `refused-stream`: an HTTP/2 REFUSED_STREAM (never with HTTP/1.1 upstreams);
- `retriable-4xx`: 409; `retriable-status-codes`: the policy's numeric codes;
- `envoy-ratelimited`: a response carrying `x-envoy-ratelimited`;
- gRPC (`cancelled` 1, `deadline-exceeded` 4, `resource-exhausted` 8, `internal` 13,
  `unavailable` 14): the response's `grpc-status`;
- `retriable-headers` never matches: a VirtualService cannot list the headers.
A circuit-breaker overflow is never retried (Envoy does not either).

Sources: Envoy router filter docs (x-envoy-retry-on, retry back-off), Envoy
`RetryStateImpl::wouldRetryFromReset` (resets count as 5xx and gateway errors), Istio
`pilot/pkg/networking/core/route/retry` (`DefaultPolicy`, `ConvertPolicy`), Envoy
`circuit_breaker.proto` (`RetryBudget`: 20 %, minimum 3).
"""

from __future__ import annotations

import enum
import functools
from typing import NamedTuple

from mesh.compiled import RetryPolicy
from proxy.response_flags import ResponseFlag

# Envoy's defaults: 25 ms base interval, maximum 10x the base
BACKOFF_BASE_MS = 25
BACKOFF_MAX_FACTOR = 10
# request bodies are kept for replay up to this size; larger ones are not retried
# once any of their bytes was sent
REPLAY_LIMIT_BYTES = 64 * 1024

_GRPC_CODES = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}
_GATEWAY_ERRORS = frozenset({502, 503, 504})
_RETRIABLE_4XX = frozenset({409})


class Failure(enum.StrEnum):
    """Why an attempt produced no response."""

    CONNECT_FAILURE = "connect-failure"  # refused, unreachable, connect timeout
    RESET = "reset"  # connection closed or reset before a complete response head
    REFUSED_STREAM = "refused-stream"  # HTTP/2 REFUSED_STREAM
    TIMEOUT = "timeout"  # the per-try timeout fired
    OVERFLOW = "overflow"  # a circuit breaker refused the attempt (never retried)


class Outcome(NamedTuple):
    """One attempt's result: a response (`status`) or a `failure`, never both."""

    status: int = 0
    failure: Failure | None = None
    # the response's grpc-status (headers or trailers), when it had one
    grpc_status: int | None = None
    # False when the failure came before the request headers were written
    request_sent: bool = True
    # the response carried `x-envoy-ratelimited`
    ratelimited: bool = False

    @classmethod
    def response(
        cls, status: int, *, grpc_status: int | None = None, ratelimited: bool = False
    ) -> Outcome:
        return cls(status=status, grpc_status=grpc_status, ratelimited=ratelimited)

    @classmethod
    def failed(cls, failure: Failure, *, request_sent: bool = True) -> Outcome:
        sent = request_sent and failure is not Failure.CONNECT_FAILURE
        return cls(failure=failure, request_sent=sent)


class RetryConditions(NamedTuple):
    """A policy's `retry_on`, parsed once per policy (see `retry_on`)."""

    on_5xx: bool = False
    gateway_error: bool = False
    reset: bool = False
    reset_before_request: bool = False
    connect_failure: bool = False
    refused_stream: bool = False
    retriable_4xx: bool = False
    envoy_ratelimited: bool = False
    status_codes: frozenset[int] = frozenset()
    grpc_statuses: frozenset[int] = frozenset()


class RetryVerdict(enum.StrEnum):
    RETRY = "retry"
    # the outcome is final (a success, or a failure the policy does not retry)
    FINAL = "final"
    # retriable, but the policy's attempts are used up: report flag URX
    EXHAUSTED = "exhausted"
    # retriable, but the request body can no longer be replayed
    NOT_REPLAYABLE = "not-replayable"

    @property
    def flag(self) -> str:
        """Envoy's response flag for this verdict ("" when none applies)."""
        return ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED if self is RetryVerdict.EXHAUSTED else ""


def default_policy() -> RetryPolicy:
    """Istio's policy for a rule without `retries`: 2 retries on connect-failure,
    refused-stream, unavailable, cancelled and 503, preferring untried hosts."""
    return _DEFAULT_POLICY


_DEFAULT_POLICY = RetryPolicy()


@functools.lru_cache(maxsize=256)
def retry_on(policy: RetryPolicy) -> RetryConditions:
    """The conditions of `policy` (cached: compiled policies are frozen and shared)."""
    tokens = frozenset(policy.retry_on)
    codes = frozenset(policy.retriable_status_codes)
    return RetryConditions(
        on_5xx="5xx" in tokens,
        gateway_error="gateway-error" in tokens,
        reset="reset" in tokens,
        reset_before_request="reset-before-request" in tokens,
        connect_failure="connect-failure" in tokens,
        refused_stream="refused-stream" in tokens,
        retriable_4xx="retriable-4xx" in tokens,
        envoy_ratelimited="envoy-ratelimited" in tokens,
        # Istio adds the token whenever it lists codes; honour codes only with it
        status_codes=codes if "retriable-status-codes" in tokens else frozenset(),
        grpc_statuses=frozenset(code for name, code in _GRPC_CODES.items() if name in tokens),
    )


def should_retry(conditions: RetryConditions, outcome: Outcome) -> bool:
    """Whether `outcome` matches a retry condition (attempts and budget aside)."""
    failure = outcome.failure
    if failure is not None:
        if failure is Failure.OVERFLOW:
            return False
        if conditions.on_5xx or conditions.gateway_error or conditions.reset:
            return True
        if conditions.reset_before_request and not outcome.request_sent:
            return True
        if conditions.connect_failure and failure is Failure.CONNECT_FAILURE:
            return True
        return conditions.refused_stream and failure is Failure.REFUSED_STREAM
    status = outcome.status
    return (
        (conditions.on_5xx and 500 <= status <= 599)
        or (conditions.gateway_error and status in _GATEWAY_ERRORS)
        or (conditions.retriable_4xx and status in _RETRIABLE_4XX)
        or status in conditions.status_codes
        or (conditions.envoy_ratelimited and outcome.ratelimited)
        or (outcome.grpc_status is not None and outcome.grpc_status in conditions.grpc_statuses)
    )


def decide_retry(
    conditions: RetryConditions,
    outcome: Outcome,
    *,
    retries_done: int,
    attempts: int,
    replayable: bool = True,
) -> RetryVerdict:
    """What to do after an attempt: `attempts` is the policy's retry count."""
    if not should_retry(conditions, outcome):
        return RetryVerdict.FINAL
    if retries_done >= attempts:
        return RetryVerdict.EXHAUSTED
    if not replayable:
        return RetryVerdict.NOT_REPLAYABLE
    return RetryVerdict.RETRY


class AttemptPlan(NamedTuple):
    """What the next attempt of a request may do."""

    # how long it may wait for the response head; None: no limit
    timeout_ms: float | None
    # its timeout would be the route's: it ends the request (504 UT), never retried
    route_bound: bool
    # endpoints to avoid (the ones tried, with `ignore_previous_hosts`)
    exclude: frozenset[str]


_NOTHING: frozenset[str] = frozenset()


class RetryState:
    """One request's attempts under a retry policy and the route's `timeout`: a state
    machine over outcomes, fed the clock (`now`, monotonic seconds) and the jitter
    draw (`rand` in [0, 1)). The route's timeout covers every attempt and backoff.

        state = RetryState(policy, retry_on(policy), route.timeout_ms, now)
        plan = state.plan(now)          # None: the route's time is up (504 UT)
        ... attempt under plan.timeout_ms, avoiding plan.exclude ...
        verdict = state.judge(outcome, replayable=...)
        if verdict is RETRY and <the budget grants a retry>:
            wait_ms = state.retried(endpoint, now, rand)
    """

    __slots__ = ("conditions", "policy", "retries", "route_ms", "started", "tried")

    def __init__(
        self,
        policy: RetryPolicy,
        conditions: RetryConditions,
        route_timeout_ms: int,
        started: float,
    ) -> None:
        self.policy = policy
        self.conditions = conditions
        self.route_ms = route_timeout_ms
        self.started = started
        self.retries = 0
        self.tried: frozenset[str] = _NOTHING

    def plan(self, now: float) -> AttemptPlan | None:
        """The next attempt's bounds; None when the route's timeout has passed."""
        per_try_ms = self.policy.per_try_timeout_ms
        route_ms = self.route_ms
        exclude = self.tried if self.policy.ignore_previous_hosts else _NOTHING
        if not (route_ms or per_try_ms):
            return AttemptPlan(None, False, exclude)
        elapsed_ms = (now - self.started) * 1000
        limit_ms = attempt_timeout_ms(per_try_ms, route_ms, elapsed_ms)
        if limit_ms is not None and limit_ms <= 0:
            return None
        # a timeout is the route's when what is left of it is the tighter bound
        route_bound = bool(route_ms) and (not per_try_ms or route_ms - elapsed_ms <= per_try_ms)
        return AttemptPlan(limit_ms, route_bound, exclude)

    def judge(self, outcome: Outcome, *, replayable: bool = True) -> RetryVerdict:
        """What to do after an attempt that ended with `outcome`."""
        return decide_retry(
            self.conditions,
            outcome,
            retries_done=self.retries,
            attempts=self.policy.attempts,
            replayable=replayable,
        )

    def retried(self, endpoint: str, now: float, rand: float) -> float:
        """A retry was granted after an attempt to `endpoint`: milliseconds to wait
        before it (jittered backoff, cut to what is left of the route's timeout)."""
        self.retries += 1
        self.tried = self.tried | {endpoint}
        wait_ms = backoff_ms(self.retries, rand, self.policy.backoff_base_ms)
        if self.route_ms:
            wait_ms = min(wait_ms, self.route_ms - (now - self.started) * 1000)
        return wait_ms

    def needs_judging(self, status: int, *, grpc: bool) -> bool:
        """Whether a response with `status` could be retried at all (a cheap test
        before reading its headers: most answers are final)."""
        conditions = self.conditions
        return (
            status >= 400
            or status in conditions.status_codes
            or grpc
            or conditions.envoy_ratelimited
        )


def backoff_ms(
    retry: int,
    rand: float,
    base_ms: float = BACKOFF_BASE_MS,
    max_ms: float | None = None,
) -> float:
    """Milliseconds to wait before retry number `retry` (1 = the first retry).

    Envoy's fully jittered exponential back-off: uniform in [0, (2^retry - 1) * base),
    the upper bound capped at `max_ms` (default 10x base). With 25 ms: 0-25 ms, then
    0-75, 0-175, then 0-250 from the fourth retry on.
    """
    cap = BACKOFF_MAX_FACTOR * base_ms if max_ms is None else max_ms
    upper = min((2 ** max(retry, 1) - 1) * base_ms, cap)
    return rand * upper


def attempt_timeout_ms(
    per_try_timeout_ms: int, route_timeout_ms: int, elapsed_ms: float
) -> float | None:
    """How long the next attempt may take: its per-try timeout, cut to what is left of
    the route's `timeout` (which covers every attempt, as in Istio). None: no limit.
    0 or less: the route's time is up (answer 504, flag UT)."""
    limits = [float(per_try_timeout_ms)] if per_try_timeout_ms else []
    if route_timeout_ms:
        limits.append(route_timeout_ms - elapsed_ms)
    return min(limits) if limits else None


def should_buffer(content_length: int | None) -> bool:
    """Whether to keep the request body for a replay (unknown length: up to the limit)."""
    return content_length is None or content_length <= REPLAY_LIMIT_BYTES


def can_replay(content_length: int | None, bytes_sent: int) -> bool:
    """Whether the request can be sent again after `bytes_sent` body bytes went out.

    Nothing sent: always (the body is still unread). Otherwise only while everything
    sent is still buffered: a declared length within the limit, or a chunked body
    that has not outgrown it.
    """
    if bytes_sent == 0:
        return True
    return should_buffer(content_length) and bytes_sent <= REPLAY_LIMIT_BYTES


class RetryBudget(NamedTuple):
    """Envoy's retry budget: concurrent retries may not exceed `budget_percent` % of
    the active (and pending) requests, but `min_retry_concurrency` are always allowed.
    Stops retries from multiplying load when every endpoint fails."""

    budget_percent: float = 20.0
    min_retry_concurrency: int = 3

    def max_retries(self, active_requests: int, pending_requests: int = 0) -> int:
        # Envoy truncates the share to an integer before comparing
        share = int(self.budget_percent / 100.0 * (active_requests + pending_requests))
        return max(share, self.min_retry_concurrency)

    def allows(self, active_retries: int, active_requests: int, pending_requests: int = 0) -> bool:
        """Whether one more retry may start while `active_retries` are in flight."""
        return active_retries < self.max_retries(active_requests, pending_requests)
