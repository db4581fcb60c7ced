"""gRPC through the mesh: stock grpcio clients and servers behind real sidecars
(registry, config service, CA, mTLS between sidecars, HTTP/2 negotiated by ALPN).

The client reaches a service the way an app under its sidecar does: with the sidecar's
proxy setting (`http_proxy`, given here as the `grpc.http_proxy` channel option so the
test process's environment stays untouched), gRPC core sends `CONNECT
reviews.default:9080` to the outbound listener, which serves the tunnelled h2c
connection and routes every call like any other request. The server sidecars speak
h2c to their apps (`app_protocol="grpc"`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from proxy.app_process import app_env
from tests.grpc_support import EchoClient, EchoService
from tests.support import (
    MeshHarness,
    destination_rule_yaml,
    eventually,
    ingress_gateway_yaml,
    route_all_yaml,
)

pytestmark = pytest.mark.timeout(120)

HOST = "reviews"
TARGET = "dns:///reviews.default:9080"


class GrpcMesh:
    def __init__(self, mesh: MeshHarness, apps: dict[str, EchoService], client_sc: Any) -> None:
        self.mesh = mesh
        self.apps = apps
        self.client_sc = client_sc
        proxy = f"http://127.0.0.1:{client_sc.ports['outbound']}"
        self.client = EchoClient(TARGET, options=[("grpc.http_proxy", proxy)])

    async def unary(self, request: bytes, timeout: float = 10) -> tuple[bytes, Any]:
        return await asyncio.to_thread(self.client.unary.with_call, request, timeout=timeout)

    async def code_of(self, request: bytes, timeout: float = 10) -> grpc.StatusCode:
        try:
            await self.unary(request, timeout)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK


@pytest.fixture
async def grpc_mesh(nats_server, etcd_server, prefix) -> AsyncIterator[GrpcMesh]:
    apps = {v: EchoService(f"reviews-{v}").start() for v in ("v1", "v2")}
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        for version, app in apps.items():
            await mesh.sidecar(HOST, version, app=False, app_port=app.port, app_protocol="grpc")
        client_sc = await mesh.sidecar("productpage")
        world = GrpcMesh(mesh, apps, client_sc)
        try:
            yield world
        finally:
            world.client.close()
    for app in apps.values():
        app.stop()


async def test_every_call_kind_with_metadata_and_trailers(grpc_mesh: GrpcMesh) -> None:
    world = grpc_mesh
    reply, call = await asyncio.to_thread(
        world.client.unary.with_call, b"hello", metadata=(("x-user", "jason"),), timeout=10
    )
    served_by = dict(call.trailing_metadata())["x-served-by"]
    assert reply == f"{served_by}:hello".encode()
    app = world.apps[served_by.removeprefix("reviews-")]
    seen = app.seen_metadata[-1]
    assert seen["x-user"] == "jason"
    # the app sees the caller's identity proved by mTLS between the sidecars
    assert "spiffe://cluster.local/ns/default/sa/productpage" in seen["x-forwarded-client-cert"]

    streamed = await asyncio.to_thread(lambda: list(world.client.server_stream(b"20", timeout=10)))
    assert len(streamed) == 20 and streamed[-1].endswith(b":19")
    joined = await asyncio.to_thread(
        world.client.client_stream, iter([b"x" * 200_000, b"y", b"z"]), timeout=10
    )
    assert joined == b"x" * 200_000 + b",y,z"
    echoed = await asyncio.to_thread(
        lambda: [m.split(b":", 1)[1] for m in world.client.bidi(iter([b"a", b"b"]), timeout=10)]
    )
    assert echoed == [b"a", b"b"]


async def test_deadlines_route_timeouts_and_canary_subsets(grpc_mesh: GrpcMesh) -> None:
    world = grpc_mesh
    # the client's own deadline
    assert await world.code_of(b"sleep:2", timeout=0.5) == grpc.StatusCode.DEADLINE_EXCEEDED
    await world.mesh.apply(destination_rule_yaml(HOST))
    # every call to v2 (a canary promoted by subset)
    await world.mesh.apply(route_all_yaml(HOST, "v2"))

    async def all_on_v2() -> bool:
        served = [dict((await world.unary(b"c"))[1].trailing_metadata())["x-served-by"]
                  for _ in range(6)]  # fmt: skip
        return set(served) == {"reviews-v2"}

    await eventually(all_on_v2, timeout=15)
    # a 50/50 weight split by subset reaches both
    await world.mesh.apply(
        f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {HOST}}}
spec:
  hosts: [{HOST}]
  http:
  - timeout: 0.5s
    route:
    - {{destination: {{host: {HOST}, subset: v1}}, weight: 50}}
    - {{destination: {{host: {HOST}, subset: v2}}, weight: 50}}
"""
    )

    async def both() -> bool:
        served = {dict((await world.unary(b"w"))[1].trailing_metadata())["x-served-by"]
                  for _ in range(16)}  # fmt: skip
        return served == {"reviews-v1", "reviews-v2"}

    await eventually(both, timeout=15)
    # the route timeout ends the call with DEADLINE_EXCEEDED (a trailers-only local reply)
    assert await world.code_of(b"sleep:2", timeout=10) == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_retries_on_unavailable(grpc_mesh: GrpcMesh) -> None:
    world = grpc_mesh
    await world.mesh.apply(destination_rule_yaml(HOST))
    await world.mesh.apply(
        f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {HOST}}}
spec:
  hosts: [{HOST}]
  http:
  - route:
    - destination: {{host: {HOST}, subset: v1}}
    retries: {{attempts: 3, retryOn: unavailable}}
"""
    )
    v1 = world.apps["v1"]

    async def routed_to_v1() -> bool:
        # several in a row: one answer from v1 may predate the route (round robin)
        served = [dict((await world.unary(b"r"))[1].trailing_metadata())["x-served-by"]
                  for _ in range(6)]  # fmt: skip
        return set(served) == {"reviews-v1"}

    await eventually(routed_to_v1, timeout=15)
    v1.fail_first = 2
    reply, _ = await world.unary(b"retried")
    assert reply == b"reviews-v1:retried"
    assert v1.unavailable_sent == 2 and v1.fail_first == 0


async def test_authorization_deny_is_permission_denied_and_metrics_carry_grpc_status(
    grpc_mesh: GrpcMesh,
) -> None:
    world = grpc_mesh
    assert await world.code_of(b"before") == grpc.StatusCode.OK
    assert await world.code_of(b"unavailable") == grpc.StatusCode.UNAVAILABLE
    await world.mesh.apply(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-echo, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/mesh.test.Echo/*"]}
"""
    )

    async def denied() -> bool:
        return await world.code_of(b"x") == grpc.StatusCode.PERMISSION_DENIED

    await eventually(denied, timeout=15)
    calls_before = sum(app.calls for app in world.apps.values())
    assert await world.code_of(b"y") == grpc.StatusCode.PERMISSION_DENIED
    assert sum(app.calls for app in world.apps.values()) == calls_before

    # an HTTP/1.1 client of the same sidecar still works (to an HTTP/1.1 service,
    # over the HTTP/2 hop between sidecars)
    details = await world.mesh.sidecar("details")

    async def details_answers() -> bool:
        # an Envoy sidecar learns a new service from the registry a moment later
        async with aiohttp.ClientSession() as session:
            async with session.get(
                "http://details.default:9080/info",
                proxy=f"http://127.0.0.1:{world.client_sc.ports['outbound']}",
            ) as resp:
                return resp.status == 200 and (await resp.json())["service"] == "details"

    await eventually(details_answers, timeout=15)
    assert details.echo.requests == 1

    # istio_requests_total carries grpc_response_status (OK, UNAVAILABLE, PERMISSION_DENIED)
    async def statuses() -> set[str]:
        async with aiohttp.ClientSession() as session:
            admin = f"http://127.0.0.1:{world.client_sc.ports['admin']}/stats/prometheus"
            async with session.get(admin) as resp:
                text = await resp.text()
        found = set()
        for line in text.splitlines():
            if line.startswith("istio_requests_total{") and 'request_protocol="grpc"' in line:
                start = line.index('grpc_response_status="') + len('grpc_response_status="')
                found.add(line[start : line.index('"', start)])
        return found if {"0", "14", "7"} <= found else set()

    await eventually(statuses, timeout=10)


GRPC_GATEWAY = ingress_gateway_yaml(
    "grpc-gateway",
    "grpc-ingress",
    f"""\
  - route:
    - destination: {{host: {HOST}}}
""",
)


async def test_gateway_h1_to_h2_app_and_h2c_to_h1_app(grpc_mesh: GrpcMesh) -> None:
    from mesh.servers import free_port
    from proxy.http import Exchange, Limits, Request, serve
    from proxy.http.h2.client import H2UpstreamPool

    world = grpc_mesh
    # a gRPC client at the ingress gateway (h2c prior knowledge on its listener)
    gateway = await world.mesh.sidecar(
        "ingressgateway",
        "",
        app=False,
        gateway=True,
        gateway_port=free_port(),
        labels={"istio": "ingressgateway"},
    )
    await world.mesh.apply(GRPC_GATEWAY)
    at_gateway = EchoClient(f"127.0.0.1:{gateway.settings.gateway_port}")
    try:

        async def through_gateway() -> bool:
            try:
                reply = await asyncio.to_thread(at_gateway.unary, b"ingress", timeout=5)
            except grpc.RpcError:
                return False
            return reply.endswith(b":ingress")

        await eventually(through_gateway, timeout=15)
    finally:
        at_gateway.close()

    # an HTTP/1.1 client calling an app that speaks HTTP/2 only to its sidecar
    versions: list[str] = []

    async def h2_app(req: Request, ex: Exchange) -> None:
        versions.append(req.http_version)
        await ex.respond(200, [("content-type", "text/plain")], b"from h2 app")

    app_server = await serve(h2_app, "127.0.0.1", 0, limits=Limits())
    try:
        await world.mesh.sidecar(
            "modern", app=False, app_port=app_server.sockets[0].getsockname()[1],
            app_protocol="http2",
        )  # fmt: skip

        async def modern_answers() -> bool:
            async with aiohttp.ClientSession() as session:
                async with session.get(
                    "http://modern.default:8080/x",
                    proxy=f"http://127.0.0.1:{world.client_sc.ports['outbound']}",
                ) as resp:
                    return resp.status == 200 and await resp.read() == b"from h2 app"

        await eventually(modern_answers, timeout=15)
        assert versions == ["2"]
    finally:
        app_server.close()

    # and the reverse: an h2c client (prior knowledge) calling an HTTP/1.1 app
    legacy = await world.mesh.sidecar("legacy")
    pool = H2UpstreamPool("127.0.0.1", world.client_sc.ports["outbound"], limits=Limits())
    try:

        async def legacy_answers() -> bool:
            resp = await pool.request("GET", "/y", [("host", "legacy.default:8080")], b"")
            body = await resp.body.read_all(1 << 20)
            if resp.status != 200:  # an Envoy sidecar learns of `legacy` a moment later
                return False
            assert resp.http_version == "2"
            assert b'"service": "legacy"' in body or b'"service":"legacy"' in body
            return True

        await eventually(legacy_answers, timeout=15)
        assert legacy.echo.requests == 1
    finally:
        pool.close()


async def test_stock_client_with_only_the_sidecars_environment(grpc_mesh: GrpcMesh) -> None:
    """A grpcio app started with the environment the sidecar gives its app (HTTP_PROXY
    and friends, nothing else mesh-specific) reaches the service by name."""
    import os
    import sys

    sc = grpc_mesh.client_sc
    env = app_env(
        sc.settings,
        outbound=f"http://127.0.0.1:{sc.ports['outbound']}",
        admin=f"http://127.0.0.1:{sc.ports['admin']}",
    )
    assert "http_proxy" in env
    script = (
        "import grpc\n"
        "ch = grpc.insecure_channel('reviews.default:9080')\n"
        "call = ch.unary_unary('/mesh.test.Echo/Unary')\n"
        "print(call(b'from-app', timeout=10).decode())\n"
    )
    env = {**env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()[-2000:]
    assert out.decode().strip().endswith(":from-app")
