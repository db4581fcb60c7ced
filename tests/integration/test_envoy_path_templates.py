"""Path templates (`{*}`, `{**}`) in AuthorizationPolicy: a real Envoy (URI template
matcher, what Istio uses) decides each case of tests/unit/test_policy_authz_enduser.py
exactly as the Python authorizer does."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import identity
from mesh.compiled import AuthzPolicy, AuthzRule, Condition, InboundPolicy, Operation
from mesh.servers import free_port
from proxy.envoy.translate import MeshView, ProxyNode
from tests.integration.test_envoy_ext_authz import _serve
from tests.integration.test_envoy_jwt import _HeadersApp
from tests.integration.test_envoy_translate_validate import (
    TD,
    _envoy,
    _listening,
    _request,
    static_bootstrap,
)
from tests.support import wait_for
from tests.unit.test_policy_authz_enduser import TEMPLATES


@pytest.fixture
def app_port() -> Iterator[int]:
    yield from _serve(_HeadersApp)


def test_envoy_matches_path_templates_like_python(app_port: int, tmp_path: Path) -> None:
    envoy = _envoy()
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
    config = tmp_path / "templates.json"
    config.write_text(json.dumps(static_bootstrap(node, MeshView({}, inbound=policy), "tpl")))
    log = (tmp_path / "envoy.log").open("w")
    proc = subprocess.Popen(
        [envoy, "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _listening(inbound_port), timeout=30)
        got = []
        for i, (template, path, _) in enumerate(TEMPLATES):
            status, _, _ = _request(inbound_port, path, "httpbin", {"x-case": str(i)})
            got.append((template, path, status == 200))
        assert got == TEMPLATES
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_envoy_remote_ip_blocks_with_trusted_proxies(app_port: int, tmp_path: Path) -> None:
    """remoteIpBlocks past one trusted proxy: Envoy picks the client from
    X-Forwarded-For as `original_client` does."""
    from mesh.compiled import Source

    envoy = _envoy()
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
    config = tmp_path / "remote.json"
    config.write_text(json.dumps(static_bootstrap(node, MeshView({}, inbound=policy), "rip")))
    log = (tmp_path / "envoy.log").open("w")
    proc = subprocess.Popen(
        [envoy, "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _listening(inbound_port), timeout=30)
        cases = {
            "198.51.100.1, 203.0.113.9": 403,
            "203.0.113.9, 198.51.100.1": 200,
            "": 200,  # the peer, 127.0.0.1
        }
        for xff, expected in cases.items():
            headers = {"x-forwarded-for": xff} if xff else {}
            assert _request(inbound_port, "/", "httpbin", headers)[0] == expected, xff
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
