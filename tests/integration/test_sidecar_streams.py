"""Long-lived and abandoned exchanges through real sidecars (mTLS between them), with
real NATS, etcd, registry, config and CA services: WebSocket upgrades on every listener,
clients that leave before their answer, and upstreams that answer outside HTTP.

Assertions are about what the apps and the clients saw and what telemetry recorded;
waits are bounded by `eventually`, never compared with thresholds.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from mesh.servers import free_port
from tests.support import MeshHarness, applied, eventually, ingress_gateway_yaml, replace_app

pytestmark = pytest.mark.timeout(120)

LOCAL = "127.0.0.1"


@pytest.fixture
async def mesh(nats_server, etcd_server, prefix):
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as h:
        yield h


def outbound(sc: Any) -> str:
    return f"http://{LOCAL}:{sc.ports['outbound']}"


async def metrics_of(sc: Any) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{LOCAL}:{sc.ports['admin']}/stats/prometheus") as r,
    ):
        return await r.text()


def series_total(metrics: str, name: str, **labels: str) -> float:
    """The sum of the `name` series carrying `labels`."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------- WebSocket


class WebSocketEchoApp:
    """aiohttp app: `/ws...` upgrades WebSocket requests and greets with what the upgrade
    request looked like (path, Host, a routed header), then echoes text and binary
    messages; any other path answers a plain 200 (so a dropped upgrade shows)."""

    def __init__(self) -> None:
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.upgrades = 0
        self.closed = 0

    async def start(self, port: int = 0) -> WebSocketEchoApp:
        async def handle(request: web.Request) -> web.StreamResponse:
            upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
            if not (upgrade and request.path.startswith("/ws")):
                return web.json_response({"path": request.path, "upgraded": False})
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            self.upgrades += 1
            await ws.send_json(
                {
                    "path": request.path_qs,
                    "host": request.host,
                    "x-routed": request.headers.get("x-routed", ""),
                }
            )
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str("echo:" + msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data[::-1])
            self.closed += 1
            return ws

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, LOCAL, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def chat(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The greeting, then several messages both ways, in order."""
    greeting = await ws.receive_json(timeout=10)
    for i in range(5):
        await ws.send_str(f"m{i}")
        assert await ws.receive_str(timeout=10) == f"echo:m{i}"
    payload = bytes(range(256)) * 400  # 100 KiB: several TLS records, several reads
    await ws.send_bytes(payload)
    assert await ws.receive_bytes(timeout=10) == payload[::-1]
    return dict(greeting)


CHAT_ROUTES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: chat}
spec:
  hosts: [chat]
  http:
  - match:
    - uri: {prefix: /live}
    rewrite: {uri: /ws/live}
    headers:
      request:
        set: {x-routed: outbound-rule}
    route:
    - destination: {host: chat}
  - route:
    - destination: {host: chat}
"""

DENY_ADMIN_WS = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: chat-deny-admin, namespace: default}
spec:
  selector: {matchLabels: {app: chat}}
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/ws/admin"]}
"""

GATEWAY = ingress_gateway_yaml(
    "edge",
    "edge-chat",
    """\
  - match:
    - uri: {prefix: /chat}
    rewrite: {uri: /ws/gateway}
    headers:
      request:
        set: {x-routed: gateway-rule}
    route:
    - destination: {host: chat}
""",
)


async def test_websocket_upgrade_through_outbound_mtls_and_inbound(mesh: MeshHarness) -> None:
    server = await mesh.sidecar("chat", labels={"app": "chat"})
    app = await replace_app(mesh, server, WebSocketEchoApp())
    client = await mesh.sidecar("web", app=False)
    async with aiohttp.ClientSession() as session:

        async def reachable() -> bool:
            async with session.get("http://chat/plain", proxy=outbound(client)) as r:
                return r.status == 200

        await eventually(reachable, timeout=10)  # the client's proxy follows chat now
        await applied(mesh, CHAT_ROUTES, client)
        # client -> outbound sidecar -> mTLS -> inbound sidecar -> app, and back
        async with session.ws_connect("http://chat/ws/direct", proxy=outbound(client)) as ws:
            greeting = await chat(ws)
        assert greeting == {"path": "/ws/direct", "host": "chat", "x-routed": ""}
        # the route's rewrite and header operations apply to the upgrade request
        async with session.ws_connect("http://chat/live?room=1", proxy=outbound(client)) as ws:
            greeting = await chat(ws)
        assert greeting == {"path": "/ws/live?room=1", "host": "chat", "x-routed": "outbound-rule"}
        await eventually(lambda: app.closed == 2)  # the client's close reached the app

        # authorization applies to the upgrade request on the inbound side
        await applied(mesh, DENY_ADMIN_WS, server)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect("http://chat/ws/admin", proxy=outbound(client))
        assert refused.value.status == 403
        async with session.get("http://chat/ws/admin", proxy=outbound(client)) as r:
            assert r.status == 403 and r.headers["x-mesh-response-flags"] == "RBAC"
        assert app.upgrades == 2
        # a non-101 answer to an upgrade request is relayed as a normal response
        async with session.get(
            "http://chat/plain",
            proxy=outbound(client),
            headers={"Connection": "Upgrade", "Upgrade": "websocket"},
        ) as r:
            assert r.status == 200 and (await r.json()) == {"path": "/plain", "upgraded": False}


async def test_websocket_upgrade_through_the_gateway(mesh: MeshHarness) -> None:
    server = await mesh.sidecar("chat", labels={"app": "chat"})
    app = await replace_app(mesh, server, WebSocketEchoApp())
    port = free_port()
    gateway = await mesh.sidecar(
        "ingressgateway",
        "",
        app=False,
        gateway=True,
        gateway_port=port,
        labels={"istio": "ingressgateway"},
    )
    await applied(mesh, GATEWAY, gateway)
    url = f"http://{LOCAL}:{port}"
    async with aiohttp.ClientSession() as session:

        async def reachable() -> bool:
            async with session.get(f"{url}/chat") as r:
                return r.status == 200  # the plain request reaches the app

        await eventually(reachable, timeout=10)
        async with session.ws_connect(f"{url}/chat", headers={"Host": "chat.example.com"}) as ws:
            greeting = await chat(ws)
        assert greeting["path"] == "/ws/gateway" and greeting["x-routed"] == "gateway-rule"
        await eventually(lambda: app.closed == 1)
        # the gateway's route policy: no route, no upgrade
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{url}/elsewhere")
        assert refused.value.status == 404
        await applied(mesh, DENY_ADMIN_WS.replace("/ws/admin", "/ws/gateway"), server)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{url}/chat")
        assert refused.value.status == 403
    assert app.upgrades == 1


# ---------------------------------------------------------------- a client that leaves


class SlowApp:
    """Raw HTTP/1.1 app: `/ready` answers 200 at once; any other request is never
    answered, and the app notes when the proxy closes that connection. `requests`
    counts the slow requests received, `closed` the connections closed under them."""

    def __init__(self) -> None:
        self.port = 0
        self.requests = 0
        self.closed = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, port: int = 0) -> SlowApp:
        self._server = await asyncio.start_server(self._serve, LOCAL, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /ready "):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    await writer.drain()
                    continue
                self.requests += 1
                with contextlib.suppress(ConnectionError):
                    while await reader.read(65536):
                        pass  # never answers; waits for the proxy to give up
                self.closed += 1
                return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._tasks.discard(task)
            writer.transport.abort()


RETRY_EVERYTHING = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: slow}
spec:
  hosts: [slow]
  http:
  - route: [{destination: {host: slow}}]
    retries: {attempts: 4, perTryTimeout: 0.5s, retryOn: "5xx,reset,connect-failure"}
"""


async def leave_after_upstream_got_it(client: Any, app: SlowApp, path: str) -> None:
    """Send a request through the client's outbound listener; close the connection once
    the app has the request (before any answer)."""
    before = app.requests
    _reader, writer = await asyncio.open_connection(LOCAL, client.ports["outbound"])
    writer.write(f"GET {path} HTTP/1.1\r\nHost: slow\r\n\r\n".encode())
    await writer.drain()
    await eventually(lambda: app.requests == before + 1)
    writer.close()
    await writer.wait_closed()


async def test_client_that_leaves_cancels_the_upstream_request_and_its_retries(
    mesh: MeshHarness,
) -> None:
    server = await mesh.sidecar("slow")
    app = await replace_app(mesh, server, SlowApp())
    client = await mesh.sidecar("web", app=False)
    async with aiohttp.ClientSession() as session:

        async def reachable() -> bool:
            async with session.get("http://slow/ready", proxy=outbound(client)) as r:
                return r.status == 200

        await eventually(reachable, timeout=10)

        # no timeout anywhere: only the client's departure can end the exchange
        await leave_after_upstream_got_it(client, app, "/hang")
        await eventually(lambda: app.closed == 1)  # cancelled through both sidecars

        # with retries on every failure and a per-try timeout, none goes out after the
        # client left: the cancelled request makes no further attempt
        await applied(mesh, RETRY_EVERYTHING, client)
        await leave_after_upstream_got_it(client, app, "/hang-with-retries")
        await eventually(lambda: app.closed == 2)
        # longer than every per-try timeout and backoff of the 4 attempts together
        await asyncio.sleep(4 * 0.5 + 1.0)
        assert app.requests == 2 and app.closed == 2

    # both abandoned requests are counted with Envoy's flag DC, on both sidecars
    async def counted_dc() -> bool:
        client_metrics, server_metrics = await metrics_of(client), await metrics_of(server)
        return (
            series_total(
                client_metrics, "meshwork_proxy_requests_total",
                listener="outbound", response_flags="DC",
            ) == 2
            and series_total(
                client_metrics, "istio_requests_total", reporter="source", response_flags="DC"
            ) == 2
            and series_total(
                server_metrics, "istio_requests_total",
                reporter="destination", response_flags="DC",
            ) == 2
        )  # fmt: skip

    await eventually(counted_dc, timeout=10)


# ---------------------------------------------------------------- an upstream outside HTTP


class RawAnswerApp:
    """Raw app: `/ready` answers 200; any other request gets `answer` verbatim, after
    which the app waits for the proxy to close the connection (`closed` counts them)."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.port = 0
        self.closed = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self, port: int = 0) -> RawAnswerApp:
        self._server = await asyncio.start_server(self._serve, LOCAL, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /ready "):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    continue
                writer.write(self.answer)
                with contextlib.suppress(ConnectionError):
                    while await reader.read(65536):
                        pass
                self.closed += 1
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.transport.abort()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 099 Weird\r\ncontent-length: 2\r\n\r\nhi",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 099 Weird\r\n\r\n",
        b"HTTP/1.1 600 Beyond\r\ncontent-length: 2\r\n\r\nhi",
    ],
    ids=["099", "100-then-099", "600"],
)
async def test_status_outside_100_599_is_a_502_upe_and_closes_the_connection(
    mesh: MeshHarness, answer: bytes
) -> None:
    server = await mesh.sidecar("weird")
    app = await replace_app(mesh, server, RawAnswerApp(answer))
    client = await mesh.sidecar("web", app=False)
    async with aiohttp.ClientSession() as session:

        async def reachable() -> bool:
            async with session.get("http://weird/ready", proxy=outbound(client)) as r:
                return r.status == 200

        await eventually(reachable, timeout=10)
        hang = aiohttp.ClientTimeout(total=20)  # bounds a hang (the bug) for the report
        async with session.get("http://weird/x", proxy=outbound(client), timeout=hang) as r:
            # the inbound sidecar's local reply, relayed by the outbound one
            assert r.status == 502 and r.headers["x-mesh-response-flags"] == "UPE"
    await eventually(lambda: app.closed == 1)  # closed, not kept for reuse
