"""Semantic validation of the `meshwork.io` kinds (see `meshwork` for their semantics).

RateLimitPolicy follows Linkerd's HTTPLocalRateLimitPolicy rules (no `identity` or
override rate above `total`) and adds what an attached policy needs to mean something:
at least one limit, every override naming principals, each principal in one override
only, principals in Istio's form.
"""

from __future__ import annotations

import re

from mesh.resources import checks
from mesh.resources.errors import Issue, field, item, key, required
from mesh.resources.meshwork import RateLimitPolicySpec, RequestRate

# Istio's principal form, as AuthorizationPolicy uses it and the sidecar reports it
_PRINCIPAL = re.compile(r"[^/\s]+/ns/[^/\s]+/sa/[^/\s]+")
# a bucket holds one second's worth: keep it a sane allocation
MAX_RPS = 1_000_000


def validate_rate_limit_policy(spec: RateLimitPolicySpec, path: str = "spec") -> list[Issue]:
    out: list[Issue] = []
    if spec.selector is not None:
        labels_path = field(field(path, "selector"), "matchLabels")
        for name, value in spec.selector.match_labels.items():
            problem = checks.label_key(name) or checks.label_value(value)
            if problem is not None:
                out.append(Issue(key(labels_path, name), problem))
    if spec.total is None and spec.identity is None and not spec.overrides:
        out.append(Issue(path, "must set at least one of total, identity or overrides"))
    total = _rate(spec.total, field(path, "total"), out)
    identity = _rate(spec.identity, field(path, "identity"), out)
    total_path = field(path, "total.requestsPerSecond")
    if total is not None and identity is not None and identity > total:
        out.append(
            Issue(
                field(path, "identity.requestsPerSecond"),
                f"must not be greater than {total_path} ({total}), got {identity}",
            )
        )
    seen: dict[str, str] = {}
    for i, override in enumerate(spec.overrides):
        o_path = item(field(path, "overrides"), i)
        rps_path = field(o_path, "requestsPerSecond")
        rps = _requests_per_second(override.requests_per_second, rps_path, out)
        if total is not None and rps is not None and rps > total:
            out.append(
                Issue(rps_path, f"must not be greater than {total_path} ({total}), got {rps}")
            )
        principals_path = field(field(o_path, "clientRefs"), "principals")
        principals = override.client_refs.principals if override.client_refs else ()
        if not principals:
            out.append(Issue(principals_path, "must list at least one principal"))
        for j, principal in enumerate(principals):
            p_path = item(principals_path, j)
            problem = _principal(principal)
            if problem is not None:
                out.append(Issue(p_path, problem))
            elif principal in seen:
                out.append(Issue(p_path, f"{principal!r} is already listed at {seen[principal]}"))
            else:
                seen[principal] = p_path
    return out


def _rate(rate: RequestRate | None, path: str, out: list[Issue]) -> int | None:
    if rate is None:
        return None
    return _requests_per_second(rate.requests_per_second, field(path, "requestsPerSecond"), out)


def _requests_per_second(value: int | None, path: str, out: list[Issue]) -> int | None:
    if value is None:
        out.append(required(path))
        return None
    if not 1 <= value <= MAX_RPS:
        out.append(Issue(path, f"must be between 1 and {MAX_RPS}, got {value}"))
        return None
    return value


def _principal(value: str) -> str | None:
    if value.startswith("spiffe://"):
        return (
            f"must be Istio's principal form without spiffe:// "
            f"(e.g. {value.removeprefix('spiffe://')!r}), got {value!r}"
        )
    if not _PRINCIPAL.fullmatch(value):
        return (
            "must be a principal <trust-domain>/ns/<namespace>/sa/<service-account> "
            f"(e.g. 'cluster.local/ns/default/sa/reviews'), got {value!r}"
        )
    return None
