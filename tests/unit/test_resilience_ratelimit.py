"""Local rate limiting with a fake clock: bucket refill, total / identity / override
limits, policy selection, state carried over config pushes, headers (pure)."""

from __future__ import annotations

import pytest

from mesh.compiled import RateLimit, RateLimitOverride
from proxy.resilience import (
    UNLIMITED,
    InboundRateLimiter,
    RateDecision,
    TokenBucket,
    ratelimit_headers,
)
from proxy.resilience import ratelimit as ratelimit_module

REVIEWS = "cluster.local/ns/default/sa/reviews"
PRODUCTPAGE = "cluster.local/ns/default/sa/productpage"
VIP = "cluster.local/ns/default/sa/vip"
LABELS = {"app": "ratings", "version": "v1"}


def policy(**fields: object) -> RateLimit:
    return RateLimit(name="ratings", namespace="default", **fields)  # type: ignore[arg-type]


def limiter(*policies: RateLimit, labels: dict[str, str] = LABELS) -> InboundRateLimiter:
    return InboundRateLimiter.build(policies, labels)


def admitted(lim: InboundRateLimiter, principal: str, n: int, now: float) -> int:
    return sum(lim.check(principal, now).allowed for _ in range(n))


# ---------------------------------------------------------------- token bucket


@pytest.mark.parametrize(
    ("rate", "capacity", "takes_at", "expected"),
    [
        # starts full: a burst of `capacity`, then nothing until it refills
        (10, None, [0.0] * 11, [True] * 10 + [False]),
        # refills at `rate` per second
        (10, None, [0.0] * 10 + [0.05, 0.1, 0.1], [True] * 10 + [False, True, False]),
        (10, None, [0.0] * 10 + [1.0] * 11, [True] * 20 + [False]),
        # capacity is at least one token
        (0.5, None, [0.0, 0.0, 1.0, 2.0], [True, False, False, True]),
        # a clock going backwards adds nothing
        (1, None, [5.0, 4.0, 4.5], [True, False, False]),
    ],
)
def test_token_bucket(
    rate: float, capacity: float | None, takes_at: list[float], expected: list[bool]
) -> None:
    bucket = TokenBucket(rate, capacity)
    assert [bucket.take(t) for t in takes_at] == expected


def test_token_bucket_timings() -> None:
    bucket = TokenBucket(4)
    for _ in range(4):
        bucket.take(10.0)
    assert bucket.retry_after(10.0) == pytest.approx(0.25)
    assert bucket.reset_after(10.0) == pytest.approx(1.0)
    assert bucket.retry_after(10.25) == 0.0
    with pytest.raises(ValueError):
        TokenBucket(0)


# ---------------------------------------------------------------- limits


def test_total_limit_is_shared_by_every_caller() -> None:
    lim = limiter(policy(total_rps=5))
    assert admitted(lim, REVIEWS, 3, 0.0) == 3
    assert admitted(lim, PRODUCTPAGE, 3, 0.0) == 2
    denied = lim.check("", 0.0)
    assert denied == RateDecision(
        allowed=False, limit=5, remaining=0, reset_s=1, scope="total", policy="default/ratings"
    )
    assert denied.flag == "RL"
    assert admitted(lim, REVIEWS, 10, 1.0) == 5  # one second later: refilled


def test_identity_limits_are_independent() -> None:
    lim = limiter(policy(identity_rps=2))
    assert admitted(lim, REVIEWS, 5, 0.0) == 2
    assert admitted(lim, PRODUCTPAGE, 5, 0.0) == 2
    assert lim.check(REVIEWS, 0.0).scope == "identity"


def test_callers_without_a_principal_share_one_identity_bucket() -> None:
    lim = limiter(policy(identity_rps=3))
    assert admitted(lim, "", 5, 0.0) == 3
    assert admitted(lim, REVIEWS, 5, 0.0) == 3


def test_override_replaces_the_identity_limit_per_principal() -> None:
    lim = limiter(
        policy(
            identity_rps=2,
            overrides=(RateLimitOverride(principals=(VIP, REVIEWS), rps=5),),
        )
    )
    assert admitted(lim, VIP, 10, 0.0) == 5
    assert admitted(lim, REVIEWS, 10, 0.0) == 5  # its own bucket, not VIP's
    assert admitted(lim, PRODUCTPAGE, 10, 0.0) == 2
    assert lim.check(VIP, 0.0).scope == "override"


def test_override_without_identity_limit_leaves_others_unlimited() -> None:
    lim = limiter(policy(overrides=(RateLimitOverride(principals=(VIP,), rps=1),)))
    assert admitted(lim, VIP, 3, 0.0) == 1
    assert lim.check(REVIEWS, 0.0) == UNLIMITED


def test_a_caller_refused_by_its_own_limit_does_not_drain_total() -> None:
    lim = limiter(policy(total_rps=10, identity_rps=2))
    assert admitted(lim, REVIEWS, 50, 0.0) == 2
    assert admitted(lim, PRODUCTPAGE, 50, 0.0) == 2
    # only 4 tokens of total were used
    decision = lim.check(VIP, 0.0)
    assert decision.allowed
    assert (decision.scope, decision.remaining) == ("identity", 1)


def test_total_and_identity_together() -> None:
    lim = limiter(policy(total_rps=3, identity_rps=2))
    assert admitted(lim, REVIEWS, 5, 0.0) == 2
    assert admitted(lim, PRODUCTPAGE, 5, 0.0) == 1
    assert lim.check(VIP, 0.0).scope == "total"


def test_every_matching_policy_applies() -> None:
    strict = RateLimit(name="strict", namespace="default", total_rps=1)
    loose = RateLimit(name="loose", namespace="default", total_rps=100)
    lim = limiter(loose, strict)
    assert lim.policies == ("default/loose", "default/strict")
    assert admitted(lim, REVIEWS, 5, 0.0) == 1
    assert lim.check(REVIEWS, 0.0).policy == "default/strict"


@pytest.mark.parametrize(
    ("selector", "applies"),
    [
        ({}, True),
        ({"app": "ratings"}, True),
        ({"app": "ratings", "version": "v1"}, True),
        ({"app": "ratings", "version": "v2"}, False),
        ({"app": "reviews"}, False),
    ],
)
def test_selector(selector: dict[str, str], applies: bool) -> None:
    lim = limiter(policy(selector=selector, total_rps=1))
    assert bool(lim) is applies


def test_no_policy_means_unlimited() -> None:
    lim = limiter()
    assert not lim
    assert lim.check(REVIEWS, 0.0) == UNLIMITED
    assert ratelimit_headers(UNLIMITED) == []


def test_buckets_survive_a_config_push_unless_the_policy_changed() -> None:
    config = policy(total_rps=2)
    first = limiter(config)
    assert admitted(first, REVIEWS, 2, 0.0) == 2
    same = InboundRateLimiter.build([policy(total_rps=2)], LABELS, previous=first)
    assert admitted(same, REVIEWS, 1, 0.0) == 0
    changed = InboundRateLimiter.build([policy(total_rps=3)], LABELS, previous=same)
    assert admitted(changed, REVIEWS, 5, 0.0) == 3


def test_identity_buckets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit_module, "MAX_IDENTITIES", 2)
    lim = limiter(policy(identity_rps=1))
    assert lim.check(REVIEWS, 0.0).allowed
    assert lim.check(PRODUCTPAGE, 0.0).allowed
    assert not lim.check(REVIEWS, 0.0).allowed  # REVIEWS is now the most recent
    assert lim.check(VIP, 0.0).allowed  # evicts PRODUCTPAGE, the least recent
    assert not lim.check(REVIEWS, 0.0).allowed
    assert lim.check(PRODUCTPAGE, 0.0).allowed  # came back to a full bucket


# ---------------------------------------------------------------- headers


def test_headers_report_the_tightest_bucket() -> None:
    lim = limiter(policy(total_rps=10, identity_rps=4))
    decision = lim.check(REVIEWS, 0.0)
    assert decision == RateDecision(
        allowed=True, limit=4, remaining=3, reset_s=1, scope="identity", policy="default/ratings"
    )
    assert ratelimit_headers(decision) == [
        ("x-ratelimit-limit", "4"),
        ("x-ratelimit-remaining", "3"),
        ("x-ratelimit-reset", "1"),
    ]


def test_remaining_counts_whole_tokens_after_refill() -> None:
    lim = limiter(policy(total_rps=100))
    assert [lim.check(REVIEWS, 0.0).remaining for _ in range(3)] == [99, 98, 97]
    assert lim.check(REVIEWS, 0.015).remaining == 97  # 1.5 tokens back, 1 taken
    assert lim.check(REVIEWS, 0.5).remaining == 99  # full again, 1 taken
