"""Retry decisions: Envoy's retry-on conditions, Istio's default policy, backoff, budget,
attempt timeouts and body replay (pure, no sockets, no sleeps)."""

from __future__ import annotations

import pytest

from mesh.compiled import RetryPolicy
from proxy.resilience import (
    REPLAY_LIMIT_BYTES,
    Failure,
    Outcome,
    RetryBudget,
    RetryConditions,
    RetryVerdict,
    attempt_timeout_ms,
    backoff_ms,
    can_replay,
    decide_retry,
    default_policy,
    retry_on,
    should_buffer,
    should_retry,
)


def conditions(*tokens: str, codes: tuple[int, ...] = ()) -> RetryConditions:
    return retry_on(RetryPolicy(retry_on=tokens, retriable_status_codes=codes))


OK = Outcome.response(200)
CONNECT = Outcome.failed(Failure.CONNECT_FAILURE)
RESET = Outcome.failed(Failure.RESET)
RESET_EARLY = Outcome.failed(Failure.RESET, request_sent=False)
REFUSED = Outcome.failed(Failure.REFUSED_STREAM)
TIMEOUT = Outcome.failed(Failure.TIMEOUT)
OVERFLOW = Outcome.failed(Failure.OVERFLOW)


@pytest.mark.parametrize(
    ("tokens", "codes", "outcome", "retry"),
    [
        # 5xx: every 5xx response and every attempt without a response
        (("5xx",), (), Outcome.response(500), True),
        (("5xx",), (), Outcome.response(503), True),
        (("5xx",), (), Outcome.response(599), True),
        (("5xx",), (), Outcome.response(404), False),
        (("5xx",), (), OK, False),
        (("5xx",), (), CONNECT, True),
        (("5xx",), (), RESET, True),
        (("5xx",), (), REFUSED, True),
        (("5xx",), (), TIMEOUT, True),
        # gateway-error: 502/503/504 and, like Envoy, resets (they become a 503)
        (("gateway-error",), (), Outcome.response(502), True),
        (("gateway-error",), (), Outcome.response(503), True),
        (("gateway-error",), (), Outcome.response(504), True),
        (("gateway-error",), (), Outcome.response(500), False),
        (("gateway-error",), (), RESET, True),
        (("gateway-error",), (), CONNECT, True),
        (("gateway-error",), (), TIMEOUT, True),
        # reset: no response at all, whatever the reason; never a response
        (("reset",), (), RESET, True),
        (("reset",), (), TIMEOUT, True),
        (("reset",), (), CONNECT, True),
        (("reset",), (), Outcome.response(503), False),
        # reset-before-request: only before the request went out
        (("reset-before-request",), (), RESET_EARLY, True),
        (("reset-before-request",), (), CONNECT, True),
        (("reset-before-request",), (), RESET, False),
        # connect-failure / refused-stream: just those
        (("connect-failure",), (), CONNECT, True),
        (("connect-failure",), (), RESET, False),
        (("connect-failure",), (), TIMEOUT, False),
        (("connect-failure",), (), Outcome.response(503), False),
        (("refused-stream",), (), REFUSED, True),
        (("refused-stream",), (), RESET, False),
        # retriable-4xx is 409 only
        (("retriable-4xx",), (), Outcome.response(409), True),
        (("retriable-4xx",), (), Outcome.response(429), False),
        # numeric codes need retriable-status-codes (Istio adds it)
        (("retriable-status-codes",), (503, 429), Outcome.response(429), True),
        (("retriable-status-codes",), (503,), Outcome.response(500), False),
        ((), (503,), Outcome.response(503), False),
        # envoy-ratelimited: the response header decides
        (("envoy-ratelimited",), (), Outcome.response(429, ratelimited=True), True),
        (("envoy-ratelimited",), (), Outcome.response(429), False),
        # gRPC statuses
        (("unavailable",), (), Outcome.response(200, grpc_status=14), True),
        (("cancelled",), (), Outcome.response(200, grpc_status=1), True),
        (("deadline-exceeded",), (), Outcome.response(200, grpc_status=4), True),
        (("resource-exhausted",), (), Outcome.response(200, grpc_status=8), True),
        (("internal",), (), Outcome.response(200, grpc_status=13), True),
        (("unavailable",), (), Outcome.response(200, grpc_status=13), False),
        (("unavailable",), (), Outcome.response(503), False),
        # retriable-headers cannot be configured from a VirtualService: never matches
        (("retriable-headers",), (), Outcome.response(503), False),
        # a circuit-breaker overflow is never retried
        (("5xx", "reset", "gateway-error"), (), OVERFLOW, False),
    ],
)
def test_retry_on_conditions(
    tokens: tuple[str, ...], codes: tuple[int, ...], outcome: Outcome, retry: bool
) -> None:
    assert should_retry(conditions(*tokens, codes=codes), outcome) is retry


def test_default_policy_is_istios() -> None:
    policy = default_policy()
    assert policy.attempts == 2
    assert set(policy.retry_on) == {
        "connect-failure",
        "refused-stream",
        "unavailable",
        "cancelled",
        "retriable-status-codes",
    }
    assert policy.retriable_status_codes == (503,)
    assert policy.ignore_previous_hosts
    parsed = retry_on(policy)
    assert [should_retry(parsed, o) for o in (CONNECT, REFUSED, RESET, TIMEOUT)] == [
        True,
        True,
        False,
        False,
    ]
    assert should_retry(parsed, Outcome.response(503))
    assert not should_retry(parsed, Outcome.response(500))
    assert not should_retry(parsed, Outcome.response(502))
    assert should_retry(parsed, Outcome.response(200, grpc_status=14))


def test_retry_on_is_parsed_once_per_policy() -> None:
    policy = RetryPolicy(retry_on=("5xx",))
    assert retry_on(policy) is retry_on(RetryPolicy(retry_on=("5xx",)))


@pytest.mark.parametrize(
    ("outcome", "retries_done", "replayable", "verdict"),
    [
        (Outcome.response(503), 0, True, RetryVerdict.RETRY),
        (Outcome.response(503), 2, True, RetryVerdict.RETRY),
        (Outcome.response(503), 3, True, RetryVerdict.EXHAUSTED),
        (Outcome.response(503), 0, False, RetryVerdict.NOT_REPLAYABLE),
        (Outcome.response(200), 0, True, RetryVerdict.FINAL),
        (Outcome.response(404), 3, True, RetryVerdict.FINAL),
        (OVERFLOW, 0, True, RetryVerdict.FINAL),
    ],
)
def test_decide_retry(
    outcome: Outcome, retries_done: int, replayable: bool, verdict: RetryVerdict
) -> None:
    got = decide_retry(
        conditions("5xx"), outcome, retries_done=retries_done, attempts=3, replayable=replayable
    )
    assert got is verdict


def test_only_exhausted_attempts_report_urx() -> None:
    assert RetryVerdict.EXHAUSTED.flag == "URX"
    assert {v.flag for v in RetryVerdict if v is not RetryVerdict.EXHAUSTED} == {""}


def test_attempts_zero_never_retries() -> None:
    verdict = decide_retry(conditions("5xx"), RESET, retries_done=0, attempts=0)
    assert verdict is RetryVerdict.EXHAUSTED


@pytest.mark.parametrize(
    ("retry", "rand", "expected"),
    [
        (1, 0.0, 0.0),
        (1, 0.5, 12.5),  # [0, 25)
        (1, 0.999, 24.975),
        (2, 0.999, 74.925),  # [0, 75)
        (3, 0.999, 174.825),  # [0, 175)
        (4, 0.999, 249.75),  # capped at 10x base: [0, 250)
        (10, 0.5, 125.0),
        (0, 0.5, 12.5),  # treated as the first retry
    ],
)
def test_backoff_is_full_jitter_exponential_capped_at_ten_times_base(
    retry: int, rand: float, expected: float
) -> None:
    assert backoff_ms(retry, rand) == pytest.approx(expected)


def test_backoff_follows_the_policy_base() -> None:
    assert backoff_ms(1, 0.999, base_ms=100) == pytest.approx(99.9)
    assert backoff_ms(6, 0.999, base_ms=100) == pytest.approx(999.0)
    assert backoff_ms(6, 0.5, base_ms=100, max_ms=300) == pytest.approx(150.0)


@pytest.mark.parametrize(
    ("active_retries", "active_requests", "pending", "allowed"),
    [
        (0, 0, 0, True),
        (2, 1, 0, True),  # the minimum of 3 concurrent retries always applies
        (3, 1, 0, False),
        (3, 10, 0, False),  # 20% of 10 = 2 < 3
        (3, 20, 0, True),  # 20% of 20 = 4
        (4, 20, 0, False),
        (19, 100, 0, True),
        (20, 100, 0, False),
        (5, 20, 10, True),  # pending requests count: 20% of 30 = 6
        (6, 20, 10, False),
        (3, 24, 0, True),  # 20% of 24 = 4.8, truncated to 4 as in Envoy
        (4, 24, 0, False),
    ],
)
def test_retry_budget(
    active_retries: int, active_requests: int, pending: int, allowed: bool
) -> None:
    assert RetryBudget().allows(active_retries, active_requests, pending) is allowed


def test_retry_budget_bounds_amplification_when_everything_fails() -> None:
    # 100 concurrent client requests all failing: at most 20 retries may be in flight
    budget = RetryBudget()
    in_flight = 0
    for _ in range(100):
        if budget.allows(in_flight, 100):
            in_flight += 1
    assert in_flight == 20


@pytest.mark.parametrize(
    ("per_try", "route", "elapsed", "expected"),
    [
        (0, 0, 0, None),
        (200, 0, 500, 200.0),
        (0, 1000, 300, 700.0),
        (200, 1000, 300, 200.0),
        (200, 1000, 900, 100.0),
        (200, 1000, 1000, 0.0),
        (200, 1000, 1200, -200.0),
    ],
)
def test_attempt_timeout(per_try: int, route: int, elapsed: float, expected: float | None) -> None:
    assert attempt_timeout_ms(per_try, route, elapsed) == expected


@pytest.mark.parametrize(
    ("content_length", "bytes_sent", "replayable"),
    [
        (None, 0, True),
        (10, 10, True),
        (REPLAY_LIMIT_BYTES, REPLAY_LIMIT_BYTES, True),
        (REPLAY_LIMIT_BYTES + 1, 0, True),  # nothing sent yet: the body is still unread
        (REPLAY_LIMIT_BYTES + 1, 1, False),  # too large to buffer, and some of it went
        (None, REPLAY_LIMIT_BYTES, True),  # chunked, still within the buffer
        (None, REPLAY_LIMIT_BYTES + 1, False),
    ],
)
def test_body_replay_limit(content_length: int | None, bytes_sent: int, replayable: bool) -> None:
    assert can_replay(content_length, bytes_sent) is replayable


def test_bodies_are_buffered_up_to_64_kib() -> None:
    assert REPLAY_LIMIT_BYTES == 64 * 1024
    assert should_buffer(None)
    assert should_buffer(REPLAY_LIMIT_BYTES)
    assert not should_buffer(REPLAY_LIMIT_BYTES + 1)


def test_connect_failure_is_before_the_request() -> None:
    assert not Outcome.failed(Failure.CONNECT_FAILURE, request_sent=True).request_sent
