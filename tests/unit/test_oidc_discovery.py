"""OIDC discovery for RequestAuthentication rules with only an `issuer`: where the
keys are looked up (`JwtRule.key_uri`), what an OpenID configuration must hold, and
the Envoy translation before and after the agent discovered the `jwks_uri`."""

from __future__ import annotations

import json

import pytest

from mesh.compiled import JwtRule, RequestAuthn
from proxy.envoy.translate.jwt_authn import UNUSABLE_JWKS, discovery_uris, jwt_authn_filters
from proxy.jwks_fetch import jwks_uri_of
from proxy.policy.jwt import parse_jwks

ISSUER = "https://accounts.example.com/"
DISCOVERY = "https://accounts.example.com/.well-known/openid-configuration"


def test_key_uri_is_the_jwks_uri_or_the_issuers_openid_configuration() -> None:
    assert JwtRule(issuer=ISSUER).key_uri == DISCOVERY
    assert JwtRule(issuer=ISSUER, jwks_uri="https://k.example/j").key_uri == "https://k.example/j"
    assert JwtRule(issuer=ISSUER, jwks='{"keys": []}').key_uri == ""


def test_jwks_uri_of_an_openid_configuration() -> None:
    doc = {"issuer": ISSUER, "jwks_uri": "https://accounts.example.com/certs"}
    assert jwks_uri_of(json.dumps(doc).encode()) == "https://accounts.example.com/certs"


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (b"<html>", "not JSON"),
        (b"[]", "no jwks_uri"),
        (b'{"issuer": "x"}', "no jwks_uri"),
        (b'{"jwks_uri": "file:///etc/passwd"}', "not an http(s) URL"),
        (b" " * (256 * 1024 + 1), "larger than"),
    ],
)
def test_unusable_openid_configurations_say_why(document: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        jwks_uri_of(document)


def test_envoy_provider_waits_on_discovery_with_a_key_nobody_holds() -> None:
    authn = RequestAuthn(name="ra", namespace="foo", rules=(JwtRule(issuer=ISSUER),))
    assert discovery_uris([authn]) == {DISCOVERY}
    filters, clusters = jwt_authn_filters([authn], "/ca.pem")
    provider = filters[0]["typedConfig"]["providers"]["origins-0"]
    assert provider["localJwks"]["inlineString"] == UNUSABLE_JWKS
    assert len(parse_jwks(UNUSABLE_JWKS.encode())) == 1 and clusters == {}
    filters, clusters = jwt_authn_filters(
        [authn], "/ca.pem", {DISCOVERY: "https://accounts.example.com/certs"}
    )
    provider = filters[0]["typedConfig"]["providers"]["origins-0"]
    assert provider["remoteJwks"]["httpUri"]["uri"] == "https://accounts.example.com/certs"
    assert list(clusters) == ["jwks|accounts.example.com|443"]
