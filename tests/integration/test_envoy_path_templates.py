"""Path templates (`{*}`, `{**}`) in AuthorizationPolicy: a real Envoy (URI template
matcher, what Istio uses) decides each case of tests/unit/test_policy_authz_enduser.py
exactly as the Python authorizer does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.compiled import AuthzPolicy, AuthzRule, Condition, InboundPolicy, Operation
from mesh.servers import free_port
from proxy.envoy.translate import MeshView
from tests.envoy_support import HeadersApp, http_get, serve_http, static_envoy
from tests.integration.test_envoy_translate_validate import (
    httpbin_inbound_node,
    static_bootstrap,
)
from tests.unit.test_policy_authz_enduser import TEMPLATES


@pytest.fixture
def app_port() -> Iterator[int]:
    yield from serve_http(HeadersApp)


def test_envoy_matches_path_templates_like_python(app_port: int, tmp_path: Path) -> None:
    inbound_port = free_port()
    # one rule per case, told apart by a header
    rules = tuple(
        AuthzRule(
            operations=(Operation(paths=(template,)),),
            when=(Condition(key="request.headers[x-case]", values=(str(i),)),),
        )
        for i, (template, _, _) in enumerate(TEMPLATES)
    )
    policy = InboundPolicy(
        namespace="foo",
        service="httpbin",
        revision=1,
        authorization=(AuthzPolicy(name="templates", namespace="foo", rules=rules),),
    )
    node = httpbin_inbound_node(inbound_port, app_port)
    bootstrap = static_bootstrap(node, MeshView({}, inbound=policy), "tpl")
    with static_envoy(tmp_path, "templates", bootstrap, (inbound_port,)):
        got = []
        for i, (template, path, _) in enumerate(TEMPLATES):
            status, _, _ = http_get(inbound_port, path, "httpbin", {"x-case": str(i)})
            got.append((template, path, status == 200))
        assert got == TEMPLATES


def test_envoy_remote_ip_blocks_with_trusted_proxies(app_port: int, tmp_path: Path) -> None:
    """remoteIpBlocks past one trusted proxy: Envoy picks the client from
    X-Forwarded-For as `original_client` does."""
    from mesh.compiled import Source

    inbound_port = free_port()
    policy = InboundPolicy(
        namespace="foo",
        service="httpbin",
        revision=1,
        num_trusted_proxies=1,
        authorization=(
            AuthzPolicy(
                name="deny-remote",
                namespace="foo",
                action="DENY",
                rules=(AuthzRule(sources=(Source(remote_ip_blocks=("203.0.113.0/24",)),)),),
            ),
        ),
    )
    node = httpbin_inbound_node(inbound_port, app_port)
    bootstrap = static_bootstrap(node, MeshView({}, inbound=policy), "rip")
    with static_envoy(tmp_path, "remote", bootstrap, (inbound_port,)):
        cases = {
            "198.51.100.1, 203.0.113.9": 403,
            "203.0.113.9, 198.51.100.1": 200,
            "": 200,  # the peer, 127.0.0.1
        }
        for xff, expected in cases.items():
            headers = {"x-forwarded-for": xff} if xff else {}
            assert http_get(inbound_port, "/", "httpbin", headers)[0] == expected, xff
