"""AuthorizationPolicy on end-user identity (RequestAuthentication's validated JWT):
requestPrincipals, request.auth.* conditions, and their TCP rules."""

from __future__ import annotations

from typing import Any, Literal

import pytest

from mesh.compiled import AuthzPolicy, AuthzRule, Condition, InboundPolicy, Operation, Source
from proxy.policy import AuthIdentity, Authorizer, ConnectionFacts, RequestFacts

USER = AuthIdentity(
    principal="testing@secure.istio.io/user-1",
    audiences=("app-a", "app-b"),
    presenter="web-client",
    claims={
        "iss": "testing@secure.istio.io",
        "sub": "user-1",
        "groups": ["group1", "group2"],
        "org": {"team": "payments", "level": 3},
        "role": "admin",
    },
)


def facts(auth: AuthIdentity | None) -> RequestFacts:
    return RequestFacts("", "", "10.0.0.5", "GET", "/headers", "httpbin", 8000, {}, auth)


def decide(
    rule: AuthzRule, auth: AuthIdentity | None, action: Literal["ALLOW", "DENY"] = "ALLOW"
) -> bool:
    policy = AuthzPolicy(name="p", namespace="foo", action=action, rules=(rule,))
    authorizer = Authorizer.build(
        InboundPolicy(namespace="foo", service="httpbin", revision=1, authorization=(policy,)), {}
    )
    return authorizer.decide(facts(auth)).allowed


def src(**fields: Any) -> AuthzRule:
    return AuthzRule(sources=(Source(**fields),))


def when(key: str, values: tuple[str, ...] = (), not_values: tuple[str, ...] = ()) -> AuthzRule:
    return AuthzRule(when=(Condition(key=key, values=values, not_values=not_values),))


# rule in an ALLOW policy, identity -> allowed?
MATRIX: list[tuple[str, AuthzRule, AuthIdentity | None, bool]] = [
    ("any principal, valid token", src(request_principals=("*",)), USER, True),
    ("any principal, no token", src(request_principals=("*",)), None, False),
    ("exact principal", src(request_principals=("testing@secure.istio.io/user-1",)), USER, True),
    ("other principal", src(request_principals=("testing@secure.istio.io/x",)), USER, False),
    ("issuer prefix", src(request_principals=("testing@secure.istio.io/*",)), USER, True),
    ("subject suffix", src(request_principals=("*/user-1",)), USER, True),
    ("notRequestPrincipals match", src(not_request_principals=("*/user-1",)), USER, False),
    ("notRequestPrincipals other", src(not_request_principals=("*/x",)), USER, True),
    # Istio: no principal is not excluded by notRequestPrincipals
    ("notRequestPrincipals no token", src(not_request_principals=("*",)), None, True),
    ("claim list element", when("request.auth.claims[groups]", ("group1",)), USER, True),
    ("claim list other", when("request.auth.claims[groups]", ("group3",)), USER, False),
    ("claim list notValues", when("request.auth.claims[groups]", (), ("group2",)), USER, False),
    ("claim string", when("request.auth.claims[role]", ("adm*",)), USER, True),
    ("claim nested", when("request.auth.claims[org][team]", ("payments",)), USER, True),
    ("claim nested number", when("request.auth.claims[org][level]", ("3",)), USER, False),
    ("claim absent", when("request.auth.claims[missing]", ("*",)), USER, False),
    ("claim no token", when("request.auth.claims[groups]", ("group1",)), None, False),
    ("principal key", when("request.auth.principal", ("*/user-1",)), USER, True),
    ("audiences any", when("request.auth.audiences", ("app-b",)), USER, True),
    ("audiences none", when("request.auth.audiences", ("app-c",)), USER, False),
    ("presenter", when("request.auth.presenter", ("web-client",)), USER, True),
    ("presenter no token", when("request.auth.presenter", (), ("x",)), None, True),
]


@pytest.mark.parametrize(
    ("rule", "auth", "allowed"), [pytest.param(*c[1:], id=c[0]) for c in MATRIX]
)
def test_allow_matrix(rule: AuthzRule, auth: AuthIdentity | None, allowed: bool) -> None:
    assert decide(rule, auth) is allowed


@pytest.mark.parametrize(
    ("rule", "auth", "allowed"), [pytest.param(*c[1:], id=c[0]) for c in MATRIX]
)
def test_deny_matrix_is_the_mirror(
    rule: AuthzRule, auth: AuthIdentity | None, allowed: bool
) -> None:
    assert decide(rule, auth, "DENY") is (not allowed)


def test_tcp_allow_with_request_principals_never_matches_and_deny_drops_them() -> None:
    rule = AuthzRule(sources=(Source(request_principals=("*",), namespaces=("foo",)),))
    conditions = AuthzRule(
        sources=(Source(namespaces=("foo",)),),
        when=(Condition(key="request.auth.claims[groups]", values=("g",)),),
    )
    connection = ConnectionFacts("cluster.local/ns/foo/sa/sleep", "foo", "10.0.0.5", 9000)
    for r in (rule, conditions):
        allow = AuthzPolicy(name="a", namespace="foo", rules=(r,))
        deny = AuthzPolicy(name="d", namespace="foo", action="DENY", rules=(r,))
        build = lambda p: Authorizer.build(  # noqa: E731
            InboundPolicy(namespace="foo", service="s", revision=1, authorization=(p,)), {}
        )
        assert not build(allow).decide_connection(connection).allowed
        # the HTTP-only part is dropped: the DENY applies to every caller from foo
        assert not build(deny).decide_connection(connection).allowed
        other = connection._replace(namespace="bar", principal="cluster.local/ns/bar/sa/x")
        assert build(deny).decide_connection(other).allowed


# ---------------------------------------------------------------- serviceAccounts, path templates


def peer_facts(principal: str, path: str = "/") -> RequestFacts:
    namespace = principal.split("/ns/")[1].split("/")[0] if principal else ""
    return RequestFacts(principal, namespace, "10.0.0.5", "GET", path, "httpbin", 8000, {})


@pytest.mark.parametrize(
    ("principal", "accounts", "not_accounts", "allowed"),
    [
        ("cluster.local/ns/default/sa/sleep", ("default/sleep",), (), True),
        ("other.domain/ns/default/sa/sleep", ("default/sleep",), (), True),  # any trust domain
        ("cluster.local/ns/default/sa/sleepy", ("default/sleep",), (), False),
        ("cluster.local/ns/foo/sa/sleep", ("default/sleep",), (), False),
        ("", ("default/sleep",), (), False),  # plaintext: no service account
        ("cluster.local/ns/default/sa/sleep", (), ("default/sleep",), False),
        ("cluster.local/ns/default/sa/other", (), ("default/sleep",), True),
        ("", (), ("default/sleep",), True),
    ],
)
def test_service_accounts(
    principal: str, accounts: tuple[str, ...], not_accounts: tuple[str, ...], allowed: bool
) -> None:
    rule = AuthzRule(
        sources=(Source(service_accounts=accounts, not_service_accounts=not_accounts),)
    )
    policy = AuthzPolicy(name="p", namespace="foo", rules=(rule,))
    authorizer = Authorizer.build(
        InboundPolicy(namespace="foo", service="httpbin", revision=1, authorization=(policy,)), {}
    )
    assert authorizer.decide(peer_facts(principal)).allowed is allowed
    # not HTTP-only: a TCP connection is decided the same way
    connection = ConnectionFacts(principal, "", "10.0.0.5", 9000)
    assert authorizer.decide_connection(connection).allowed is allowed


TEMPLATES = [
    ("/foo/{*}", "/foo/bar", True),
    ("/foo/{*}", "/foo/bar/baz", False),
    ("/foo/{*}", "/foo/", False),
    ("/foo/{**}", "/foo/bar/baz", True),
    ("/foo/{**}", "/foo/", True),
    ("/foo/{*}/bar/{**}", "/foo/buzz/bar/", True),
    ("/foo/{*}/bar/{**}", "/foo/buzz/bar/baz/qux", True),
    ("/foo/{*}/bar/{**}", "/foo/a/b/bar/baz", False),
    ("/api/{*}/info", "/api/v1/info", True),
    ("/api/{*}/info", "/api/v1/info/x", False),
    ("/api/{**}/info", "/api/v1/v2/info", True),
    ("/api/{**}/info", "/api/v1/v2/details", False),
]


@pytest.mark.parametrize(("template", "path", "matches"), TEMPLATES)
def test_path_templates(template: str, path: str, matches: bool) -> None:
    allow = AuthzPolicy(
        name="p", namespace="foo", rules=(AuthzRule(operations=(Operation(paths=(template,)),)),)
    )
    deny = AuthzPolicy(
        name="d",
        namespace="foo",
        action="DENY",
        rules=(AuthzRule(operations=(Operation(not_paths=(template,)),)),),
    )
    for policy, allowed in ((allow, matches), (deny, matches)):
        authorizer = Authorizer.build(
            InboundPolicy(namespace="foo", service="h", revision=1, authorization=(policy,)), {}
        )
        assert authorizer.decide(peer_facts("", path)).allowed is allowed


def test_explain_names_request_principals_and_custom_policies() -> None:
    from proxy.policy.explain import explain_authorization

    custom = AuthzPolicy(
        name="ext", namespace="foo", action="CUSTOM", provider="p", rules=(AuthzRule(),)
    )
    require = AuthzPolicy(
        name="require-jwt", namespace="foo", rules=(src(request_principals=("*",)),)
    )
    policy = InboundPolicy(
        namespace="foo", service="httpbin", revision=1, authorization=(custom, require)
    )
    explained = explain_authorization(policy, {}, facts(None))
    assert not explained.decision.allowed and explained.decision.custom == "p"
    assert [(v.policy, v.action) for v in explained.policies] == [
        ("foo/ext", "CUSTOM"),
        ("foo/require-jwt", "ALLOW"),
    ]
    assert explained.policies[1].why == (
        "rules[0] from: requestPrincipals: request principal none (no valid JWT) is not listed",
    )


# ---------------------------------------------------------------- remoteIpBlocks


@pytest.mark.parametrize(
    ("xff", "peer", "trusted", "client"),
    [
        ("203.0.113.128, 203.0.113.10, 203.0.113.1", "192.0.2.5", 0, "192.0.2.5"),
        ("203.0.113.128, 203.0.113.10, 203.0.113.1", "192.0.2.5", 1, "203.0.113.1"),
        # Envoy's documented example: two trusted proxies
        ("203.0.113.128, 203.0.113.10, 203.0.113.1", "192.0.2.5", 2, "203.0.113.10"),
        ("203.0.113.1", "192.0.2.5", 2, "192.0.2.5"),  # fewer hops than trusted
        ("", "192.0.2.5", 1, "192.0.2.5"),
    ],
)
def test_original_client(xff: str, peer: str, trusted: int, client: str) -> None:
    from proxy.policy import original_client

    assert original_client(xff, peer, trusted) == client


def test_remote_ip_blocks_compare_the_original_client() -> None:
    rule = AuthzRule(sources=(Source(remote_ip_blocks=("203.0.113.0/24",)),))
    not_rule = AuthzRule(sources=(Source(not_remote_ip_blocks=("203.0.113.0/24",)),))
    for r, inside in ((rule, True), (not_rule, False)):
        policy = AuthzPolicy(name="p", namespace="foo", rules=(r,))
        authorizer = Authorizer.build(
            InboundPolicy(namespace="foo", service="h", revision=1, authorization=(policy,)), {}
        )
        from_client = facts(None)._replace(source_ip="10.0.0.9", remote_ip="203.0.113.7")
        assert authorizer.decide(from_client).allowed is inside
        # without a remote address the peer is the client
        assert authorizer.decide(facts(None)._replace(source_ip="10.0.0.9")).allowed is not inside
