"""CUSTOM authorization (ext_authz): the MeshConfig resource, compilation, the
evaluation order, and Envoy's HTTP ext_authz request/answer semantics."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.compiled import AuthzPolicy, AuthzRule, ExtAuthzProvider, InboundPolicy, Operation
from mesh.hosts import ServiceRef
from mesh.resources import ResourceError, parse_resource
from proxy.policy import Authorizer, ConnectionFacts, RequestFacts
from proxy.policy.ext_authz import (
    check_failed,
    check_request,
    check_result,
    with_upstream_headers,
)
from services.config.compile_security import compile_inbound_policy

MESH_CONFIG = {
    "apiVersion": "meshwork.io/v1",
    "kind": "MeshConfig",
    "metadata": {"name": "mesh", "namespace": "istio-system"},
    "spec": {
        "extensionProviders": [
            {
                "name": "sample-ext-authz-http",
                "envoyExtAuthzHttp": {
                    "service": "ext-authz.foo.svc.cluster.local",
                    "port": "8000",
                    "includeRequestHeadersInCheck": ["X-Ext-Authz"],
                    "headersToUpstreamOnAllow": ["x-ext-authz-check-result"],
                    "timeout": "500ms",
                    "statusOnError": "503",
                },
            }
        ]
    },
}

CUSTOM_POLICY = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "ext-authz", "namespace": "foo"},
    "spec": {
        "selector": {"matchLabels": {"app": "httpbin"}},
        "action": "CUSTOM",
        "provider": {"name": "sample-ext-authz-http"},
        "rules": [{"to": [{"operation": {"paths": ["/headers"]}}]}],
    },
}


def parse(body: dict[str, Any]) -> Any:
    return parse_resource(body, source="t.yaml", index=0)


def test_istio_task_resources_compile_into_the_inbound_policy() -> None:
    policy = compile_inbound_policy(
        [parse(MESH_CONFIG), parse(CUSTOM_POLICY)], ServiceRef("foo", "httpbin"), 1, "istio-system"
    )
    (authz,) = policy.authorization
    assert (authz.action, authz.provider) == ("CUSTOM", "sample-ext-authz-http")
    (provider,) = policy.extension_providers
    assert provider.service == "ext-authz.foo.svc.cluster.local" and provider.port == 8000
    assert provider.include_request_headers == ("x-ext-authz",)
    assert provider.timeout_ms == 500 and provider.status_on_error == 503
    # a service no CUSTOM policy selects does not carry the providers
    other = compile_inbound_policy(
        [parse(MESH_CONFIG)], ServiceRef("foo", "other"), 1, "istio-system"
    )
    assert other.extension_providers == ()


def test_a_mesh_config_outside_the_root_namespace_defines_nothing() -> None:
    elsewhere = {**MESH_CONFIG, "metadata": {"name": "mesh", "namespace": "foo"}}
    policy = compile_inbound_policy(
        [parse(elsewhere), parse(CUSTOM_POLICY)], ServiceRef("foo", "httpbin"), 1, "istio-system"
    )
    assert policy.extension_providers == ()


def _with(spec_patch: dict[str, Any], provider_patch: dict[str, Any] | None = None) -> Any:
    body = {
        **MESH_CONFIG,
        "spec": {"extensionProviders": [dict(MESH_CONFIG["spec"]["extensionProviders"][0])]},
    }  # type: ignore[index]
    entry = body["spec"]["extensionProviders"][0]
    entry.update(spec_patch)
    if provider_patch is not None:
        entry["envoyExtAuthzHttp"] = {**entry["envoyExtAuthzHttp"], **provider_patch}
    return body


REFUSED = [
    (_with({}, {"port": "http"}), "spec.extensionProviders[0].envoyExtAuthzHttp.port"),
    (_with({}, {"port": 70000}), "spec.extensionProviders[0].envoyExtAuthzHttp.port"),
    (_with({}, {"service": ""}), "spec.extensionProviders[0].envoyExtAuthzHttp.service"),
    (_with({}, {"statusOnError": "abc"}), "spec.extensionProviders[0].envoyExtAuthzHttp.statusOnError"),
    (_with({}, {"pathPrefix": "check"}), "spec.extensionProviders[0].envoyExtAuthzHttp.pathPrefix"),
    (_with({}, {"headersToUpstreamOnAllow": ["bad header"]}),
     "spec.extensionProviders[0].envoyExtAuthzHttp.headersToUpstreamOnAllow[0]"),
    (_with({}, {"includeRequestBodyInCheck": {}}),
     "spec.extensionProviders[0].envoyExtAuthzHttp.includeRequestBodyInCheck.maxRequestBytes"),
    (_with({}, {"includeRequestBodyInCheck": {"maxRequestBytes": 2_000_000}}),
     "spec.extensionProviders[0].envoyExtAuthzHttp.includeRequestBodyInCheck.maxRequestBytes"),
    (_with({"envoyExtAuthzGrpc": {"service": "x", "port": 9000}}),
     "spec.extensionProviders[0].envoyExtAuthzGrpc"),
    (_with({"name": ""}), "spec.extensionProviders[0].name"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "path"), REFUSED)
def test_mesh_config_refusals_name_the_field(body: dict[str, Any], path: str) -> None:
    with pytest.raises(ResourceError) as info:
        parse(body)
    assert info.value.path == path


def test_custom_needs_a_provider_and_a_provider_needs_custom() -> None:
    spec = dict(CUSTOM_POLICY["spec"])  # type: ignore[arg-type]
    del spec["provider"]
    with pytest.raises(ResourceError) as info:
        parse({**CUSTOM_POLICY, "spec": spec})
    assert info.value.path == "spec.provider.name"
    with pytest.raises(ResourceError) as info:
        parse({**CUSTOM_POLICY, "spec": {**CUSTOM_POLICY["spec"], "action": "ALLOW"}})  # type: ignore[dict-item]
    assert info.value.message == "spec.provider is only allowed with action CUSTOM"


# ---------------------------------------------------------------- evaluation order


def facts(path: str) -> RequestFacts:
    return RequestFacts("", "", "10.0.0.1", "GET", path, "httpbin", 8000, {})


def authorizer(*policies: AuthzPolicy) -> Authorizer:
    return Authorizer.build(
        InboundPolicy(namespace="foo", service="httpbin", revision=1, authorization=policies), {}
    )


HEADERS_ONLY = AuthzRule(operations=(Operation(paths=("/headers",)),))
CUSTOM = AuthzPolicy(
    name="ext-authz", namespace="foo", action="CUSTOM", provider="p", rules=(HEADERS_ONLY,)
)


def test_custom_marks_the_requests_it_matches_and_leaves_the_rest_to_deny_and_allow() -> None:
    deny = AuthzPolicy(name="deny", namespace="foo", action="DENY", rules=(HEADERS_ONLY,))
    only = authorizer(CUSTOM)
    assert only.decide(facts("/headers"))[5:] == ("p", "foo/ext-authz")
    assert only.decide(facts("/headers")).allowed
    assert only.decide(facts("/ip")).custom == ""
    # CUSTOM is no ALLOW policy: without ALLOW policies everything else is allowed
    assert only.decide(facts("/ip")).allowed
    both = authorizer(CUSTOM, deny).decide(facts("/headers"))
    assert both.custom == "p" and not both.allowed


def test_two_providers_for_one_workload_are_refused() -> None:
    other = AuthzPolicy(
        name="b", namespace="foo", action="CUSTOM", provider="q", rules=(AuthzRule(),)
    )
    with pytest.raises(ValueError, match="only one provider per workload"):
        authorizer(CUSTOM, other)


def test_custom_on_a_tcp_connection_denies_what_it_matches() -> None:
    anyone = AuthzPolicy(
        name="c", namespace="foo", action="CUSTOM", provider="p", rules=(AuthzRule(),)
    )
    decision = authorizer(anyone).decide_connection(ConnectionFacts("", "", "10.0.0.1", 9000))
    assert not decision.allowed and "cannot check a TCP connection" in decision.reason


# ---------------------------------------------------------------- HTTP service semantics

PROVIDER = ExtAuthzProvider(
    name="p",
    service="ext-authz.foo.svc.cluster.local",
    port=8000,
    path_prefix="/check",
    include_request_headers=("x-ext-authz",),
    headers_to_upstream_on_allow=("x-ext-authz-check-result",),
    headers_to_downstream_on_deny=("x-ext-authz-check-result",),
)


def test_check_request_sends_only_the_allowed_headers() -> None:
    sent = check_request(
        PROVIDER,
        "POST",
        "/headers?a=1",
        [("host", "httpbin"), ("authorization", "Bearer t"), ("x-ext-authz", "allow"),
         ("cookie", "secret"), ("content-length", "12")],
    )  # fmt: skip
    assert sent.method == "POST" and sent.path == "/check/headers?a=1"
    assert sent.headers == [
        ("host", "httpbin"),
        ("authorization", "Bearer t"),
        ("x-ext-authz", "allow"),
        ("content-length", "0"),
    ]


def test_check_request_carries_the_body_when_included() -> None:
    sent = check_request(PROVIDER, "POST", "/p", [("host", "h")], b"hello")
    assert sent.body == b"hello" and ("content-length", "5") in sent.headers
    cut = check_request(PROVIDER, "POST", "/p", [("host", "h")], b"he", partial_body=True)
    assert ("x-envoy-auth-partial-body", "true") in cut.headers


def test_answers() -> None:
    answer = [("x-ext-authz-check-result", "allowed"), ("x-other", "1")]
    allowed = check_result(PROVIDER, 200, answer, b"")
    assert allowed.allowed and allowed.upstream_headers == (
        ("x-ext-authz-check-result", "allowed"),
    )
    forged = [("x-ext-authz-check-result", "forged"), ("accept", "*/*")]
    assert with_upstream_headers(forged, allowed) == [
        ("accept", "*/*"),
        ("x-ext-authz-check-result", "allowed"),
    ]
    denied = check_result(
        PROVIDER, 403, [("x-ext-authz-check-result", "denied"), ("x-o", "1")], b"no"
    )
    assert (denied.allowed, denied.status, denied.body) == (False, 403, b"no")
    assert denied.downstream_headers == (("x-ext-authz-check-result", "denied"),)
    unlisted = ExtAuthzProvider(name="p", service="s", port=1)
    passed = check_result(unlisted, 401, [("content-length", "2"), ("www-authenticate", "x")], b"")
    assert passed.downstream_headers == (("www-authenticate", "x"),)
    assert check_failed(PROVIDER, "timeout") == (False, 403, b"", (), (), "timeout")
    open_provider = ExtAuthzProvider(name="p", service="s", port=1, fail_open=True)
    assert check_failed(open_provider, "timeout").allowed
    to_client = ExtAuthzProvider(
        name="p", service="s", port=1, headers_to_downstream_on_allow=("x-other",)
    )
    assert check_result(to_client, 200, answer, b"").downstream_headers == (("x-other", "1"),)
