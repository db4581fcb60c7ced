"""`RetryState`: one request's retries as a state machine over attempt outcomes, fed
the clock and the jitter draw, no sockets. Each table row is a request's life: the
outcomes of its attempts and what the state machine made of each."""

from __future__ import annotations

import pytest

from mesh.compiled import RetryPolicy
from proxy.resilience import (
    AttemptPlan,
    Failure,
    Outcome,
    RetryState,
    RetryVerdict,
    default_policy,
    retry_on,
)

T0 = 1000.0  # monotonic seconds when the request started
RETRY, FINAL, EXHAUSTED, NOT_REPLAYABLE = (
    RetryVerdict.RETRY,
    RetryVerdict.FINAL,
    RetryVerdict.EXHAUSTED,
    RetryVerdict.NOT_REPLAYABLE,
)
UNAVAILABLE, DEADLINE_EXCEEDED, NOT_FOUND = 14, 4, 5


def state_for(policy: RetryPolicy, route_timeout_ms: int = 0) -> RetryState:
    return RetryState(policy, retry_on(policy), route_timeout_ms, T0)


def verdicts(state: RetryState, outcomes: list[Outcome]) -> list[RetryVerdict]:
    """Judge each outcome in turn, granting every retry the policy asks for."""
    seen = []
    for i, outcome in enumerate(outcomes):
        verdict = state.judge(outcome)
        seen.append(verdict)
        if verdict is RETRY:
            state.retried(f"ep-{i}", T0, 0.0)
    return seen


@pytest.mark.parametrize(
    ("policy", "outcomes", "expected"),
    [
        # Istio's default: connect-failure, refused-stream, unavailable, cancelled, 503
        (default_policy(), [Outcome.failed(Failure.CONNECT_FAILURE), Outcome.response(200)],
         [RETRY, FINAL]),
        (default_policy(), [Outcome.response(503)] * 3, [RETRY, RETRY, EXHAUSTED]),
        (default_policy(), [Outcome.response(500)], [FINAL]),
        (default_policy(), [Outcome.failed(Failure.RESET)], [FINAL]),
        (default_policy(), [Outcome.failed(Failure.TIMEOUT)], [FINAL]),
        # gRPC codes by name, read from grpc-status (HTTP 200)
        (default_policy(), [Outcome.response(200, grpc_status=UNAVAILABLE)] * 3,
         [RETRY, RETRY, EXHAUSTED]),
        (RetryPolicy(attempts=1, retry_on=("deadline-exceeded",)),
         [Outcome.response(200, grpc_status=DEADLINE_EXCEEDED), Outcome.response(200)],
         [RETRY, FINAL]),
        (RetryPolicy(attempts=3, retry_on=("unavailable",)),
         [Outcome.response(200, grpc_status=NOT_FOUND)], [FINAL]),
        # 5xx covers every attempt without a response, timeouts included
        (RetryPolicy(attempts=2, retry_on=("5xx",)),
         [Outcome.failed(Failure.TIMEOUT), Outcome.failed(Failure.RESET), Outcome.response(502)],
         [RETRY, RETRY, EXHAUSTED]),
        # a breaker overflow is never retried
        (RetryPolicy(attempts=2, retry_on=("5xx",)), [Outcome.failed(Failure.OVERFLOW)], [FINAL]),
        # attempts 0: nothing is retried; a retriable answer is flagged URX (as before)
        (RetryPolicy(attempts=0), [Outcome.response(503)], [EXHAUSTED]),
    ],
)  # fmt: skip
def test_a_requests_attempts(
    policy: RetryPolicy, outcomes: list[Outcome], expected: list[RetryVerdict]
) -> None:
    assert verdicts(state_for(policy), outcomes) == expected


def test_a_body_that_cannot_be_sent_again_ends_the_retries() -> None:
    state = state_for(default_policy())
    assert state.judge(Outcome.response(503), replayable=False) is NOT_REPLAYABLE
    assert state.judge(Outcome.response(503), replayable=True) is RETRY


def test_the_endpoints_tried_are_avoided_only_with_ignore_previous_hosts() -> None:
    state = state_for(default_policy())
    assert state.plan(T0) == AttemptPlan(None, False, frozenset())
    state.retried("a", T0, 0.0)
    state.retried("b", T0, 0.0)
    assert state.plan(T0) == AttemptPlan(None, False, frozenset({"a", "b"}))
    assert state.retries == 2

    sticky = state_for(RetryPolicy(ignore_previous_hosts=False))
    sticky.retried("a", T0, 0.0)
    assert sticky.plan(T0).exclude == frozenset()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("per_try_ms", "route_ms", "elapsed_s", "plan"),
    [
        (0, 0, 5.0, AttemptPlan(None, False, frozenset())),
        # per-try only: every attempt gets it, a timeout is retriable
        (100, 0, 5.0, AttemptPlan(100.0, False, frozenset())),
        # route only: what is left of it, and a timeout ends the request
        (0, 1000, 0.25, AttemptPlan(750.0, True, frozenset())),
        # both: the per-try bound while the route has more left
        (100, 1000, 0.25, AttemptPlan(100.0, False, frozenset())),
        # both, the route's remainder tighter: the route's timeout
        (100, 1000, 0.95, AttemptPlan(pytest.approx(50.0), True, frozenset())),
        # the route's time is up: no attempt (504 UT)
        (100, 1000, 1.0, None),
        (0, 1000, 1.5, None),
    ],
)
def test_plan_cuts_the_per_try_timeout_to_the_routes(
    per_try_ms: int, route_ms: int, elapsed_s: float, plan: AttemptPlan | None
) -> None:
    state = state_for(RetryPolicy(per_try_timeout_ms=per_try_ms), route_ms)
    assert state.plan(T0 + elapsed_s) == plan


@pytest.mark.parametrize(
    ("retry", "rand", "route_ms", "elapsed_s", "wait_ms"),
    [
        (1, 0.5, 0, 0.0, 12.5),  # first retry: uniform in [0, 25)
        (2, 0.5, 0, 0.0, 37.5),  # second: [0, 75)
        (5, 0.99, 0, 0.0, pytest.approx(247.5)),  # capped at 10x the base
        (2, 0.99, 1000, 0.98, pytest.approx(20.0)),  # never past the route's timeout
    ],
)
def test_backoff_between_attempts(
    retry: int, rand: float, route_ms: int, elapsed_s: float, wait_ms: float
) -> None:
    state = state_for(default_policy(), route_ms)
    for n in range(1, retry):
        state.retried(f"ep-{n}", T0, rand)
    assert state.retried("last", T0 + elapsed_s, rand) == wait_ms


@pytest.mark.parametrize(
    ("policy", "status", "grpc", "needs"),
    [
        (default_policy(), 200, False, False),  # the common case reads no header
        (default_policy(), 302, False, False),
        (default_policy(), 404, False, True),
        (default_policy(), 200, True, True),  # gRPC: grpc-status decides
        (RetryPolicy(retry_on=("retriable-status-codes",), retriable_status_codes=(302,)),
         302, False, True),
        (RetryPolicy(retry_on=("envoy-ratelimited",)), 200, False, True),
    ],
)  # fmt: skip
def test_which_answers_are_worth_judging(
    policy: RetryPolicy, status: int, grpc: bool, needs: bool
) -> None:
    assert state_for(policy).needs_judging(status, grpc=grpc) is needs
