"""The Envoy data plane on RequestAuthentication and request principals: a real Envoy
run on the translation (`jwt_authn` + RBAC on the JWT payload) answers Istio's
authz-jwt flow as the Python sidecar does (tests/integration/
test_request_authentication.py): 401 for invalid or expired tokens, 403 without the
required principal or claim, 200 with them, the token not forwarded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.compiled import (
    AuthzPolicy,
    AuthzRule,
    Condition,
    InboundPolicy,
    JwtRule,
    RequestAuthn,
    Source,
)
from mesh.servers import free_port
from proxy.envoy.translate import MeshView, ProxyNode
from tests.envoy_support import HeadersApp, http_get, serve_http, static_envoy
from tests.integration.test_envoy_translate_validate import (
    httpbin_inbound_node,
    static_bootstrap,
)
from tests.jwt_support import ISSUER, SigningKey, jwks

KEY = SigningKey("RS256", "k1")


@pytest.fixture
def app_port() -> Iterator[int]:
    yield from serve_http(HeadersApp)


def _node_and_view(app_port: int, inbound_port: int) -> tuple[ProxyNode, MeshView]:
    policy = InboundPolicy(
        namespace="foo",
        service="httpbin",
        revision=1,
        request_authentication=(
            RequestAuthn(
                name="jwt-example",
                namespace="foo",
                rules=(
                    JwtRule(
                        issuer=ISSUER, jwks=jwks(KEY), output_payload_to_header="x-jwt-payload"
                    ),
                ),
            ),
        ),
        authorization=(
            AuthzPolicy(
                name="require-jwt",
                namespace="foo",
                rules=(
                    AuthzRule(
                        sources=(Source(request_principals=(f"{ISSUER}/{ISSUER}",)),),
                        when=(Condition(key="request.auth.claims[groups]", values=("group1",)),),
                    ),
                    # another subject, for a path of its own
                    AuthzRule(sources=(Source(request_principals=("*/other-user",)),)),
                ),
            ),
        ),
    )
    node = httpbin_inbound_node(inbound_port, app_port)
    return node, MeshView(destinations={}, inbound=policy)


def test_envoy_enforces_request_authentication_and_principals(
    app_port: int, tmp_path: Path
) -> None:
    inbound_port = free_port()
    node, view = _node_and_view(app_port, inbound_port)
    bootstrap = static_bootstrap(node, view, "jwt")

    def get(token: str | None) -> tuple[int, dict[str, str], bytes]:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return http_get(inbound_port, "/headers", "httpbin.foo:8000", headers)

    with static_envoy(tmp_path, "jwt", bootstrap, (inbound_port,)):
        status, headers, _ = get("deadbeef")
        assert status == 401
        assert headers["www-authenticate"] == (
            'Bearer realm="http://httpbin.foo:8000/headers", error="invalid_token"'
        )
        assert get(KEY.token(exp=1_000_000))[0] == 401
        assert get(SigningKey("RS256", "k1").token())[0] == 401  # forged
        assert get(None)[0] == 403  # no token: no principal
        assert get(KEY.token())[0] == 403  # the principal, without the group
        status, _, body = get(KEY.token({"groups": ["group2", "group1"]}))
        assert status == 200, body
        seen = json.loads(body)
        assert "authorization" not in seen and seen["x-jwt-payload"]
        assert get(KEY.token(sub="other-user"))[0] == 200
        assert get(KEY.token(sub="someone"))[0] == 403
