"""CUSTOM authorization with an HTTP ext_authz provider through real sidecars and the
ingress gateway: Istio's authz-custom task, with its sample ext-authz server
reimplemented here (allow when `x-ext-authz: allow`) as a mesh service, plus
timeout, failOpen and statusOnError.

Real nats-server, etcd, registry, config service, CA and sidecars (mTLS between them,
the check call too).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from mesh.servers import free_port
from tests.integration.test_mesh_security import RawReply, raw_http
from tests.support import MeshHarness, eventually, ingress_gateway_yaml

CHECK_RESULT = "x-ext-authz-check-result"


class SampleExtAuthz:
    """Istio's samples/extauthz HTTP server: 200 when the request carries
    `x-ext-authz: allow`, else 403 with its reason; `x-ext-authz-check-result`
    says which. `/slow...` paths answer after `delay_s` (to time out)."""

    def __init__(self) -> None:
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.checked: list[dict[str, str]] = []
        self.delay_s = 3.0

    async def start(self, port: int = 0) -> SampleExtAuthz:
        async def check(request: web.Request) -> web.Response:
            self.checked.append(
                {
                    "path": request.path_qs,
                    "body": (await request.read()).decode(),
                    **dict(request.headers),
                }
            )
            if request.path.startswith("/slow"):
                await asyncio.sleep(self.delay_s)
            if request.headers.get("x-ext-authz") == "allow":
                return web.Response(text="", headers={CHECK_RESULT: "allowed"})
            return web.Response(
                status=403,
                text="denied by ext_authz for not found header `x-ext-authz: allow` in the request",
                headers={CHECK_RESULT: "denied"},
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", check)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def mesh_config(**http: Any) -> str:
    settings = {
        "service": "ext-authz.default.svc.cluster.local",
        "port": "8000",
        "includeRequestHeadersInCheck": ["x-ext-authz"],
        "headersToUpstreamOnAllow": [CHECK_RESULT],
        "headersToDownstreamOnDeny": [CHECK_RESULT, "content-type"],
        "headersToDownstreamOnAllow": [CHECK_RESULT],
        **http,
    }
    return f"""
apiVersion: meshwork.io/v1
kind: MeshConfig
metadata: {{name: mesh, namespace: istio-system}}
spec:
  extensionProviders:
  - name: sample-ext-authz-http
    envoyExtAuthzHttp: {json.dumps(settings)}
"""


def custom_policy(selector: str, paths: str = '["/headers", "/slow*"]') -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext-authz, namespace: default}}
spec:
  selector: {{matchLabels: {selector}}}
  action: CUSTOM
  provider: {{name: sample-ext-authz-http}}
  rules:
  - to:
    - operation: {{paths: {paths}}}
"""


def get(authority: str, path: str, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return (
        f"GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n{extra}"
        "Connection: close\r\n\r\n"
    ).encode()


class Mesh:
    def __init__(self, harness: MeshHarness, client: Any, server: Any, authz: SampleExtAuthz):
        self.harness = harness
        self.client = client
        self.server = server
        self.authz = authz

    async def send(self, path: str, *headers: str) -> RawReply:
        reply = await raw_http(
            self.client.ports["outbound"], get("httpbin.default:8000", path, *headers), timeout=15
        )
        assert reply is not None
        return reply

    async def until(self, path: str, status: int, *headers: str) -> RawReply:
        async def check() -> RawReply | None:
            reply = await self.send(path, *headers)
            return reply if reply.status == status else None

        result: RawReply = await eventually(check, timeout=10)
        return result


@pytest.fixture
async def mesh(nats_server, etcd_server, prefix) -> AsyncIterator[Mesh]:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as harness:
        server = await harness.sidecar("httpbin")
        client = await harness.sidecar("sleep")
        authz_sidecar = await harness.sidecar("ext-authz")
        echo = authz_sidecar.echo
        await echo.stop()
        harness.apps.remove(echo)
        authz = await SampleExtAuthz().start(echo.port)
        try:
            yield Mesh(harness, client, server, authz)
        finally:
            await authz.stop()


async def test_authz_custom_task_allow_and_deny(mesh: Mesh) -> None:
    await mesh.harness.apply(mesh_config())
    await mesh.harness.apply(custom_policy("{app: httpbin}"))
    denied = await mesh.until("/headers", 403, "x-ext-authz: deny")
    assert denied.flags == "UAEX"
    assert denied.body.startswith(b"denied by ext_authz for not found header")
    assert denied.headers[CHECK_RESULT] == "denied"
    app = mesh.server.echo
    before = app.requests
    assert (await mesh.send("/headers")).status == 403
    assert app.requests == before
    allowed = await mesh.send("/headers?x=1", "x-ext-authz: allow", "cookie: secret")
    assert allowed.status == 200
    # headersToDownstreamOnAllow: the authorizer's header on the client's answer too
    assert allowed.headers[CHECK_RESULT] == "allowed"
    seen = json.loads(allowed.body)["headers"]
    # the authorizer's header reached the app (headersToUpstreamOnAllow)
    assert seen[CHECK_RESULT] == "allowed"
    # the check carried only the allowed headers, and the path with its query
    last = mesh.authz.checked[-1]
    assert last["path"] == "/headers?x=1" and last["x-ext-authz"] == "allow"
    assert "cookie" not in {k.lower() for k in last}
    # paths the CUSTOM policy does not match are not checked
    checks = len(mesh.authz.checked)
    assert (await mesh.send("/ip")).status == 200
    assert len(mesh.authz.checked) == checks


async def test_timeout_status_on_error_and_fail_open(mesh: Mesh) -> None:
    await mesh.harness.apply(mesh_config(timeout="300ms", statusOnError="503"))
    await mesh.harness.apply(custom_policy("{app: httpbin}"))
    await mesh.until("/headers", 403)
    reply = await mesh.send("/slow", "x-ext-authz: allow")
    assert reply.status == 503 and reply.flags == "UAEX"
    await mesh.harness.apply(mesh_config(timeout="300ms", failOpen=True))
    await mesh.until("/slow", 200, "x-ext-authz: deny")


async def test_include_request_body_in_check(mesh: Mesh) -> None:
    await mesh.harness.apply(mesh_config(includeRequestBodyInCheck={"maxRequestBytes": 16}))
    await mesh.harness.apply(custom_policy("{app: httpbin}"))
    await mesh.until("/headers", 403)

    async def post(body: bytes) -> RawReply:
        head = (
            "POST http://httpbin.default:8000/headers HTTP/1.1\r\nHost: httpbin.default:8000\r\n"
            f"x-ext-authz: allow\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        reply = await raw_http(mesh.client.ports["outbound"], head + body, timeout=15)
        assert reply is not None
        return reply

    async def body_checked() -> RawReply | None:
        reply = await post(b"hello authorizer")
        return reply if mesh.authz.checked[-1]["body"] == "hello authorizer" else None

    allowed: RawReply = await eventually(body_checked, timeout=10)
    assert allowed.status == 200
    # the authorizer saw the body and the app still got all of it
    assert json.loads(allowed.body)["body_len"] == len(b"hello authorizer")
    checks = len(mesh.authz.checked)
    too_large = await post(b"x" * 17)
    assert too_large.status == 413 and len(mesh.authz.checked) == checks


async def test_undefined_provider_denies_what_the_policy_matches(mesh: Mesh) -> None:
    await mesh.harness.apply(custom_policy("{app: httpbin}"))
    reply = await mesh.until("/headers", 403, "x-ext-authz: allow")
    assert b"is not defined" in reply.body
    assert (await mesh.send("/ip")).status == 200


async def test_custom_at_the_ingress_gateway(mesh: Mesh) -> None:
    gateway = await mesh.harness.sidecar(
        "ingressgateway",
        "",
        app=False,
        gateway=True,
        gateway_port=free_port(),
        labels={"istio": "ingressgateway"},
    )
    port = int(gateway.settings.gateway_port)
    await mesh.harness.apply(
        ingress_gateway_yaml(
            "httpbin-gateway",
            "httpbin",
            """\
  - route:
    - destination: {host: httpbin}
""",
        )
    )
    await mesh.harness.apply(mesh_config())
    await mesh.harness.apply(custom_policy("{istio: ingressgateway}", '["/*"]'))

    async def send(*headers: str) -> RawReply:
        reply = await raw_http(port, get("httpbin.example.com", "/headers", *headers))
        assert reply is not None
        return reply

    async def denied() -> bool:
        return (await send()).status == 403

    await eventually(denied, timeout=10)
    allowed = await send("x-ext-authz: allow")
    assert allowed.status == 200
    assert allowed.headers[CHECK_RESULT] == "allowed"  # headersToDownstreamOnAllow
    assert mesh.server.echo.seen_headers[-1][CHECK_RESULT] == "allowed"
