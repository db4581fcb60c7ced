"""AuthorizationPolicy evaluation (proxy.policy.authz): which callers reach the app."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import pytest

from mesh.compiled import AuthzPolicy, AuthzRule, Condition, InboundPolicy, Operation, Source
from proxy.policy import Authorizer, Decision, RequestFacts

LABELS = {"app": "reviews", "version": "v2"}
PRODUCTPAGE = "cluster.local/ns/default/sa/productpage"


def facts(**overrides: Any) -> RequestFacts:
    base: dict[str, Any] = {
        "principal": PRODUCTPAGE,
        "namespace": "default",
        "source_ip": "10.0.0.5",
        "method": "GET",
        "path": "/api/v1/reviews",
        "host": "reviews.default.svc.cluster.local:9080",
        "port": 9080,
        "headers": {},
    }
    base.update(overrides)
    return RequestFacts(**base)


PLAINTEXT: dict[str, Any] = {"principal": "", "namespace": ""}


def policy(
    *rules: AuthzRule,
    action: Literal["ALLOW", "DENY", "AUDIT"] = "ALLOW",
    name: str = "p",
    namespace: str = "default",
    selector: Mapping[str, str] | None = None,
) -> AuthzPolicy:
    return AuthzPolicy(
        name=name,
        namespace=namespace,
        action=action,
        selector=dict(selector or {}),
        rules=rules,
    )


def inbound(*policies: AuthzPolicy) -> InboundPolicy:
    return InboundPolicy(namespace="default", service="reviews", revision=1, authorization=policies)


def decide(
    policies: tuple[AuthzPolicy, ...], labels: Mapping[str, str] = LABELS, **overrides: Any
) -> Decision:
    return Authorizer.build(inbound(*policies), labels).decide(facts(**overrides))


def src(**fields: Any) -> AuthzRule:
    return AuthzRule(sources=(Source(**fields),))


def op(**fields: Any) -> AuthzRule:
    return AuthzRule(operations=(Operation(**fields),))


def when(key: str, values: tuple[str, ...] = (), not_values: tuple[str, ...] = ()) -> AuthzRule:
    return AuthzRule(when=(Condition(key=key, values=values, not_values=not_values),))


# One ALLOW policy with one rule: is the request allowed (i.e. does the rule match)?
MATRIX: list[tuple[str, AuthzRule, dict[str, Any], bool]] = [
    # ---- principals
    ("principal exact", src(principals=(PRODUCTPAGE,)), {}, True),
    ("principal exact other", src(principals=("cluster.local/ns/default/sa/ratings",)), {}, False),
    ("principal prefix", src(principals=("cluster.local/ns/default/*",)), {}, True),
    ("principal prefix other ns", src(principals=("cluster.local/ns/prod/*",)), {}, False),
    ("principal suffix", src(principals=("*/sa/productpage",)), {}, True),
    ("principal suffix other sa", src(principals=("*/sa/ratings",)), {}, False),
    ("principal any authenticated", src(principals=("*",)), {}, True),
    ("principal * rejects plaintext", src(principals=("*",)), PLAINTEXT, False),
    ("principal prefix rejects plaintext", src(principals=("cluster.local/*",)), PLAINTEXT, False),
    ("principal one of several", src(principals=("a", PRODUCTPAGE)), {}, True),
    ("notPrincipals excludes", src(not_principals=(PRODUCTPAGE,)), {}, False),
    ("notPrincipals other", src(not_principals=("cluster.local/ns/x/sa/y",)), {}, True),
    ("notPrincipals * excludes authenticated", src(not_principals=("*",)), {}, False),
    ("notPrincipals * admits plaintext", src(not_principals=("*",)), PLAINTEXT, True),
    # ---- namespaces
    ("namespace exact", src(namespaces=("default",)), {}, True),
    ("namespace other", src(namespaces=("prod",)), {}, False),
    ("namespace prefix", src(namespaces=("def*",)), {}, True),
    ("namespace * rejects plaintext", src(namespaces=("*",)), PLAINTEXT, False),
    ("notNamespaces excludes", src(not_namespaces=("default",)), {}, False),
    ("notNamespaces admits plaintext", src(not_namespaces=("*",)), PLAINTEXT, True),
    # ---- ipBlocks
    ("ip v4 cidr", src(ip_blocks=("10.0.0.0/8",)), {}, True),
    ("ip v4 cidr other", src(ip_blocks=("192.168.0.0/16",)), {}, False),
    ("ip v4 single", src(ip_blocks=("10.0.0.5",)), {}, True),
    ("ip v4 single other", src(ip_blocks=("10.0.0.6",)), {}, False),
    ("ip v4 non-strict cidr", src(ip_blocks=("10.0.0.1/24",)), {}, True),
    ("ip v6 cidr", src(ip_blocks=("2001:db8::/32",)), {"source_ip": "2001:db8::7"}, True),
    ("ip v6 cidr other", src(ip_blocks=("2001:db8::/32",)), {"source_ip": "2001:db9::7"}, False),
    (
        "ip v4 cidr vs v6 caller",
        src(ip_blocks=("10.0.0.0/8",)),
        {"source_ip": "2001:db8::7"},
        False,
    ),
    ("ip v4-mapped caller", src(ip_blocks=("10.0.0.0/8",)), {"source_ip": "::ffff:10.0.0.5"}, True),
    ("notIpBlocks excludes", src(not_ip_blocks=("10.0.0.0/8",)), {}, False),
    ("notIpBlocks other", src(not_ip_blocks=("192.168.0.0/16", "fd00::/8")), {}, True),
    # ---- all set source fields must hold
    (
        "source AND holds",
        src(principals=("*",), namespaces=("default",), ip_blocks=("10.0.0.0/8",)),
        {},
        True,
    ),
    ("source AND fails", src(principals=("*",), namespaces=("prod",)), {}, False),
    # ---- methods: case-sensitive
    ("method exact", op(methods=("GET", "HEAD")), {}, True),
    ("method other", op(methods=("POST",)), {}, False),
    ("method case-sensitive", op(methods=("get",)), {}, False),
    ("notMethods excludes", op(not_methods=("DELETE",)), {"method": "DELETE"}, False),
    ("notMethods other", op(not_methods=("DELETE",)), {}, True),
    # ---- paths
    ("path exact", op(paths=("/api/v1/reviews",)), {}, True),
    ("path exact ignores query", op(paths=("/admin",)), {"path": "/admin?debug=1"}, True),
    ("path prefix", op(paths=("/api/*",)), {}, True),
    ("path prefix bare dir", op(paths=("/api/*",)), {"path": "/api/"}, True),
    ("path prefix not a sibling", op(paths=("/api/*",)), {"path": "/apis/x"}, False),
    ("path suffix", op(paths=("*/info",)), {"path": "/v1/info"}, True),
    ("path suffix other", op(paths=("*/info",)), {"path": "/v1/info/x"}, False),
    ("path *", op(paths=("*",)), {}, True),
    ("path case-sensitive", op(paths=("/API/*",)), {}, False),
    ("notPaths excludes", op(not_paths=("/admin", "/admin/*")), {"path": "/admin/users"}, False),
    ("notPaths other", op(not_paths=("/admin", "/admin/*")), {}, True),
    # ---- hosts: case-insensitive, with and without port
    ("host without port", op(hosts=("reviews.default.svc.cluster.local",)), {}, True),
    ("host with port", op(hosts=("reviews.default.svc.cluster.local:9080",)), {}, True),
    ("host other port", op(hosts=("reviews.default.svc.cluster.local:8080",)), {}, False),
    ("host case-insensitive", op(hosts=("Reviews.DEFAULT.svc.cluster.local",)), {}, True),
    ("host caller upper-case", op(hosts=("reviews",)), {"host": "REVIEWS:9080"}, True),
    ("host suffix", op(hosts=("*.svc.cluster.local",)), {}, True),
    ("host prefix", op(hosts=("reviews.*",)), {}, True),
    ("host other", op(hosts=("ratings",)), {}, False),
    ("host ipv6 literal", op(hosts=("[fd00::1]",)), {"host": "[fd00::1]:9080"}, True),
    ("host no port sent", op(hosts=("reviews",)), {"host": "reviews"}, True),
    (
        "notHosts excludes via stripped",
        op(not_hosts=("reviews.default.svc.cluster.local",)),
        {},
        False,
    ),
    ("notHosts other", op(not_hosts=("ratings",)), {}, True),
    # ---- ports
    ("port", op(ports=("9080",)), {}, True),
    ("port other", op(ports=("8080",)), {}, False),
    ("notPorts excludes", op(not_ports=("9080",)), {}, False),
    ("notPorts other", op(not_ports=("8080",)), {}, True),
    ("operation AND fails", op(methods=("GET",), paths=("/admin",)), {}, False),
    # ---- when: headers
    (
        "header value",
        when("request.headers[x-user]", ("alice",)),
        {"headers": {"x-user": "alice"}},
        True,
    ),
    (
        "header name case-insensitive",
        when("request.headers[X-User]", ("alice",)),
        {"headers": {"x-user": "alice"}},
        True,
    ),
    (
        "header value other",
        when("request.headers[x-user]", ("alice",)),
        {"headers": {"x-user": "bob"}},
        False,
    ),
    ("header absent", when("request.headers[x-user]", ("alice",)), {}, False),
    (
        "header * present",
        when("request.headers[x-user]", ("*",)),
        {"headers": {"x-user": "x"}},
        True,
    ),
    ("header * empty", when("request.headers[x-user]", ("*",)), {"headers": {"x-user": ""}}, False),
    (
        "header prefix",
        when("request.headers[x-user]", ("ali*",)),
        {"headers": {"x-user": "alice"}},
        True,
    ),
    (
        "header joined values",
        when("request.headers[x-tag]", ("a,b",)),
        {"headers": {"x-tag": "a,b"}},
        True,
    ),
    ("header notValues absent", when("request.headers[x-user]", (), ("bob",)), {}, True),
    (
        "header notValues hit",
        when("request.headers[x-user]", (), ("bob",)),
        {"headers": {"x-user": "bob"}},
        False,
    ),
    (
        "header values and notValues",
        when("request.headers[x-user]", ("*",), ("bob",)),
        {"headers": {"x-user": "al"}},
        True,
    ),
    # ---- when: principal, namespace, ip, port
    ("when principal", when("source.principal", ("*/sa/productpage",)), {}, True),
    ("when principal other", when("source.principal", ("*/sa/ratings",)), {}, False),
    ("when principal plaintext", when("source.principal", ("*",)), PLAINTEXT, False),
    ("when notValues principal plaintext", when("source.principal", (), ("*",)), PLAINTEXT, True),
    ("when namespace", when("source.namespace", ("default",)), {}, True),
    ("when namespace other", when("source.namespace", (), ("default",)), {}, False),
    ("when ip cidr", when("source.ip", ("10.0.0.0/24",)), {}, True),
    ("when ip other", when("source.ip", ("10.0.1.0/24",)), {}, False),
    ("when ip notValues", when("source.ip", (), ("10.0.0.5",)), {}, False),
    ("when ip v6", when("source.ip", ("fd00::/8",)), {"source_ip": "fd00::9"}, True),
    ("when destination.port", when("destination.port", ("9080",)), {}, True),
    ("when destination.port other", when("destination.port", ("8080",)), {}, False),
    # ---- unevaluable conditions fail closed in an ALLOW policy
    (
        "when unknown key",
        when("experimental.envoy.filters.network.mysql_proxy[db.table]", ("*",)),
        {},
        False,
    ),
    (
        "when unknown key notValues",
        when("experimental.envoy.filters.network.mysql_proxy[db.table]", (), ("x",)),
        {},
        False,
    ),
    ("when no values at all", when("source.namespace"), {}, False),
    # ---- rule structure
    ("empty rule matches everything", AuthzRule(), PLAINTEXT, True),
    (
        "sources are ORed",
        AuthzRule(sources=(Source(namespaces=("prod",)), Source(principals=(PRODUCTPAGE,)))),
        {},
        True,
    ),
    (
        "operations are ORed",
        AuthzRule(operations=(Operation(methods=("POST",)), Operation(paths=("/api/*",)))),
        {},
        True,
    ),
    (
        "from AND to: to fails",
        AuthzRule(
            sources=(Source(namespaces=("default",)),), operations=(Operation(methods=("POST",)),)
        ),
        {},
        False,
    ),
    (
        "from AND to AND when",
        AuthzRule(
            sources=(Source(namespaces=("default",)),),
            operations=(Operation(methods=("GET",)),),
            when=(Condition(key="request.headers[x-user]", values=("alice",)),),
        ),
        {"headers": {"x-user": "alice"}},
        True,
    ),
    (
        "all when conditions must hold",
        AuthzRule(
            when=(
                Condition(key="source.namespace", values=("default",)),
                Condition(key="destination.port", values=("8080",)),
            )
        ),
        {},
        False,
    ),
]


@pytest.mark.parametrize(
    ("rule", "overrides", "allowed"),
    [pytest.param(rule, overrides, allowed, id=name) for name, rule, overrides, allowed in MATRIX],
)
def test_allow_rule_matrix(rule: AuthzRule, overrides: dict[str, Any], allowed: bool) -> None:
    decision = decide((policy(rule, name="allow-it"),), **overrides)
    assert decision.allowed is allowed
    assert decision.policy == ("default/allow-it" if allowed else "")


UNEVALUABLE = {"when unknown key", "when unknown key notValues", "when no values at all"}


@pytest.mark.parametrize(
    ("name", "rule", "overrides", "allowed"),
    [pytest.param(*case, id=case[0]) for case in MATRIX],
)
def test_deny_rule_matrix_is_the_mirror(
    name: str, rule: AuthzRule, overrides: dict[str, Any], allowed: bool
) -> None:
    # The same rule in a DENY policy denies exactly what it allowed above, except the
    # unevaluable conditions, which fail closed in both directions (they deny here).
    decision = decide((policy(rule, action="DENY", name="deny-it"),), **overrides)
    assert decision.allowed is (not allowed and name not in UNEVALUABLE)
    assert decision.policy == ("" if decision.allowed else "default/deny-it")


def test_no_policy_allows_and_is_empty() -> None:
    for authorizer in (Authorizer.build(None, LABELS), Authorizer.build(inbound(), LABELS)):
        assert authorizer.empty
        assert authorizer.applied == ()
        decision = authorizer.decide(facts(**PLAINTEXT))
        assert decision.allowed and decision.policy == "" and not decision.audit


def test_deny_beats_allow_and_names_the_policy() -> None:
    decision = decide(
        (
            policy(AuthzRule(), name="allow-all"),
            policy(op(paths=("/api/*",)), action="DENY", name="no-api", namespace="istio-system"),
        )
    )
    assert decision == Decision(
        False, "denied by DENY policy istio-system/no-api", "istio-system/no-api", False
    )


def test_deny_that_does_not_match_with_no_allow_policy_allows() -> None:
    decision = decide((policy(op(paths=("/admin",)), action="DENY"),))
    assert decision.allowed
    assert decision.reason == "no ALLOW policy applies"


def test_allow_reason_names_the_matching_policy() -> None:
    decision = decide((policy(op(paths=("/x",)), name="a"), policy(AuthzRule(), name="b")))
    assert decision == Decision(True, "allowed by ALLOW policy default/b", "default/b", False)


def test_no_allow_policy_matched_denies() -> None:
    decision = decide((policy(op(paths=("/x",)), name="a"),))
    assert decision == Decision(False, "no ALLOW policy matched", "", False)


@pytest.mark.parametrize(
    ("policies", "allowed", "audit"),
    [
        pytest.param((policy(AuthzRule(), action="AUDIT"),), True, True, id="audit-alone-allows"),
        pytest.param(
            (policy(AuthzRule(), action="AUDIT"), policy(op(paths=("/x",)))),
            False,
            True,
            id="audit-does-not-rescue-a-deny",
        ),
        pytest.param(
            (policy(op(paths=("/x",)), action="AUDIT"), policy(AuthzRule())),
            True,
            False,
            id="audit-not-matched",
        ),
        pytest.param(
            (policy(AuthzRule(), action="AUDIT"), policy(AuthzRule(), action="DENY")),
            False,
            True,
            id="audit-marks-a-denied-request",
        ),
    ],
)
def test_audit_only_marks(policies: tuple[AuthzPolicy, ...], allowed: bool, audit: bool) -> None:
    decision = decide(policies)
    assert (decision.allowed, decision.audit) == (allowed, audit)


def test_allow_nothing_denies_everything() -> None:
    allow_nothing = policy(name="allow-nothing")  # spec: {} -> no rules
    assert not decide((allow_nothing,)).allowed
    assert not decide((allow_nothing,), **PLAINTEXT).allowed
    # another ALLOW policy can still allow
    assert decide((allow_nothing, policy(src(namespaces=("default",)), name="ns"))).allowed


def test_deny_with_no_rules_denies_nothing() -> None:
    assert decide((policy(action="DENY"),)).allowed


@pytest.mark.parametrize(
    ("selector", "applies"),
    [
        ({}, True),
        ({"app": "reviews"}, True),
        ({"app": "reviews", "version": "v2"}, True),
        ({"version": "v1"}, False),
        ({"app": "reviews", "tier": "db"}, False),
    ],
)
def test_selector_filtering(selector: dict[str, str], applies: bool) -> None:
    deny_all = policy(AuthzRule(), action="DENY", selector=selector, name="deny")
    authorizer = Authorizer.build(inbound(deny_all), LABELS)
    assert authorizer.empty is not applies
    assert authorizer.applied == (("default/deny",) if applies else ())
    assert authorizer.decide(facts()).allowed is not applies


def test_mesh_wide_policies_are_kept_as_given() -> None:
    mesh_deny = AuthzPolicy(
        name="deny-plaintext",
        namespace="istio-system",
        action="DENY",
        mesh_wide=True,
        rules=(src(not_principals=("*",)),),
    )
    authorizer = Authorizer.build(inbound(mesh_deny), LABELS)
    assert authorizer.decide(facts(**PLAINTEXT)).policy == "istio-system/deny-plaintext"
    assert authorizer.decide(facts()).allowed


def test_plaintext_caller_against_any_authenticated() -> None:
    require_mtls = (policy(src(principals=("*",))),)
    assert decide(require_mtls).allowed
    assert not decide(require_mtls, **PLAINTEXT).allowed


@pytest.mark.parametrize(
    ("action", "allowed"),
    [("ALLOW", False), ("DENY", False)],
)
def test_invalid_ip_block_fails_closed(action: Literal["ALLOW", "DENY"], allowed: bool) -> None:
    rule = src(ip_blocks=("not-an-ip", "192.168.0.0/16"))
    assert decide((policy(rule, action=action),)).allowed is allowed


@pytest.mark.parametrize(
    ("action", "allowed"),
    [("ALLOW", False), ("DENY", True)],
)
def test_invalid_not_ip_block_fails_closed(action: Literal["ALLOW", "DENY"], allowed: bool) -> None:
    # ALLOW: an unevaluable exclusion excludes everyone; DENY: it excludes no one, and
    # the valid entry still exempts its range from the deny.
    rule = src(not_ip_blocks=("bogus", "10.0.0.0/8"))
    assert decide((policy(rule, action=action),)).allowed is allowed


def test_unparseable_caller_address_fails_closed() -> None:
    rule = src(ip_blocks=("0.0.0.0/0", "::/0"))
    assert not decide((policy(rule),), source_ip="").allowed
    assert not decide((policy(rule, action="DENY"),), source_ip="").allowed


def test_unknown_condition_key_in_deny_policy_denies() -> None:
    deny = policy(
        AuthzRule(
            operations=(Operation(paths=("/admin",)),),
            when=(
                Condition(
                    key="experimental.envoy.filters.network.mysql_proxy[db.table]",
                    values=("admins",),
                ),
            ),
        ),
        action="DENY",
    )
    # the rest of the rule still scopes the deny
    assert not decide((deny,), path="/admin").allowed
    assert decide((deny,), path="/public").allowed


def test_authorizer_is_reusable_across_requests() -> None:
    authorizer = Authorizer.build(
        inbound(policy(src(ip_blocks=("10.0.0.0/8",)), op(hosts=("reviews",)))), LABELS
    )
    assert authorizer.decide(facts(source_ip="10.1.2.3", host="x")).allowed
    assert not authorizer.decide(facts(source_ip="11.1.2.3", host="x")).allowed
    assert authorizer.decide(facts(source_ip="11.1.2.3", host="reviews:9080")).allowed
