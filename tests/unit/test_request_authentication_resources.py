"""RequestAuthentication and the end-user fields of AuthorizationPolicy as resources:
parsed, refused with their field path, compiled into the inbound policy."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.hosts import ServiceRef
from mesh.resources import ResourceError, parse_resource
from services.config.compile_security import compile_inbound_policy
from tests.jwt_support import SigningKey, jwks

JWKS = jwks(SigningKey("ES256", "e1"))


def ra(namespace: str = "foo", name: str = "jwt", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def jwt_rule(**fields: Any) -> dict[str, Any]:
    fields.setdefault("issuer", "testing@secure.istio.io")
    if "jwks" not in fields and "jwksUri" not in fields:
        fields["jwksUri"] = "https://keys.example.com/jwks.json"
    return fields


def rejection(body: dict[str, Any]) -> ResourceError:
    with pytest.raises(ResourceError) as info:
        parse_resource(body, source="t.yaml", index=0)
    return info.value


def test_istio_task_resource_parses_and_compiles() -> None:
    body = ra(
        selector={"matchLabels": {"app": "httpbin"}},
        jwtRules=[
            jwt_rule(
                audiences=["a"],
                fromHeaders=[{"name": "X-Jwt", "prefix": "Tok "}],
                fromParams=["my_token"],
                fromCookies=["session"],
                outputPayloadToHeader="X-Jwt-Payload",
                outputClaimToHeaders=[{"header": "X-Sub", "claim": "sub"}],
                forwardOriginalToken=True,
                timeout="2s",
            ),
            jwt_rule(issuer="other", jwks=JWKS),
        ],
    )
    resource = parse_resource(body, source="t.yaml", index=0)
    policy = compile_inbound_policy([resource], ServiceRef("foo", "httpbin"), 7, "istio-system")
    (authn,) = policy.request_authentication
    assert (authn.namespace, authn.name, authn.selector) == ("foo", "jwt", {"app": "httpbin"})
    first, second = authn.rules
    assert first.from_headers[0].name == "x-jwt" and first.from_headers[0].prefix == "Tok "
    assert first.output_payload_to_header == "x-jwt-payload"
    assert first.output_claim_to_headers[0].header == "x-sub"
    assert first.timeout_ms == 2000 and first.forward_original_token
    assert second.jwks == JWKS and second.timeout_ms == 5000


def test_which_namespaces_apply() -> None:
    resources = [
        parse_resource(ra("istio-system", "mesh", jwtRules=[jwt_rule()]), source="t", index=0),
        parse_resource(
            ra("istio-system", "gw", selector={"matchLabels": {"istio": "ingressgateway"}},
               jwtRules=[jwt_rule()]),
            source="t", index=1,
        ),
        parse_resource(ra("bar", "other", jwtRules=[jwt_rule()]), source="t", index=2),
        parse_resource(ra("foo", "own", jwtRules=[jwt_rule()]), source="t", index=3),
    ]  # fmt: skip
    names = lambda ns, svc: [  # noqa: E731
        p.name
        for p in compile_inbound_policy(
            resources, ServiceRef(ns, svc), 1, "istio-system"
        ).request_authentication
    ]
    assert names("foo", "httpbin") == ["own", "mesh"]
    assert names("istio-system", "ingressgateway") == ["gw", "mesh"]


REFUSED = [
    (ra(jwtRules=[{"jwksUri": "https://k.example/j"}]), "spec.jwtRules[0].issuer",
     "spec.jwtRules[0].issuer is required"),
    (ra(jwtRules=[jwt_rule(jwksUri="ftp://k.example/j")]), "spec.jwtRules[0].jwksUri",
     "must be an https:// (or http://) URL with a host, got 'ftp://k.example/j'"),
    (ra(jwtRules=[{"issuer": "i"}]), "spec.jwtRules[0].issuer",
     "must be an https:// (or http://) URL with a host when neither spec.jwtRules[0].jwks "
     "nor spec.jwtRules[0].jwksUri is set (the keys are discovered from the issuer's "
     "OpenID configuration), got 'i'"),
    (ra(jwtRules=[jwt_rule(jwks=JWKS, jwksUri="https://k.example/j")]), "spec.jwtRules[0]",
     "set only one of spec.jwtRules[0].jwks or spec.jwtRules[0].jwksUri"),
    (ra(jwtRules=[{"issuer": "i", "jwks": "{"}]), "spec.jwtRules[0].jwks", None),
    (ra(jwtRules=[{"issuer": "i", "jwks": '{"keys": []}'}]), "spec.jwtRules[0].jwks",
     "must be a JSON Web Key Set: an object with a non-empty 'keys' list"),
    (ra(jwtRules=[jwt_rule(fromHeaders=[{"prefix": "Bearer "}])]),
     "spec.jwtRules[0].fromHeaders[0].name", "spec.jwtRules[0].fromHeaders[0].name is required"),
    (ra(jwtRules=[jwt_rule(fromHeaders=[{"name": "bad header"}])]),
     "spec.jwtRules[0].fromHeaders[0].name", "must be a valid HTTP header name, got 'bad header'"),
    (ra(jwtRules=[jwt_rule(fromCookies=["a;b"])]), "spec.jwtRules[0].fromCookies[0]",
     "must be a cookie name (an RFC 6265 token), got 'a;b'"),
    (ra(jwtRules=[jwt_rule(outputClaimToHeaders=[{"header": "x-a"}])]),
     "spec.jwtRules[0].outputClaimToHeaders[0].claim",
     "spec.jwtRules[0].outputClaimToHeaders[0].claim is required"),
    (ra(jwtRules=[jwt_rule(timeout="0s")]), "spec.jwtRules[0].timeout", "must be positive, got '0s'"),
    (ra(targetRef={"kind": "Gateway", "name": "g"}), "spec.targetRef.kind",
     'a policy can target a Service (group "") or a Gateway (group gateway.networking.k8s.io), '
     "got kind 'Gateway' in group ''"),
    (ra(jwtRules=[jwt_rule(jwksRefresh="1m")]), "spec.jwtRules[0].jwksRefresh",
     "spec.jwtRules[0].jwksRefresh is not supported"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "path", "message"), REFUSED)
def test_refused_with_path(body: dict[str, Any], path: str, message: str | None) -> None:
    error = rejection(body)
    assert error.path == path
    if message is not None:
        assert error.message == message


def ap(**source: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "require-jwt", "namespace": "foo"},
        "spec": {
            "selector": {"matchLabels": {"app": "httpbin"}},
            "rules": [
                {
                    "from": [{"source": source}],
                    "when": [{"key": "request.auth.claims[groups]", "values": ["group1"]}],
                }
            ],
        },
    }


def test_request_principals_and_claims_compile() -> None:
    resource = parse_resource(
        ap(requestPrincipals=["testing@secure.istio.io/*"], notRequestPrincipals=["*/bad"]),
        source="t",
        index=0,
    )
    policy = compile_inbound_policy([resource], ServiceRef("foo", "httpbin"), 1, "istio-system")
    (rule,) = policy.authorization[0].rules
    assert rule.sources[0].request_principals == ("testing@secure.istio.io/*",)
    assert rule.sources[0].not_request_principals == ("*/bad",)
    assert rule.when[0].key == "request.auth.claims[groups]"


def test_request_principal_patterns_are_checked() -> None:
    error = rejection(ap(requestPrincipals=["a*b"]))
    assert error.path == "spec.rules[0].from[0].source.requestPrincipals[0]"
