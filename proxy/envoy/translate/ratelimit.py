"""RateLimitPolicy -> Envoy's local rate limit HTTP filter (`proxy.resilience.ratelimit`).

Per selected policy, in the policy's order:
- `total_rps`: one filter whose default token bucket every request draws from;
- `identity_rps` and `overrides`: one filter with a descriptor per caller. The caller
  is told apart by the `x-forwarded-client-cert` header the connection manager has
  just set from the verified peer certificate (`SANITIZE_SET`: a client cannot forge
  it). Each override principal has its own bucket at its own rate; every other
  authenticated caller gets a bucket of its own at `identity_rps` (a dynamic
  descriptor keyed by the header), and plaintext callers share one.

Differences from the Python limiter: buckets fill once a second (`tokens_per_fill` =
rps every 1 s) rather than continuously; a request refused by a later filter has
already spent a token in an earlier one; a caller's bucket is keyed by its
certificate, so a renewed certificate starts a full bucket.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from mesh.compiled import InboundPolicy, RateLimit

from .protos import LOCAL_RATELIMIT, Json, duration, typed

XFCC = "x-forwarded-client-cert"
FILL_INTERVAL_MS = 1000
# per-caller buckets kept (the Python limiter's MAX_IDENTITIES)
MAX_IDENTITIES = 10_000
UNLIMITED_TOKENS = 4_294_967_295
ALWAYS: Json = {"defaultValue": {"numerator": 100, "denominator": "HUNDRED"}}


def selected(policy: InboundPolicy | None, labels: Mapping[str, str]) -> list[RateLimit]:
    if policy is None:
        return []
    return [r for r in policy.rate_limits if all(labels.get(k) == v for k, v in r.selector.items())]


def _bucket(rps: int) -> Json:
    return {
        "maxTokens": max(1, rps),
        "tokensPerFill": rps,
        "fillInterval": duration(FILL_INTERVAL_MS),
    }


def _filter(stat_prefix: str, body: Json) -> Json:
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typedConfig": typed(
            LOCAL_RATELIMIT,
            {
                "statPrefix": stat_prefix,
                "filterEnabled": ALWAYS,
                "filterEnforced": ALWAYS,
                "enableXRatelimitHeaders": "DRAFT_VERSION_03",
                **body,
            },
        ),
    }


def _xfcc_of(principal: str) -> Json:
    """The header as SANITIZE_SET writes it for a peer whose URI SAN is `principal`."""
    uri = re.escape(f"spiffe://{principal}")
    return {"name": XFCC, "stringMatch": {"safeRegex": {"regex": f".*;URI={uri}(?:;.*)?"}}}


def ratelimit_filters(limits: Sequence[RateLimit]) -> list[Json]:
    out = []
    for limit in limits:
        ref = f"{limit.namespace}_{limit.name}"
        if limit.total_rps:
            out.append(_filter(f"ratelimit_{ref}_total", {"tokenBucket": _bucket(limit.total_rps)}))
        if limit.identity_rps or limit.overrides:
            out.append(_per_caller(limit, ref))
    return out


def _per_caller(limit: RateLimit, ref: str) -> Json:
    descriptors: list[Json] = []
    rate_limits: list[Json] = []
    overridden: list[Json] = []
    for override in limit.overrides:
        for principal in override.principals:
            descriptors.append(
                {
                    "entries": [{"key": "override", "value": principal}],
                    "tokenBucket": _bucket(override.rps),
                }
            )
            rate_limits.append(
                {
                    "actions": [
                        {
                            "headerValueMatch": {
                                "descriptorKey": "override",
                                "descriptorValue": principal,
                                "headers": [_xfcc_of(principal)],
                            }
                        }
                    ]
                }
            )
            overridden.append(_xfcc_of(principal))
    if limit.identity_rps:
        # every other authenticated caller: a bucket per certificate
        not_overridden: list[Json] = [{**h, "invertMatch": True} for h in overridden]
        actions: list[Json] = []
        if not_overridden:
            actions.append(
                {
                    "headerValueMatch": {
                        "descriptorKey": "not_overridden",
                        "descriptorValue": "1",
                        "headers": not_overridden,
                    }
                }
            )
        actions.append({"requestHeaders": {"headerName": XFCC, "descriptorKey": "caller"}})
        entries = [{"key": "not_overridden", "value": "1"}] if not_overridden else []
        descriptors.append(
            {"entries": [*entries, {"key": "caller"}], "tokenBucket": _bucket(limit.identity_rps)}
        )
        rate_limits.append({"actions": actions})
        # plaintext callers (no certificate, so no header) share one bucket
        descriptors.append(
            {
                "entries": [{"key": "plaintext", "value": "1"}],
                "tokenBucket": _bucket(limit.identity_rps),
            }
        )
        rate_limits.append(
            {
                "actions": [
                    {
                        "headerValueMatch": {
                            "descriptorKey": "plaintext",
                            "descriptorValue": "1",
                            "headers": [{"name": XFCC, "presentMatch": True, "invertMatch": True}],
                        }
                    }
                ]
            }
        )
    return _filter(
        f"ratelimit_{ref}_caller",
        {
            # requests no descriptor covers are not limited by this filter
            "tokenBucket": {
                "maxTokens": UNLIMITED_TOKENS,
                "tokensPerFill": UNLIMITED_TOKENS,
                "fillInterval": duration(FILL_INTERVAL_MS),
            },
            "descriptors": descriptors,
            "rateLimits": rate_limits,
            "maxDynamicDescriptors": MAX_IDENTITIES,
        },
    )
