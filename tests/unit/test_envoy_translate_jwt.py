"""Envoy translation of RequestAuthentication (`jwt_authn`) and of end-user fields in
RBAC: the parts the golden case does not pin down."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.compiled import (
    AuthzPolicy,
    AuthzRule,
    Condition,
    ExtAuthzProvider,
    InboundPolicy,
    JwtRule,
    Operation,
    RequestAuthn,
    Source,
)
from proxy.envoy.translate import TranslationError
from proxy.envoy.translate.jwt_authn import jwt_authn_filters
from proxy.envoy.translate.rbac import rbac_filters

ISSUERS = ("https://example.com/realms/a", "plain-issuer")


def principals(*patterns: str, issuers: tuple[str, ...] = ISSUERS) -> Any:
    policy = AuthzPolicy(
        name="p",
        namespace="foo",
        rules=(AuthzRule(sources=(Source(request_principals=patterns),)),),
    )
    (f,) = rbac_filters((policy,), 8000, tcp=False, stat_prefix="inbound", issuers=issuers)
    return f["typedConfig"]["rules"]["policies"]["foo/p[0]"]["principals"][0]


def meta(key: str, value: Any) -> Any:
    return {
        "metadata": {
            "filter": "envoy.filters.http.jwt_authn",
            "path": [{"key": "payload"}, {"key": key}],
            "value": value,
        }
    }


def test_a_principal_is_split_at_a_configured_issuer_even_one_with_slashes() -> None:
    assert principals("https://example.com/realms/a/user-1") == {
        "andIds": {
            "ids": [
                meta("iss", {"stringMatch": {"exact": "https://example.com/realms/a"}}),
                meta("sub", {"stringMatch": {"exact": "user-1"}}),
            ]
        }
    }
    # a prefix covering the whole issuer matches any subject of it
    assert principals("https://example.com/*") == meta(
        "iss", {"stringMatch": {"exact": "https://example.com/realms/a"}}
    )
    assert principals("*") == meta("iss", {"presentMatch": True})
    assert principals("*/user-1") == {
        "orIds": {
            "ids": [
                meta("sub", {"stringMatch": {"exact": "user-1"}}),
                meta("sub", {"stringMatch": {"suffix": "/user-1"}}),
            ]
        }
    }
    assert principals("*-1") == meta("sub", {"stringMatch": {"suffix": "-1"}})


def test_a_principal_no_configured_issuer_can_produce_matches_nobody() -> None:
    assert principals("unknown-issuer/user-1") == {"notId": {"any": True}}
    assert principals("plain-issuer/x", issuers=()) == {"notId": {"any": True}}


def test_a_suffix_spanning_issuer_and_subject_is_refused() -> None:
    with pytest.raises(TranslationError, match="requestPrincipals"):
        principals("*a/b")


def test_claims_match_strings_and_list_elements_nested() -> None:
    policy = AuthzPolicy(
        name="p",
        namespace="foo",
        rules=(AuthzRule(when=(Condition(key="request.auth.claims[org][team]", values=("x",)),)),),
    )
    (f,) = rbac_filters((policy,), 8000, tcp=False, stat_prefix="inbound", issuers=ISSUERS)
    matcher = f["typedConfig"]["rules"]["policies"]["foo/p[0]"]["principals"][0]
    path = [{"key": "payload"}, {"key": "org"}, {"key": "team"}]
    assert [m["metadata"]["path"] for m in matcher["orIds"]["ids"]] == [path, path]
    assert matcher["orIds"]["ids"][1]["metadata"]["value"] == {
        "listMatch": {"oneOf": {"stringMatch": {"exact": "x"}}}
    }


def test_on_tcp_an_allow_rule_with_user_fields_is_dropped_and_a_deny_rule_loses_them() -> None:
    rule = AuthzRule(sources=(Source(request_principals=("*",), namespaces=("foo",)),))
    allow = AuthzPolicy(name="a", namespace="foo", rules=(rule,))
    deny = AuthzPolicy(name="d", namespace="foo", action="DENY", rules=(rule,))
    (f_deny, f_allow) = rbac_filters((allow, deny), 9000, tcp=True, stat_prefix="tcp")
    assert f_allow["typedConfig"]["rules"]["policies"] == {}
    kept = f_deny["typedConfig"]["rules"]["policies"]["foo/d[0]"]["principals"][0]
    assert "jwt_authn" not in str(kept) and "/ns/foo/" in str(kept)


def test_jwt_authn_filter_requires_any_provider_or_none() -> None:
    authn = RequestAuthn(
        name="r",
        namespace="foo",
        rules=(
            JwtRule(issuer="a", jwks='{"keys": []}'),
            JwtRule(issuer="b", jwks_uri="http://10.0.0.9:8080/jwks"),
        ),
    )
    (f,), clusters = jwt_authn_filters([authn], "/ca.pem")
    config = f["typedConfig"]
    assert list(config["providers"]) == ["origins-0", "origins-1"]
    requirements = config["rules"][0]["requires"]["requiresAny"]["requirements"]
    assert requirements[-1] == {"allowMissing": {}}
    # a plain-http jwksUri: no TLS on its cluster; an IP: a static cluster
    (cluster,) = clusters.values()
    assert cluster["name"] == "jwks|10.0.0.9|8080" and cluster["type"] == "STATIC"
    assert "transportSocket" not in cluster
    assert jwt_authn_filters([], "/ca.pem") == ([], {})


def test_custom_on_tcp_denies_what_it_matches_and_two_providers_are_refused() -> None:
    custom = AuthzPolicy(
        name="c", namespace="foo", action="CUSTOM", provider="p", rules=(AuthzRule(),)
    )
    (f,) = rbac_filters((custom,), 9000, tcp=True, stat_prefix="tcp")
    rules = f["typedConfig"]["rules"]
    assert rules["action"] == "DENY" and list(rules["policies"]) == ["foo/c[0]"]
    other = AuthzPolicy(name="d", namespace="foo", action="CUSTOM", provider="q")
    providers = (
        ExtAuthzProvider(name="p", service="a.foo.svc.cluster.local", port=80),
        ExtAuthzProvider(name="q", service="b.foo.svc.cluster.local", port=80),
    )
    inbound = InboundPolicy(namespace="foo", service="s", revision=1, extension_providers=providers)
    with pytest.raises(TranslationError, match="one extension provider per workload"):
        rbac_filters((custom, other), 80, tcp=False, stat_prefix="i", inbound=inbound)


def test_service_accounts_and_path_templates() -> None:
    rule = AuthzRule(
        sources=(Source(service_accounts=("default/sleep",)),),
        operations=(Operation(paths=("/api/{*}/info", "/static/*")),),
    )
    policy = AuthzPolicy(name="p", namespace="foo", rules=(rule,))
    (f,) = rbac_filters((policy,), 8000, tcp=False, stat_prefix="inbound")
    built = f["typedConfig"]["rules"]["policies"]["foo/p[0]"]
    assert built["principals"] == [
        {
            "authenticated": {
                "principalName": {"safeRegex": {"regex": "spiffe://[^/]+/ns/default/sa/sleep"}}
            }
        }
    ]
    template, prefix = built["permissions"][0]["orRules"]["rules"]
    assert template["uriTemplate"]["typedConfig"]["pathTemplate"] == "/api/*/info"
    assert prefix == {"urlPath": {"path": {"prefix": "/static/"}}}


def test_remote_ip_blocks_use_the_xff_client_only_with_trusted_proxies() -> None:
    rule = AuthzRule(sources=(Source(remote_ip_blocks=("203.0.113.0/24",)),))
    policy = AuthzPolicy(name="p", namespace="foo", rules=(rule,))
    for hops, kind in ((0, "directRemoteIp"), (2, "remoteIp")):
        inbound = InboundPolicy(namespace="foo", service="s", revision=1, num_trusted_proxies=hops)
        (f,) = rbac_filters((policy,), 80, tcp=False, stat_prefix="i", inbound=inbound)
        principal = f["typedConfig"]["rules"]["policies"]["foo/p[0]"]["principals"][0]
        assert principal == {kind: {"addressPrefix": "203.0.113.0", "prefixLen": 24}}
