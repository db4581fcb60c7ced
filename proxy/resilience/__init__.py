"""The sidecar's traffic resilience core: pure decisions, no I/O.

Clock and randomness are arguments (`now` from `time.monotonic()`, `rand` from
`random.random()`), so every decision is a table-testable function of its inputs.
The asyncio data path owns the objects and carries out what they decide:

- per request on a route: `decide_fault` (delay `DI` / abort `FI`), `should_mirror` +
  `mirror_authority` (fire-and-forget copy), then attempts under
  `attempt_timeout_ms`, each classified as an `Outcome` and judged by `decide_retry`
  with the conditions of `retry_on(route.retries or default_policy())`, waiting
  `backoff_ms` between attempts, replaying the body only when `can_replay`: one
  `RetryState` per request holds that bookkeeping;
- per destination (+ subset): a `CircuitBreaker` (overflow: 503 `UO`; retries also
  bounded by the `RetryBudget`) and, when the DestinationRule sets
  `outlierDetection`, an `OutlierDetector` fed with every result and ticked every
  `interval_s`;
- per inbound request: `InboundRateLimiter.check` (refusal: 429 `RL` with
  `ratelimit_headers`).
"""

from .breaker import CircuitBreaker, Threshold
from .fault import NO_FAULT, FaultDecision, decide_fault
from .mirror import mirror_authority, should_mirror
from .outlier import EndpointHealth, LocalOrigin, OutlierDetector
from .ratelimit import (
    UNLIMITED,
    InboundRateLimiter,
    RateDecision,
    TokenBucket,
    ratelimit_headers,
)
from .retry import (
    REPLAY_LIMIT_BYTES,
    AttemptPlan,
    Failure,
    Outcome,
    RetryBudget,
    RetryConditions,
    RetryState,
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

__all__ = [
    "NO_FAULT",
    "REPLAY_LIMIT_BYTES",
    "UNLIMITED",
    "AttemptPlan",
    "CircuitBreaker",
    "EndpointHealth",
    "Failure",
    "FaultDecision",
    "InboundRateLimiter",
    "LocalOrigin",
    "Outcome",
    "OutlierDetector",
    "RateDecision",
    "RetryBudget",
    "RetryConditions",
    "RetryState",
    "RetryVerdict",
    "Threshold",
    "TokenBucket",
    "attempt_timeout_ms",
    "backoff_ms",
    "can_replay",
    "decide_fault",
    "decide_retry",
    "default_policy",
    "mirror_authority",
    "ratelimit_headers",
    "retry_on",
    "should_buffer",
    "should_mirror",
    "should_retry",
]
