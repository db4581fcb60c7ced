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
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
import yaml

from meshctl.telemetry_cmds import grpc_cell
from proxy.app_process import app_env
from services.telemetry import TelemetryService
from tests.grpc_support import EchoClient, EchoService, http1_unary
from tests.integration.test_telemetry import meshctl
from tests.support import (
    MeshHarness,
    destination_rule_yaml,
    eventually,
    ingress_gateway_yaml,
    route_all_yaml,
    running,
    service_config,
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


async def test_many_calls_in_flight_on_one_channel_all_succeed(grpc_mesh: GrpcMesh) -> None:
    """32 calls in flight on one channel, 20 rounds, as a loaded gRPC client makes them:
    grpcio opens each new stream's window before any answer, which the listeners'
    WINDOW_UPDATE flood guard must count as Envoy does (it cut such clients with
    ENHANCE_YOUR_CALM; the bench's gRPC leg saw every call fail)."""

    def rounds() -> list[grpc.StatusCode]:
        codes = []
        for _ in range(20):
            futures = [grpc_mesh.client.unary.future(b"x" * 100, timeout=10) for _ in range(32)]
            for future in futures:
                codes.append(future.code())
        return codes

    codes = await asyncio.to_thread(rounds)
    assert codes == [grpc.StatusCode.OK] * 640


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


async def test_fault_abort_with_a_grpc_status(grpc_mesh: GrpcMesh) -> None:
    """`fault.abort.grpcStatus`: a gRPC call gets a trailers-only reply with that
    status and never reaches the app; a plain HTTP request on the same rule gets the
    HTTP 200 Envoy's fault filter answers."""
    world = grpc_mesh
    await world.mesh.apply(
        f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {HOST}}}
spec:
  hosts: [{HOST}]
  http:
  - match: [{{headers: {{x-user: {{exact: jason}}}}}}]
    fault: {{abort: {{grpcStatus: RESOURCE_EXHAUSTED, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: {HOST}}}}}]
  - route: [{{destination: {{host: {HOST}}}}}]
"""
    )

    async def jason_code() -> grpc.StatusCode:
        try:
            await asyncio.to_thread(
                world.client.unary.with_call, b"j", metadata=(("x-user", "jason"),), timeout=10
            )
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    async def aborted() -> bool:
        return await jason_code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    await eventually(aborted, timeout=15)
    calls_before = sum(app.calls for app in world.apps.values())
    assert await jason_code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sum(app.calls for app in world.apps.values()) == calls_before
    # the rule's match scopes the fault
    assert await world.code_of(b"other user") == grpc.StatusCode.OK

    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"http://{HOST}.default:9080/plain",
            headers={"x-user": "jason"},
            proxy=f"http://127.0.0.1:{world.client_sc.ports['outbound']}",
        ) as resp:
            assert resp.status == 200
            assert resp.headers["x-mesh-response-flags"] == "FI"
            assert await resp.text() == "fault filter abort\n"

    # counted as gRPC with the injected status and the flag FI
    async def counted() -> bool:
        async with aiohttp.ClientSession() as session:
            admin = f"http://127.0.0.1:{world.client_sc.ports['admin']}/stats/prometheus"
            async with session.get(admin) as resp:
                text = await resp.text()
        return any(
            line.startswith("istio_requests_total{")
            and 'request_protocol="grpc"' in line
            and 'grpc_response_status="8"' in line
            and 'response_flags="FI"' in line
            for line in text.splitlines()
        )

    await eventually(counted, timeout=10)


async def test_meshctl_top_and_stat_show_grpc_statuses(
    grpc_mesh: GrpcMesh, nats_server, etcd_server, prefix, capsys
) -> None:
    """gRPC calls through the sidecars reach the telemetry service, whose edges carry
    the calls by gRPC status; `meshctl top` shows them as a GRPC column and in `-o
    json|yaml`."""
    world = grpc_mesh
    async with running(
        TelemetryService(service_config(nats_server.url, etcd_server.url, prefix))
    ) as telemetry:
        base = f"http://127.0.0.1:{telemetry.http_port}"
        for _ in range(3):
            assert await world.code_of(b"fine") == grpc.StatusCode.OK
        assert await world.code_of(b"unavailable") == grpc.StatusCode.UNAVAILABLE

        def statuses_from_productpage(edges: list[dict[str, Any]]) -> dict[str, int]:
            """Summed over its edges to reviews-v1 and reviews-v2 (round robin)."""
            total: dict[str, int] = {}
            for edge in edges:
                if edge["source"].startswith("productpage"):
                    for name, n in edge["grpc_statuses"].items():
                        total[name] = total.get(name, 0) + n
            return total

        async def counted() -> list[dict[str, Any]] | None:
            out = await meshctl(
                capsys, "stat", "--window", "600", "-o", "json", "--telemetry", base
            )
            edges: list[dict[str, Any]] = json.loads(out)
            return (
                edges if statuses_from_productpage(edges) == {"OK": 3, "UNAVAILABLE": 1} else None
            )

        edges = await eventually(counted, timeout=20, interval=0.5)
        assert {e["destination_service"] for e in edges} == {"reviews.default.svc.cluster.local"}

        out = await meshctl(
            capsys, "top", "--count", "1", "--window", "600", "-o", "yaml", "--telemetry", base
        )
        (refresh,) = yaml.safe_load_all(out)
        assert statuses_from_productpage(refresh["edges"]) == {"OK": 3, "UNAVAILABLE": 1}
        out = await meshctl(capsys, "top", "--count", "1", "--window", "600", "--telemetry", base)
        header, *rows = out.splitlines()[1:]
        assert header.split()[-1] == "GRPC"
        cells = {row.split(None, 7)[-1] for row in rows if row.startswith("productpage")}
        expected = {grpc_cell(e["grpc_statuses"]) for e in refresh["edges"]}
        assert cells == expected and any("UNAVAILABLE" in cell for cell in cells)


async def test_http1_client_gets_grpc_trailers_when_it_sends_te_trailers(
    grpc_mesh: GrpcMesh,
) -> None:
    """An HTTP/1.1 client calling the gRPC service through its sidecar (outbound,
    HTTP/2 over mTLS, inbound, h2c to the app): with `TE: trailers` the app's
    trailers end the chunked response; without, the body ends bare."""
    world = grpc_mesh
    port = world.client_sc.ports["outbound"]
    target = f"http://{HOST}.default:9080/mesh.test.Echo/Unary"
    head, body, trailers = await http1_unary(port, target, b"h1", te_trailers=True)
    assert head.startswith(b"HTTP/1.1 200")
    served_by = dict(trailers)["x-served-by"]
    assert body[5:] == f"{served_by}:h1".encode()
    assert ("grpc-status", "0") in trailers
    _, body, trailers = await http1_unary(port, target, b"bare", te_trailers=False)
    assert body.endswith(b":bare") and trailers == []


async def test_connection_pool_limits_on_the_http2_pool(grpc_mesh: GrpcMesh) -> None:
    """gRPC calls take the HTTP/2 pool between sidecars; its DestinationRule limits
    hold there as on HTTP/1.1: one connection carrying one stream at a time
    (`maxConcurrentStreams: 1`), one call pending, the rest answered at once with
    503 `UO` (a trailers-only UNAVAILABLE), never reaching the app."""
    world = grpc_mesh
    await world.mesh.apply(
        f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {HOST}}}
spec:
  host: {HOST}
  trafficPolicy:
    connectionPool:
      tcp: {{maxConnections: 1}}
      http: {{http1MaxPendingRequests: 1, maxConcurrentStreams: 1}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
"""
    )
    await world.mesh.apply(route_all_yaml(HOST, "v1"))
    v1 = world.apps["v1"]

    async def on_v1() -> bool:
        # subset v1 exists only through the DestinationRule: its limits are in force
        _, call = await world.unary(b"probe")
        return dict(call.trailing_metadata())["x-served-by"] == "reviews-v1"

    await eventually(on_v1, timeout=15)
    calls_before = v1.calls

    async def held_call() -> tuple[grpc.StatusCode, dict[str, str]]:
        try:
            _, call = await world.unary(b"hold", timeout=60)
            return grpc.StatusCode.OK, dict(call.trailing_metadata())
        except grpc.RpcError as error:
            return error.code(), dict(error.trailing_metadata() or ())

    calls = [asyncio.ensure_future(held_call()) for _ in range(4)]
    try:
        # two overflow at once, while one call is held by the app and one is pending
        async def two_overflowed() -> bool:
            return sum(c.done() for c in calls) == 2 and v1.holding == 1

        await eventually(two_overflowed, timeout=20)
        for overflowed in [c.result() for c in calls if c.done()]:
            assert overflowed[0] == grpc.StatusCode.UNAVAILABLE
            assert overflowed[1]["x-mesh-response-flags"] == "UO"
    finally:
        v1.release.set()
    results = await asyncio.gather(*calls)
    assert [code for code, _ in results].count(grpc.StatusCode.OK) == 2
    assert v1.calls - calls_before == 2
