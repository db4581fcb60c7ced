"""The pure explain functions: route, authorization and mTLS reasons (tables), and the
request simulation `meshctl explain` prints, without sockets."""

from __future__ import annotations

import pytest

from mesh.compiled import (
    AuthzPolicy,
    AuthzRule,
    Condition,
    Destination,
    HTTPMatch,
    HTTPRoute,
    InboundPolicy,
    Operation,
    PeerAuthn,
    RateLimit,
    RouteTable,
    Source,
    StringMatch,
    Subset,
    WeightedDestination,
)
from mesh.messages import Endpoint, EndpointSet
from meshctl.simulate import (
    Caller,
    explain_destination,
    explain_outbound,
    final_refusal,
    parse_request,
    refused_share,
)
from proxy.policy import RequestFacts
from proxy.policy.explain import explain_authorization, explain_mtls
from proxy.routing import RequestAttrs, compile_routes, select_route
from proxy.routing.explain import explain_routes

HOST = "reviews.default.svc.cluster.local"


def _to(subset: str, weight: int = 100) -> WeightedDestination:
    return WeightedDestination(destination=Destination(host=HOST, subset=subset), weight=weight)


JASON = HTTPRoute(
    name="jason",
    match=(HTTPMatch(headers={"end-user": StringMatch(kind="exact", value="jason")}),),
    route=(_to("v2"),),
)
BY_PATH = HTTPRoute(
    name="api",
    match=(
        HTTPMatch(method=StringMatch(kind="exact", value="POST")),
        HTTPMatch(uri=StringMatch(kind="prefix", value="/api")),
    ),
    route=(_to("v3"),),
)
TESTERS = HTTPRoute(
    name="testers",
    match=(HTTPMatch(source_labels={"app": "tester"}, port=9080),),
    route=(_to("v3"),),
)
CATCH_ALL = HTTPRoute(name="rest", route=(_to("v1", 90), _to("v3", 10)))

TABLE = RouteTable(
    namespace="default",
    service="reviews",
    host=HOST,
    revision=7,
    http=(TESTERS, JASON, BY_PATH, CATCH_ALL),
    has_virtual_service=True,
    exists=True,
    subsets=(
        Subset(name="v1", labels={"version": "v1"}),
        Subset(name="v2", labels={"version": "v2"}),
    ),
)


def _attrs(
    path: str = "/reviews/0", headers: dict[str, str] | None = None, **kw: object
) -> RequestAttrs:
    base: dict[str, object] = {
        "method": "GET",
        "scheme": "http",
        "authority": "reviews:9080",
        "path": path,
        "headers": headers or {},
        "port": 9080,
        "source_labels": {"app": "productpage", "version": "v1"},
        "source_namespace": "default",
    }
    base.update(kw)
    return RequestAttrs(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("attrs", "winner", "reasons"),
    [
        (
            _attrs(headers={"end-user": "jason"}),
            "jason",
            ["sourceLabels: caller label app='productpage', rule wants 'tester'", ""],
        ),
        (
            _attrs(headers={"end-user": "alice"}),
            "rest",
            [
                "sourceLabels: caller label app='productpage', rule wants 'tester'",
                "headers[end-user]: value does not match exact 'jason'",
                "method: 'GET' does not match exact 'POST'",
                "uri: '/reviews/0' does not match prefix '/api'",
                "",
            ],
        ),
        (
            _attrs(path="/api/x?q=1"),
            "api",
            [
                "sourceLabels: caller label app='productpage', rule wants 'tester'",
                "headers[end-user]: header absent, rule wants exact 'jason'",
                "method: 'GET' does not match exact 'POST'",
                "",
            ],
        ),
        (
            _attrs(port=8080, source_labels={"app": "tester"}),
            "rest",
            [
                "port: request port 8080 is not 9080",
                "headers[end-user]: header absent, rule wants exact 'jason'",
                "method: 'GET' does not match exact 'POST'",
                "uri: '/reviews/0' does not match prefix '/api'",
                "",
            ],
        ),
    ],
)
def test_explain_routes_names_the_failed_condition_of_each_losing_rule(
    attrs: RequestAttrs, winner: str, reasons: list[str]
) -> None:
    compiled = compile_routes(TABLE)
    explanation = explain_routes(compiled, attrs)
    chosen = select_route(compiled, attrs)
    assert chosen is not None and explanation.chosen is not None
    assert explanation.chosen.route is chosen.route
    assert chosen.route.name == winner
    assert [v.failed for v in explanation.verdicts] == reasons
    assert [v.matched for v in explanation.verdicts] == [r == "" for r in reasons]


def test_explain_routes_numbers_rules_and_matches_like_the_virtual_service() -> None:
    explanation = explain_routes(compile_routes(TABLE), _attrs())
    positions = [(v.rule_index, v.match_index) for v in explanation.verdicts]
    assert positions == [(0, 0), (1, 0), (2, 0), (2, 1), (3, -1)]


def test_explain_routes_without_a_match_reports_every_rule() -> None:
    table = RouteTable(
        namespace="default",
        service="reviews",
        host=HOST,
        revision=1,
        http=(JASON,),
        has_virtual_service=True,
    )
    explanation = explain_routes(compile_routes(table), _attrs())
    assert explanation.chosen is None
    assert [v.matched for v in explanation.verdicts] == [False]


# ---------------------------------------------------------------- authorization


def _facts(
    principal: str = "cluster.local/ns/default/sa/productpage", **kw: object
) -> RequestFacts:
    base: dict[str, object] = {
        "principal": principal,
        "namespace": "default" if principal else "",
        "source_ip": "",
        "method": "GET",
        "path": "/reviews/0",
        "host": "reviews:9080",
        "port": 9080,
        "headers": {},
    }
    base.update(kw)
    return RequestFacts(**base)  # type: ignore[arg-type]


def _policy(*policies: AuthzPolicy, rate_limits: tuple[RateLimit, ...] = ()) -> InboundPolicy:
    return InboundPolicy(
        namespace="default",
        service="reviews",
        revision=3,
        authorization=policies,
        rate_limits=rate_limits,
    )


ALLOW_PRODUCTPAGE = AuthzPolicy(
    name="allow-productpage",
    namespace="default",
    rules=(
        AuthzRule(
            sources=(Source(principals=("cluster.local/ns/default/sa/productpage",)),),
            operations=(Operation(methods=("GET",)),),
        ),
    ),
)
DENY_ADMIN = AuthzPolicy(
    name="deny-admin",
    namespace="default",
    action="DENY",
    rules=(AuthzRule(operations=(Operation(paths=("/admin*",)),)),),
)
ALLOW_NOTHING = AuthzPolicy(name="allow-nothing", namespace="default", selector={"version": "v2"})
NEEDS_HEADER = AuthzPolicy(
    name="needs-header",
    namespace="default",
    rules=(
        AuthzRule(
            when=(Condition(key="request.headers[x-token]", values=("s3cret",)),),
        ),
    ),
)


@pytest.mark.parametrize(
    ("policies", "labels", "facts", "allowed", "reason", "why"),
    [
        ((), {"app": "reviews"}, _facts(), True, "no authorization policy applies", []),
        (
            (ALLOW_PRODUCTPAGE, DENY_ADMIN),
            {"app": "reviews"},
            _facts(),
            True,
            "allowed by ALLOW policy default/allow-productpage",
            [["rules[0] to: paths: '/reviews/0' is not listed"], ["rules[0] matches"]],
        ),
        (
            (ALLOW_PRODUCTPAGE,),
            {"app": "reviews"},
            _facts(principal="cluster.local/ns/default/sa/ratings"),
            False,
            "no ALLOW policy matched",
            [
                [
                    "rules[0] from: principals: caller principal "
                    "'cluster.local/ns/default/sa/ratings' is not listed"
                ]
            ],
        ),
        (
            (ALLOW_PRODUCTPAGE,),
            {"app": "reviews"},
            _facts(principal=""),
            False,
            "no ALLOW policy matched",
            [["rules[0] from: principals: caller principal none (plaintext caller) is not listed"]],
        ),
        (
            (ALLOW_PRODUCTPAGE, DENY_ADMIN),
            {"app": "reviews"},
            _facts(path="/admin/users"),
            False,
            "denied by DENY policy default/deny-admin",
            [["rules[0] matches"], ["rules[0] matches"]],
        ),
        (
            (ALLOW_NOTHING,),
            {"app": "reviews", "version": "v2"},
            _facts(),
            False,
            "no ALLOW policy matched",
            [["has no rules: matches no request"]],
        ),
        (
            (ALLOW_NOTHING,),
            {"app": "reviews", "version": "v1"},
            _facts(),
            True,
            "no authorization policy applies",
            [],
        ),
        (
            (NEEDS_HEADER,),
            {"app": "reviews"},
            _facts(),
            False,
            "no ALLOW policy matched",
            [["rules[0] when[0] request.headers[x-token]: absent"]],
        ),
        (
            (NEEDS_HEADER,),
            {"app": "reviews"},
            _facts(headers={"x-token": "guess"}),
            False,
            "no ALLOW policy matched",
            [["rules[0] when[0] request.headers[x-token]: value not accepted"]],
        ),
    ],
)
def test_explain_authorization_gives_the_decision_and_each_policy_s_reason(
    policies: tuple[AuthzPolicy, ...],
    labels: dict[str, str],
    facts: RequestFacts,
    allowed: bool,
    reason: str,
    why: list[list[str]],
) -> None:
    explanation = explain_authorization(_policy(*policies), labels, facts)
    assert explanation.decision.allowed is allowed
    assert explanation.decision.reason == reason
    assert [list(p.why) for p in explanation.policies] == why


def _peer(name: str, scope: str, mode: str, **kw: object) -> PeerAuthn:
    return PeerAuthn(name=name, namespace="default", scope=scope, mode=mode, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("policies", "labels", "mode", "source"),
    [
        ((), {}, "PERMISSIVE", "mesh default (no PeerAuthentication sets a mode)"),
        ((_peer("ns", "namespace", "STRICT"),), {}, "STRICT", "namespace policy default/ns"),
        (
            (
                _peer("ns", "namespace", "STRICT"),
                _peer(
                    "wl",
                    "workload",
                    "UNSET",
                    selector={"app": "reviews"},
                    port_modes={9080: "DISABLE"},
                ),
            ),
            {"app": "reviews"},
            "DISABLE",
            "workload policy default/wl (port 9080)",
        ),
        (
            (
                _peer("ns", "namespace", "PERMISSIVE"),
                _peer("wl", "workload", "UNSET", selector={"app": "reviews"}),
            ),
            {"app": "reviews"},
            "PERMISSIVE",
            "namespace policy default/ns",
        ),
    ],
)
def test_explain_mtls_names_the_policy_that_set_the_mode(
    policies: tuple[PeerAuthn, ...], labels: dict[str, str], mode: str, source: str
) -> None:
    explanation = explain_mtls(policies, labels, 9080)
    assert (explanation.mode, explanation.source) == (mode, source)


# ---------------------------------------------------------------- the simulation

PRODUCTPAGE = Caller(
    namespace="default",
    labels={"app": "productpage", "version": "v1"},
    principal="cluster.local/ns/default/sa/productpage",
    instance="productpage-v1-a",
)
ENDPOINTS = EndpointSet(
    namespace="default",
    service="reviews",
    revision=5,
    endpoints=[
        Endpoint(
            instance=f"reviews-{v}-a",
            address=f"127.0.0.1:1500{i}",
            labels={"app": "reviews", "version": v},
            version=v,
            identity="spiffe://cluster.local/ns/default/sa/reviews",
        )
        for i, v in enumerate(("v1", "v2", "v3"))
    ],
)


def _simulate(
    headers: list[str], inbound: InboundPolicy | None = None, caller: Caller = PRODUCTPAGE
) -> tuple[object, object]:
    request = parse_request("GET", "http://reviews:9080/reviews/0", headers)
    route = explain_outbound(request, caller, TABLE, ENDPOINTS)
    for dest in route.destinations:
        explain_destination(dest, request, caller, TABLE, ENDPOINTS, inbound)
    return route, final_refusal(route)


def test_simulation_serves_jason_from_v2() -> None:
    route, refusal = _simulate(["end-user: jason"])
    assert refusal is None
    assert [d.destination.destination.subset for d in route.destinations] == ["v2"]  # type: ignore[attr-defined]
    assert [e.endpoint.instance for e in route.destinations[0].endpoints] == ["reviews-v2-a"]  # type: ignore[attr-defined]


def test_simulation_refuses_a_subset_no_destination_rule_defines_with_503_nc() -> None:
    route, refusal = _simulate([])
    assert refusal is not None
    assert (refusal.status, refusal.flag) == (503, "NC")  # type: ignore[attr-defined]
    assert "unknown subset 'v3'" in refusal.reason  # type: ignore[attr-defined]
    assert "subsets defined: v1, v2" in refusal.reason  # type: ignore[attr-defined]
    shares = [(d.destination.destination.subset, d.share) for d in route.destinations]  # type: ignore[attr-defined]
    assert shares == [("v1", 90.0), ("v3", 10.0)]
    assert refused_share(route) == 10.0  # type: ignore[arg-type]


def test_simulation_refuses_403_when_authorization_denies_every_endpoint() -> None:
    caller = Caller("default", {"app": "ratings"}, "cluster.local/ns/default/sa/ratings")
    _route, refusal = _simulate(["end-user: jason"], _policy(ALLOW_PRODUCTPAGE), caller)
    assert refusal is not None
    assert (refusal.status, refusal.flag) == (403, "RBAC")  # type: ignore[attr-defined]
    assert "no ALLOW policy matched" in refusal.reason  # type: ignore[attr-defined]


def test_simulation_refuses_a_plaintext_caller_under_strict_mtls() -> None:
    strict = InboundPolicy(
        namespace="default",
        service="reviews",
        revision=2,
        peer_authentication=(_peer("ns", "namespace", "STRICT"),),
    )
    plaintext = Caller("default", {"app": "curl"}, "")
    _route, refusal = _simulate(["end-user: jason"], strict, plaintext)
    assert refusal is not None
    assert refusal.status == 403  # type: ignore[attr-defined]
    assert "mTLS required" in refusal.reason  # type: ignore[attr-defined]


def test_simulation_reports_rate_limits_in_force() -> None:
    limit = RateLimit(name="rl", namespace="default", total_rps=10, identity_rps=2)
    route, refusal = _simulate(["end-user: jason"], _policy(rate_limits=(limit,)))
    assert refusal is None
    limits = route.destinations[0].endpoints[0].rate_limits  # type: ignore[attr-defined]
    assert limits == [
        {"policy": "default/rl", "total_rps": 10, "per_caller_rps": 2, "override": False}
    ]


def test_simulation_unknown_route_is_404_nr() -> None:
    table = RouteTable(
        namespace="default", service="reviews", host=HOST, revision=1, http=(JASON,),
        has_virtual_service=True, exists=True,
    )  # fmt: skip
    request = parse_request("GET", "http://reviews:9080/", [])
    route = explain_outbound(request, PRODUCTPAGE, table, ENDPOINTS)
    refusal = final_refusal(route)
    assert refusal is not None and (refusal.status, refusal.flag) == (404, "NR")


@pytest.mark.parametrize(
    ("url", "headers", "message"),
    [
        ("ftp://x/", [], "expected http://HOST[:PORT]/PATH"),
        ("http://x:99999/", [], "invalid port"),
        ("http://x/", ["no-colon"], "expected 'Name: value'"),
    ],
)
def test_parse_request_rejects_bad_input_naming_it(
    url: str, headers: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_request("GET", url, headers)


# ---------------------------------------------------------------- --from


def test_from_resolves_instances_services_and_unregistered_names() -> None:
    from meshctl.common import CLIError
    from meshctl.explain_cmd import resolve_caller

    pages = EndpointSet(
        namespace="default",
        service="productpage",
        revision=1,
        endpoints=[
            Endpoint(
                instance="productpage-v1-host-1",
                address="h:1",
                labels={"app": "productpage", "version": "v1", "team": "web"},
                version="v1",
                identity="spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
            )
        ],
    )
    sets = [pages, ENDPOINTS]
    caller, ep = resolve_caller("productpage-v1", sets, {})
    assert ep is not None and caller.instance == "productpage-v1-host-1"
    assert caller.principal == "cluster.local/ns/default/sa/bookinfo-productpage"
    assert caller.labels["team"] == "web"
    caller, _ = resolve_caller("default/reviews-v2", sets, {"extra": "1"})
    assert (caller.instance, caller.labels["version"], caller.labels["extra"]) == (
        "reviews-v2-a",
        "v2",
        "1",
    )
    caller, ep = resolve_caller("prod/my-svc", sets, {})
    assert ep is None
    assert (caller.namespace, dict(caller.labels)) == ("prod", {"app": "my-svc"})
    assert caller.principal == "cluster.local/ns/prod/sa/my-svc"
    caller, _ = resolve_caller("prod/my-svc-v3", sets, {})
    assert dict(caller.labels) == {"app": "my-svc", "version": "v3"}
    with pytest.raises(CLIError, match="ambiguous"):
        resolve_caller("reviews-v", sets, {})


def test_health_comes_from_the_caller_sidecar_s_clusters() -> None:
    from meshctl.explain_cmd import attach_health

    route, _ = _simulate(["end-user: jason"])
    clusters = {
        "clusters": [
            {
                "destination": "default/reviews",
                "subset": "v2",
                "endpoints": [
                    {
                        "instance": "reviews-v2-a",
                        "health": "healthy",
                        "outlier": {"ejected": True, "ejected_for_s": 24.6},
                    }
                ],
            },
            {
                "destination": "default/ratings",
                "subset": "v2",
                "endpoints": [{"instance": "reviews-v2-a", "health": "draining"}],
            },
        ]
    }
    attach_health(route, clusters)  # type: ignore[arg-type]
    assert [e.health for e in route.destinations[0].endpoints] == ["EJECTED 25s"]  # type: ignore[attr-defined]


def test_a_dry_run_policy_is_explained_but_never_decides() -> None:
    import msgspec

    trial = msgspec.structs.replace(DENY_ADMIN, name="trial-deny", dry_run=True)
    explanation = explain_authorization(
        _policy(trial), {"app": "reviews"}, _facts(path="/admin/users")
    )
    assert explanation.decision.allowed is True
    assert explanation.decision.shadow is not None
    assert explanation.decision.shadow.allowed is False
    assert [(p.policy, p.action, p.matched) for p in explanation.policies] == [
        ("default/trial-deny", "DENY (dry-run)", True)
    ]
