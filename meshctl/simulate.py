"""`meshctl explain`'s core: what the mesh would do with one request, without sending it.

Pure: the command fetches the compiled config exactly as a sidecar does (route table
and endpoints of the destination, the inbound policy of the service that serves it)
and hands it here. Every decision is taken by the proxies' own code: the route by
`proxy.routing` (through `proxy.routing.explain`, which adds the reasons), the subset
and its endpoints by `resolve_subset` / `subset_endpoints`, mTLS and authorization by
`proxy.policy` (through `proxy.policy.explain`), rate limits by
`InboundRateLimiter.build`. The steps follow the outbound handler's order
(proxy/outbound.py) and the inbound one (proxy/inbound.py), with the same status codes
and response flags.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from mesh.compiled import HTTPRoute, InboundPolicy, RetryPolicy, RouteTable, WeightedDestination
from mesh.grpc_status import grpc_status_label
from mesh.hosts import ServiceRef, canonical_host, service_of_host
from mesh.messages import Endpoint, EndpointSet
from proxy.policy import RequestFacts, normalize_path
from proxy.policy.explain import explain_authorization, explain_mtls
from proxy.resilience import InboundRateLimiter, default_policy
from proxy.routing import (
    InvalidRouteConfig,
    RequestAttrs,
    compile_routes,
    request_authority,
    resolve_subset,
    rewrite_path,
    subset_endpoints,
)
from proxy.routing.explain import explain_routes


class SimulationError(ValueError):
    """The request to simulate is malformed (bad URL, bad header)."""


@dataclass(frozen=True)
class Caller:
    """Who sends the request. `principal` is Istio's form (`cluster.local/ns/N/sa/SA`);
    "" for a caller without a sidecar, which then connects in plaintext."""

    namespace: str
    labels: Mapping[str, str]
    principal: str
    instance: str = ""


@dataclass(frozen=True)
class SimRequest:
    method: str
    scheme: str
    authority: str
    path: str
    headers: Mapping[str, str]
    port: int


def parse_request(method: str, url: str, headers: Sequence[str]) -> SimRequest:
    """`GET http://reviews:9080/reviews/0` plus `-H 'name: value'` entries."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SimulationError(f"URL {url!r}: expected http://HOST[:PORT]/PATH")
    try:
        port = parts.port or 0
    except ValueError:
        raise SimulationError(f"URL {url!r}: invalid port") from None
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    values: dict[str, str] = {}
    for entry in headers:
        name, sep, value = entry.partition(":")
        name = name.strip().lower()
        if not sep or not name:
            raise SimulationError(f"header {entry.split(':', 1)[0]!r}: expected 'Name: value'")
        value = value.strip()
        values[name] = f"{values[name]},{value}" if name in values else value
    return SimRequest(method.upper(), parts.scheme, parts.netloc, path, values, port)


def target_service(req: SimRequest, caller: Caller) -> ServiceRef | None:
    """The mesh service the caller's sidecar resolves the Host to (None: not in the mesh)."""
    ref = service_of_host(canonical_host(req.authority, caller.namespace))
    return None if ref is None or ref.name == "*" else ref


@dataclass
class Refusal:
    status: int
    flag: str
    reason: str


@dataclass
class EndpointVerdict:
    endpoint: Endpoint
    mtls_mode: str
    mtls_source: str
    authz_allowed: bool
    authz_reason: str
    policies: list[dict[str, Any]]
    rate_limits: list[dict[str, Any]]
    refusal: Refusal | None = None
    # outlier state as the caller's sidecar reports it in /clusters (when known)
    health: str = ""


@dataclass
class DestinationVerdict:
    destination: WeightedDestination
    share: float  # percent of the route's traffic
    service: str = ""
    subset_labels: dict[str, str] = field(default_factory=dict)
    request_path: str = ""
    request_authority: str = ""
    endpoints: list[EndpointVerdict] = field(default_factory=list)
    refusal: Refusal | None = None


@dataclass
class RouteVerdict:
    """The outbound half: which rule matched and where it sends the request."""

    service: ServiceRef | None
    revision: int = 0
    rules: list[dict[str, Any]] = field(default_factory=list)
    route: HTTPRoute | None = None
    destinations: list[DestinationVerdict] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=dict)
    refusal: Refusal | None = None
    # a redirect or direct response answered by the caller's own sidecar
    local_answer: str = ""


def explain_outbound(
    req: SimRequest, caller: Caller, table: RouteTable | None, endpoints: EndpointSet | None
) -> RouteVerdict:
    """Route selection at the caller's sidecar (proxy/outbound.py `_handle`/`_route`)."""
    ref = target_service(req, caller)
    if ref is None:
        return RouteVerdict(
            None,
            refusal=Refusal(502, "NR", f"unknown host {req.authority!r}: not a mesh service"),
        )
    verdict = RouteVerdict(ref, revision=table.revision if table else 0)
    if table is None:
        verdict.refusal = Refusal(503, "UH", f"no configuration for {ref}")
        return verdict
    known = table.exists or table.has_virtual_service
    if not known and not (endpoints and endpoints.endpoints):
        verdict.refusal = Refusal(502, "NR", f"unknown host {req.authority!r}: no such service")
        return verdict
    try:
        compiled = compile_routes(table)
    except InvalidRouteConfig as e:
        verdict.refusal = Refusal(503, "NC", f"route table rejected by the proxies: {e}")
        return verdict
    attrs = _attrs(req, caller)
    explanation = explain_routes(compiled, attrs)
    verdict.rules = [
        {
            "rule": v.rule_index,
            "match": v.match_index,
            "name": v.route.name,
            "origin": v.route.origin,
            "matched": v.matched,
            "reason": v.failed,
        }
        for v in explanation.verdicts
    ]
    chosen = explanation.chosen
    if chosen is None:
        verdict.refusal = Refusal(404, "NR", f"no route matched {req.method} {req.path}")
        return verdict
    route = verdict.route = chosen.route
    verdict.policy = route_policy(route)
    if route.direct_response is not None:
        verdict.local_answer = f"direct response {route.direct_response.status}"
        return verdict
    if route.redirect is not None:
        verdict.local_answer = f"redirect {route.redirect.redirect_code}"
        return verdict
    total = sum(d.weight for d in route.route if d.weight > 0)
    if len(route.route) != 1 and total == 0:
        verdict.refusal = Refusal(503, "NC", f"route {route.name or '<unnamed>'} has no weight")
        return verdict
    for d in route.route:
        share = (
            100.0 if len(route.route) == 1 else (100.0 * d.weight / total if d.weight > 0 else 0)
        )
        verdict.destinations.append(
            DestinationVerdict(
                destination=d,
                share=share,
                request_path=rewrite_path(route, chosen.match, req.path),
                request_authority=request_authority(route, d, req.authority),
            )
        )
    if route.fault is not None and route.fault.abort is not None:
        abort = route.fault.abort
        if abort.percentage >= 100:
            reason = "fault injection aborts every request"
            if abort.grpc_status is not None:
                name = grpc_status_label(str(abort.grpc_status))
                reason += f" (a gRPC request gets grpc-status {abort.grpc_status} {name})"
            verdict.refusal = Refusal(abort.http_status, "FI", reason)
    return verdict


def explain_destination(
    dest: DestinationVerdict,
    req: SimRequest,
    caller: Caller,
    table: RouteTable | None,
    endpoints: EndpointSet | None,
    inbound: InboundPolicy | None,
) -> None:
    """Subset, endpoints and the inbound decision of each endpoint (fills `dest`)."""
    target = dest.destination.destination
    ref = service_of_host(target.host)
    dest.service = str(ref) if ref is not None else target.host
    if ref is None:
        dest.refusal = Refusal(502, "NR", f"route destination {target.host} is not a mesh service")
        return
    if table is None:
        dest.refusal = Refusal(503, "UH", f"no configuration for {ref}")
        return
    subset = resolve_subset(table, target.subset)
    if subset is None:
        defined = ", ".join(s.name for s in table.subsets) or "none"
        dest.refusal = Refusal(
            503,
            "NC",
            f"unknown subset {target.subset!r} of {ref}: no DestinationRule for {target.host} "
            f"defines it (subsets defined: {defined})",
        )
        return
    dest.subset_labels = dict(subset.labels)
    candidates = subset_endpoints(endpoints.endpoints if endpoints else [], subset.labels)
    if not candidates:
        where = f"subset {target.subset!r} ({_labels(subset.labels)})" if target.subset else ""
        dest.refusal = Refusal(
            503, "UH", f"no healthy upstream: no ready instance of {ref} {where}".rstrip()
        )
        return
    try:
        path = normalize_path(dest.request_path)
    except ValueError as e:
        dest.refusal = Refusal(400, "", f"bad request path: {e}")
        return
    q = path.find("?")
    for ep in candidates:
        dest.endpoints.append(
            _inbound(ep, caller, inbound, dest, req, path if q < 0 else path[:q], target.port)
        )
    if all(e.refusal is not None for e in dest.endpoints):
        first = dest.endpoints[0].refusal
        assert first is not None
        dest.refusal = first


def _inbound(
    ep: Endpoint,
    caller: Caller,
    inbound: InboundPolicy | None,
    dest: DestinationVerdict,
    req: SimRequest,
    path: str,
    target_port: int,
) -> EndpointVerdict:
    """proxy/inbound.py `handle`: mTLS mode, then authorization, then rate limits."""
    labels = dict(ep.labels)
    if ep.version and "version" not in labels:
        labels["version"] = ep.version
    # the workload port is the app's, which the registry does not publish; the port
    # the caller addressed stands in for it (they are the same in the local mesh)
    port = target_port or req.port
    mtls = explain_mtls(inbound.peer_authentication if inbound else (), labels, port)
    verdict = EndpointVerdict(ep, mtls.mode, mtls.source, True, "", [], [])
    # a caller with a sidecar always speaks mTLS to a sidecar with an identity
    mtls_used = bool(caller.principal) and bool(ep.identity)
    if mtls.mode == "STRICT" and not mtls_used:
        verdict.refusal = Refusal(
            403, "RBAC", f"mTLS required: PeerAuthentication mode is STRICT ({mtls.source})"
        )
    principal = caller.principal if mtls_used else ""
    namespace = caller.namespace if mtls_used else ""
    facts = RequestFacts(
        principal=principal,
        namespace=namespace,
        source_ip="",
        method=req.method,
        path=path,
        host=dest.request_authority,
        port=port,
        headers=req.headers,
    )
    authz = explain_authorization(inbound, labels, facts)
    verdict.authz_allowed = authz.decision.allowed
    verdict.authz_reason = authz.decision.reason
    verdict.policies = [
        {"policy": p.policy, "action": p.action, "matched": p.matched, "why": list(p.why)}
        for p in authz.policies
    ]
    if verdict.refusal is None and not authz.decision.allowed:
        verdict.refusal = Refusal(403, "RBAC", f"RBAC: access denied ({authz.decision.reason})")
    limiter = InboundRateLimiter.build(inbound.rate_limits if inbound else (), labels)
    in_force = set(limiter.policies)
    for rl in inbound.rate_limits if inbound else ():
        name = f"{rl.namespace}/{rl.name}"
        if name not in in_force:
            continue
        override = next((o.rps for o in rl.overrides if principal in o.principals), None)
        verdict.rate_limits.append(
            {
                "policy": name,
                "total_rps": rl.total_rps,
                "per_caller_rps": override if override is not None else rl.identity_rps,
                "override": override is not None,
            }
        )
    return verdict


def route_policy(route: HTTPRoute) -> dict[str, Any]:
    """Timeout, retries, fault and mirror of the rule in force, defaults resolved."""
    retries: RetryPolicy = route.retries if route.retries is not None else default_policy()
    policy: dict[str, Any] = {
        "timeout_ms": route.timeout_ms,
        "retries": {
            "attempts": retries.attempts,
            "per_try_timeout_ms": retries.per_try_timeout_ms,
            "retry_on": list(retries.retry_on),
            "retriable_status_codes": list(retries.retriable_status_codes),
            "default": route.retries is None,
        },
    }
    if route.fault is not None:
        fault: dict[str, Any] = {}
        if route.fault.delay is not None:
            fault["delay"] = {
                "fixed_delay_ms": route.fault.delay.fixed_delay_ms,
                "percentage": route.fault.delay.percentage,
            }
        if route.fault.abort is not None:
            fault["abort"] = {
                "http_status": route.fault.abort.http_status,
                "percentage": route.fault.abort.percentage,
            }
            if route.fault.abort.grpc_status is not None:
                fault["abort"]["grpc_status"] = route.fault.abort.grpc_status
        policy["fault"] = fault
    if route.mirror is not None:
        m = route.mirror
        policy["mirror"] = {"host": m.host, "subset": m.subset, "percentage": m.percentage}
    return policy


def _attrs(req: SimRequest, caller: Caller) -> RequestAttrs:
    return RequestAttrs(
        method=req.method,
        scheme=req.scheme,
        authority=req.authority,
        path=req.path,
        headers=req.headers,
        port=req.port,
        source_labels=caller.labels,
        source_namespace=caller.namespace,
    )


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "any labels"


def refused_share(route: RouteVerdict) -> float:
    """Percent of requests refused: all of them when the route itself refuses, else
    the shares of the destinations that refuse."""
    if route.refusal is not None:
        return 100.0
    return sum(d.share for d in route.destinations if d.refusal is not None)


def final_refusal(route: RouteVerdict) -> Refusal | None:
    """The refusal the request meets: the route's own, else the first destination
    that receives traffic and refuses (a weighted split refuses part of the traffic)."""
    if route.refusal is not None:
        return route.refusal
    for dest in route.destinations:
        if dest.share > 0 and dest.refusal is not None:
            return dest.refusal
    return None
