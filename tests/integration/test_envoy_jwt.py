"""The Envoy data plane on RequestAuthentication and request principals: a real Envoy
run on the translation (`jwt_authn` + RBAC on the JWT payload) answers Istio's
authz-jwt flow as the Python sidecar does (tests/integration/
test_request_authentication.py): 401 for invalid or expired tokens, 403 without the
required principal or claim, 200 with them, the token not forwarded."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh import identity
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
from tests.integration.test_envoy_translate_validate import (
    TD,
    _envoy,
    _listening,
    _request,
    static_bootstrap,
)
from tests.jwt_support import ISSUER, SigningKey, jwks
from tests.support import wait_for

KEY = SigningKey("RS256", "k1")


class _HeadersApp(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def app_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HeadersApp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


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
    node = ProxyNode(
        namespace="foo",
        service="httpbin",
        version="v1",
        labels={"app": "httpbin"},
        identity=identity.spiffe_id(TD, "foo", "httpbin"),
        trust_domain=TD,
        role="sidecar",
        inbound=("127.0.0.1", inbound_port),
        outbound=None,
        app_port=app_port,
    )
    return node, MeshView(destinations={}, inbound=policy)


def test_envoy_enforces_request_authentication_and_principals(
    app_port: int, tmp_path: Path
) -> None:
    envoy = _envoy()
    inbound_port = free_port()
    node, view = _node_and_view(app_port, inbound_port)
    config = tmp_path / "jwt.json"
    config.write_text(json.dumps(static_bootstrap(node, view, "jwt")))
    log = (tmp_path / "envoy.log").open("w")
    proc = subprocess.Popen(
        [envoy, "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def get(token: str | None) -> tuple[int, dict[str, str], bytes]:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return _request(inbound_port, "/headers", "httpbin.foo:8000", headers)

    try:
        wait_for(lambda: _listening(inbound_port), timeout=30)
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
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
