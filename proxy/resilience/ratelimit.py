"""Local rate limiting in the inbound sidecar (`RateLimitPolicy`). Pure, injected clock.

`InboundRateLimiter.build` keeps the policies whose selector matches the sidecar's
labels (rebuilt on each `InboundPolicy`, reusing the buckets of unchanged policies so
a config push does not refill them); per request the inbound path calls
`check(principal, now)` and, when not allowed, answers 429 with
`ratelimit_headers(decision)` and flag `RL`.

Buckets: one per limit, rate = requestsPerSecond, capacity = requestsPerSecond (at
least 1), starting full. A request must find a token in every bucket that applies:
each policy's `total`, and the caller's own bucket (the override listing its
principal, else `identity`). Tokens are taken only when all of them have one, so a
caller refused by its own limit does not drain `total` for everyone else. Callers
without a principal share one identity bucket (Linkerd: unmeshed sources are one
source). Per-identity buckets are kept for the `MAX_IDENTITIES` most recent callers;
an evicted caller comes back to a full bucket.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from mesh.compiled import RateLimit
from proxy.response_flags import ResponseFlag

MAX_IDENTITIES = 10_000


class TokenBucket:
    """`rate` tokens per second up to `capacity`; starts full."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = float(rate)
        self.capacity = float(max(1.0, rate if capacity is None else capacity))
        self.tokens = self.capacity
        self.updated: float | None = None

    def available(self, now: float) -> float:
        """Tokens available at `now` (refills; a clock going backwards adds nothing)."""
        if self.updated is None:
            self.updated = now
        elif now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        return self.tokens

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        if self.available(now) >= 1:
            self.tokens -= 1
            return True
        return False

    def retry_after(self, now: float) -> float:
        """Seconds until one token is available (0 when one is)."""
        return max(0.0, (1 - self.available(now)) / self.rate)

    def reset_after(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self.available(now)) / self.rate)


class RateDecision(NamedTuple):
    """The verdict on one request and what `x-ratelimit-*` report.

    `limit` is the rate of the bucket reported (the refusing one, else the one with
    the fewest tokens left; 0 when no limit applies), `remaining` its whole tokens
    left, `reset_s` whole seconds until it is full again, `scope` which limit it is
    (`total`, `identity` or `override`) and `policy` the RateLimitPolicy
    (`<namespace>/<name>`).
    """

    allowed: bool
    limit: int = 0
    remaining: int = 0
    reset_s: int = 0
    scope: str = ""
    policy: str = ""

    @property
    def flag(self) -> str:
        return "" if self.allowed else ResponseFlag.RATE_LIMITED


UNLIMITED = RateDecision(allowed=True)


class _PolicyBuckets:
    """The buckets of one RateLimitPolicy."""

    __slots__ = ("config", "identities", "name", "override_rps", "overrides", "total")

    def __init__(self, config: RateLimit) -> None:
        self.config = config
        self.name = f"{config.namespace}/{config.name}"
        self.total = TokenBucket(config.total_rps) if config.total_rps else None
        self.override_rps = {p: o.rps for o in config.overrides for p in o.principals}
        self.overrides: dict[str, TokenBucket] = {}
        self.identities: OrderedDict[str, TokenBucket] = OrderedDict()

    def applicable(self, principal: str) -> list[tuple[str, TokenBucket]]:
        buckets: list[tuple[str, TokenBucket]] = []
        if self.total is not None:
            buckets.append(("total", self.total))
        rps = self.override_rps.get(principal) if principal else None
        if rps is not None:
            bucket = self.overrides.get(principal)
            if bucket is None:
                bucket = self.overrides[principal] = TokenBucket(rps)
            buckets.append(("override", bucket))
        elif self.config.identity_rps:
            buckets.append(("identity", self._identity(principal)))
        return buckets

    def _identity(self, principal: str) -> TokenBucket:
        bucket = self.identities.get(principal)
        if bucket is None:
            bucket = self.identities[principal] = TokenBucket(self.config.identity_rps)
            if len(self.identities) > MAX_IDENTITIES:
                self.identities.popitem(last=False)
        else:
            self.identities.move_to_end(principal)
        return bucket


class InboundRateLimiter:
    """The rate limits one sidecar enforces; falsy when none applies."""

    __slots__ = ("_policies",)

    def __init__(self, policies: Iterable[_PolicyBuckets] = ()) -> None:
        self._policies = tuple(policies)

    @classmethod
    def build(
        cls,
        rate_limits: Iterable[RateLimit],
        labels: Mapping[str, str],
        previous: InboundRateLimiter | None = None,
    ) -> InboundRateLimiter:
        """The limiter for a workload with `labels`; buckets of policies unchanged
        since `previous` carry over with their tokens."""
        kept = {p.name: p for p in previous._policies} if previous is not None else {}
        policies: list[_PolicyBuckets] = []
        for config in rate_limits:
            if any(labels.get(k) != v for k, v in config.selector.items()):
                continue
            old = kept.get(f"{config.namespace}/{config.name}")
            policies.append(
                old if old is not None and old.config == config else _PolicyBuckets(config)
            )
        return cls(policies)

    def __bool__(self) -> bool:
        return bool(self._policies)

    @property
    def policies(self) -> tuple[str, ...]:
        return tuple(p.name for p in self._policies)

    def check(self, principal: str, now: float) -> RateDecision:
        """Admit or refuse one request from `principal` (Istio form, "" = plaintext)."""
        if not self._policies:
            return UNLIMITED
        buckets = [
            (scope, bucket, policy.name)
            for policy in self._policies
            for scope, bucket in policy.applicable(principal)
        ]
        if not buckets:
            return UNLIMITED
        for scope, bucket, name in buckets:
            if bucket.available(now) < 1:
                return RateDecision(
                    allowed=False,
                    limit=int(bucket.rate),
                    remaining=0,
                    reset_s=max(1, math.ceil(bucket.reset_after(now))),
                    scope=scope,
                    policy=name,
                )
        for _, bucket, _ in buckets:
            bucket.tokens -= 1
        scope, bucket, name = min(buckets, key=lambda b: b[1].tokens)
        return RateDecision(
            allowed=True,
            limit=int(bucket.rate),
            remaining=int(bucket.tokens),
            reset_s=math.ceil(bucket.reset_after(now)),
            scope=scope,
            policy=name,
        )


def ratelimit_headers(decision: RateDecision) -> list[tuple[str, str]]:
    """`x-ratelimit-limit`, `-remaining` and `-reset` (seconds), as Envoy's local rate
    limit filter sends them (draft-ietf-httpapi-ratelimit-headers-03); none when no
    limit applied."""
    if not decision.limit:
        return []
    return [
        ("x-ratelimit-limit", str(decision.limit)),
        ("x-ratelimit-remaining", str(decision.remaining)),
        ("x-ratelimit-reset", str(decision.reset_s)),
    ]
