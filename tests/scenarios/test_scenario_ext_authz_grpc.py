"""CUSTOM authorization with a gRPC ext_authz provider (`envoyExtAuthzGrpc`), on both
data planes: Istio's authz-custom task with its sample ext-authz gRPC server
reimplemented on a real grpcio server (allow when `x-ext-authz: allow`), plus
timeout, statusOnError, failOpen and includeRequestBodyInCheck.

Every sidecar, the authorizer's included, runs on the scenario's data plane; the
authorizer is a grpcio server behind its sidecar (`app_protocol="grpc"`, reached over
mTLS and HTTP/2 like any mesh gRPC service)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from tests.scenarios.helpers import Reply, Scenario
from tests.support import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHECK_RESULT = "x-ext-authz-check-result"
URL = "http://httpbin.default:8000"
SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
HTTPBIN = "spiffe://cluster.local/ns/default/sa/httpbin"


class SampleGrpcExtAuthz(external_auth_pb2_grpc.AuthorizationServicer):
    """Istio's samples/extauthz gRPC server: OK with `x-ext-authz-check-result:
    allowed` when the request carries `x-ext-authz: allow`, else PERMISSION_DENIED
    with a 403 DeniedHttpResponse. On allow it also removes `x-remove-me` from the
    request and adds `x-ext-authz-note: welcome` to the answer; paths under `/slow` answer after `delay_s` (to time out)."""

    def __init__(self) -> None:
        self.checked: list[external_auth_pb2.CheckRequest] = []
        self.delay_s = 1.0
        self._lock = threading.Lock()
        self.server: grpc.Server | None = None
        self.port = 0

    def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        with self._lock:
            self.checked.append(request)
        http = request.attributes.request.http
        if http.path.startswith("/slow"):
            time.sleep(self.delay_s)
        if http.headers.get("x-ext-authz") == "allow":
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=[_header(CHECK_RESULT, "allowed")],
                    headers_to_remove=["x-remove-me"],
                    response_headers_to_add=[_header("x-ext-authz-note", "welcome")],
                ),
            )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
                headers=[_header(CHECK_RESULT, "denied")],
                body="denied by ext_authz for not found header `x-ext-authz: allow` in the request",
            ),
        )

    def start(self) -> SampleGrpcExtAuthz:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None)


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value))


def mesh_config(**grpc_settings: Any) -> str:
    settings = {"service": "ext-authz.default.svc.cluster.local", "port": "9000", **grpc_settings}
    return f"""
apiVersion: meshwork.io/v1
kind: MeshConfig
metadata: {{name: mesh, namespace: istio-system}}
spec:
  extensionProviders:
  - name: sample-ext-authz-grpc
    envoyExtAuthzGrpc: {json.dumps(settings)}
"""


CUSTOM_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: default}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: CUSTOM
  provider: {name: sample-ext-authz-grpc}
  rules:
  - to:
    - operation: {paths: ["/headers", "/slow*", "/anything"]}
"""


@dataclass
class Env:
    s: Scenario
    httpbin: Any
    sleep: Any
    authz: SampleGrpcExtAuthz

    async def send(self, path: str, method: str = "GET", **headers: str) -> Reply:
        return await self.s.call(self.sleep, URL + path, method=method, headers=headers)

    async def until(self, path: str, status: int, **headers: str) -> Reply:
        return await self.s.until(
            self.sleep, URL + path, lambda r: r.status == status, headers=headers
        )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(scenario: Scenario) -> AsyncIterator[Env]:
    authz = SampleGrpcExtAuthz().start()
    try:
        await scenario.sidecar("ext-authz", app=False, app_port=authz.port, app_protocol="grpc")
        httpbin = await scenario.sidecar("httpbin")
        sleep = await scenario.sidecar("sleep")
        await scenario.apply(mesh_config())
        await scenario.apply(CUSTOM_POLICY)
        yield Env(scenario, httpbin, sleep, authz)
    finally:
        authz.stop()


async def test_grpc_authorizer_allows_and_denies(env: Env) -> None:
    # the authorizer's own denial, not the 403 of a check that could not reach it yet
    # (the provider's cluster arrives with the policy, an instant after it)
    denied = await env.s.until(
        env.sleep,
        URL + "/headers",
        lambda r: r.status == 403 and CHECK_RESULT in r.headers,
        headers={"x-ext-authz": "deny"},
    )
    assert denied.body.startswith(b"denied by ext_authz for not found header")
    assert denied.headers[CHECK_RESULT] == "denied"
    app = env.httpbin.echo
    before = app.requests
    assert (await env.send("/headers")).status == 403
    assert app.requests == before
    allowed = await env.send(
        "/headers?x=1", **{"x-ext-authz": "allow", "x-remove-me": "1", "x-kept": "2"}
    )
    assert allowed.status == 200
    # OkHttpResponse.response_headers_to_add: on the answer the client gets
    assert allowed.headers["x-ext-authz-note"] == "welcome"
    seen = {k.lower(): v for k, v in app.seen_headers[-1].items()}
    # OkHttpResponse: its header set on the upstream request, the removed one gone
    assert seen[CHECK_RESULT] == "allowed"
    assert "x-remove-me" not in seen and seen["x-kept"] == "2"
    check = env.authz.checked[-1].attributes
    assert check.request.http.path == "/headers?x=1"
    assert check.request.http.method == "GET"
    assert check.request.http.headers["x-ext-authz"] == "allow"
    assert check.source.principal == SLEEP
    assert check.destination.principal == HTTPBIN
    # paths the CUSTOM policy does not match are not checked
    checks = len(env.authz.checked)
    assert (await env.send("/ip")).status == 200
    assert len(env.authz.checked) == checks


async def test_grpc_timeout_status_on_error_and_fail_open(env: Env) -> None:
    try:
        await env.s.apply(mesh_config(timeout="300ms", statusOnError="503"))
        await env.until("/slow", 503, **{"x-ext-authz": "allow"})
        await env.s.apply(mesh_config(timeout="300ms", failOpen=True))
        await env.until("/slow", 200, **{"x-ext-authz": "deny"})
    finally:
        await env.s.apply(mesh_config())
    await env.until("/slow", 403)


async def test_grpc_check_includes_the_request_body(env: Env) -> None:
    try:
        await env.s.apply(mesh_config(includeRequestBodyInCheck={"maxRequestBytes": 64}))

        async def body_sent() -> Reply | None:
            reply = await env.s.call(
                env.sleep,
                URL + "/anything",
                method="POST",
                headers={"x-ext-authz": "allow"},
                body=b"hello authorizer",
            )
            last = env.authz.checked[-1].attributes.request.http
            return reply if last.body == "hello authorizer" else None

        reply = await eventually(body_sent, timeout=20, interval=0.2)
        assert reply.status == 200
        # the body still reached the app, whole
        assert reply.json()["body_len"] == len(b"hello authorizer")
        too_large = await env.s.call(
            env.sleep,
            URL + "/anything",
            method="POST",
            headers={"x-ext-authz": "allow"},
            body=b"x" * 100,
        )
        assert too_large.status == 413
    finally:
        await env.s.apply(mesh_config())
