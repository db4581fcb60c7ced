"""The Envoy data plane on CUSTOM authorization: a real Envoy run on the translation
(shadow RBAC marking the CUSTOM rules, ext_authz through the provider's mesh
cluster) answers Istio's authz-custom flow as the Python sidecar does
(tests/integration/test_ext_authz.py): the sample authorizer's denial and headers,
its allowed header upstream, unmatched paths unchecked, statusOnError on timeout."""

from __future__ import annotations

import http.server
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.compiled import (
    AuthzPolicy,
    AuthzRule,
    ExtAuthzProvider,
    InboundPolicy,
    Operation,
)
from mesh.messages import Endpoint, EndpointSet
from mesh.servers import free_port
from proxy.envoy.translate import MeshView, ProxyNode, referenced_hosts
from tests.envoy_support import HeadersApp, http_get, serve_http, static_envoy
from tests.integration.test_envoy_translate_validate import (
    httpbin_inbound_node,
    static_bootstrap,
)

CHECK_RESULT = "x-ext-authz-check-result"
AUTHZ_HOST = "ext-authz.foo.svc.cluster.local"


class _SampleExtAuthz(http.server.BaseHTTPRequestHandler):
    """Istio's sample ext-authz: allow with `x-ext-authz: allow`; /slow waits 2 s."""

    def do_GET(self) -> None:
        if self.path.startswith("/slow"):
            time.sleep(2)
        if self.headers.get("x-ext-authz") == "allow":
            self.send_response(200)
            self.send_header(CHECK_RESULT, "allowed")
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body = b"denied by ext_authz for not found header `x-ext-authz: allow` in the request"
        self.send_response(403)
        self.send_header(CHECK_RESULT, "denied")
        self.send_header("x-not-for-client", "1")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def app_port() -> Iterator[int]:
    yield from serve_http(HeadersApp)


@pytest.fixture
def authz_port() -> Iterator[int]:
    yield from serve_http(_SampleExtAuthz)


def _node_and_view(app_port: int, inbound_port: int, authz_port: int) -> tuple[ProxyNode, MeshView]:
    provider = ExtAuthzProvider(
        name="sample-ext-authz-http",
        service=AUTHZ_HOST,
        port=8000,
        timeout_ms=500,
        status_on_error=503,
        include_request_headers=("x-ext-authz",),
        headers_to_upstream_on_allow=(CHECK_RESULT,),
        headers_to_downstream_on_deny=(CHECK_RESULT, "content-type"),
        headers_to_downstream_on_allow=(CHECK_RESULT,),
    )
    policy = InboundPolicy(
        namespace="foo",
        service="httpbin",
        revision=1,
        authorization=(
            AuthzPolicy(
                name="ext-authz",
                namespace="foo",
                action="CUSTOM",
                provider=provider.name,
                rules=(AuthzRule(operations=(Operation(paths=("/headers", "/slow*")),)),),
            ),
        ),
        extension_providers=(provider,),
    )
    node = httpbin_inbound_node(inbound_port, app_port)
    # the authorizer registered no identity: reached in plaintext
    authz = EndpointSet(
        namespace="foo",
        service="ext-authz",
        revision=1,
        endpoints=[Endpoint(instance="ext-authz-1", address=f"127.0.0.1:{authz_port}")],
    )
    view = MeshView(destinations={AUTHZ_HOST: (None, authz)}, inbound=policy)
    assert AUTHZ_HOST in referenced_hosts(node, view)
    return node, view


def test_envoy_asks_the_ext_authz_provider_for_custom_rules(
    app_port: int, authz_port: int, tmp_path: Path
) -> None:
    inbound_port = free_port()
    node, view = _node_and_view(app_port, inbound_port, authz_port)
    bootstrap = static_bootstrap(node, view, "ext-authz")

    def get(path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        return http_get(inbound_port, path, "httpbin.foo:8000", headers)

    with static_envoy(tmp_path, "ext_authz", bootstrap, (inbound_port,)):
        status, headers, body = get("/headers", **{"x-ext-authz": "deny"})
        assert status == 403
        assert body.startswith(b"denied by ext_authz for not found header")
        assert headers[CHECK_RESULT] == "denied" and "x-not-for-client" not in headers
        status, allowed_headers, body = get(
            "/headers", **{"x-ext-authz": "allow", CHECK_RESULT: "forged"}
        )
        assert status == 200, body
        # headersToDownstreamOnAllow (allowed_client_headers_on_success)
        assert allowed_headers[CHECK_RESULT] == "allowed"
        assert json.loads(body)[CHECK_RESULT] == "allowed"
        assert get("/ip")[0] == 200  # not matched by the CUSTOM policy: not checked
        assert get("/slow", **{"x-ext-authz": "allow"})[0] == 503  # timeout: statusOnError
