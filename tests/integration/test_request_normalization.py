"""Issue 13, items 3-5 and "also worth closing", on the three listeners with raw bytes:
the inbound (plaintext, PERMISSIVE), the outbound (HTTP_PROXY absolute-form) and the
ingress gateway. Real nats-server, etcd, registry, config service, CA and sidecars;
the echo app records the method, path and Host it received.

- paths are normalised before routing: `/public/../admin` and its variants never reach
  `/admin` through a gateway or an outbound route that exposes only `/public`;
- an absolute-form URI's authority replaces Host, and that Host is the one authorized
  and forwarded;
- CONNECT and invalid Hosts get a 4xx, never a traceback; an error in a handler gets a
  generic 500, and its log record has no local variables and no header value.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import structlog

from mesh import logs
from mesh.servers import free_port
from tests.integration.test_mesh_security import RawReply, raw_http
from tests.support import EchoApp, MeshHarness, eventually, ingress_gateway_yaml

SECRET = "SECRET-d7c1e9"

GATEWAY_PUBLIC_ONLY = ingress_gateway_yaml(
    "public-gateway",
    "public-only",
    """\
  - match:
    - uri: {prefix: /public}
    route:
    - destination: {host: reviews}
""",
)

# the mesh route of `reviews` (outbound listeners): only /public goes to the app
OUTBOUND_PUBLIC_ONLY = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-public-only}
spec:
  hosts: [reviews]
  http:
  - match:
    - uri: {prefix: /public}
    route:
    - destination: {host: reviews}
  - directResponse: {status: 418, body: {string: "only /public"}}
"""

DENY_ADMIN_HOST = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin-host, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - to:
    - operation: {hosts: ["admin.example.com"]}
"""


@dataclass
class Mesh:
    harness: MeshHarness
    server: Any  # reviews, with the echo app
    client: Any  # productpage: its outbound listener
    gateway: Any
    log: io.StringIO

    @property
    def app(self) -> EchoApp:
        return self.server.echo  # type: ignore[no-any-return]

    def port(self, listener: str) -> int:
        if listener == "inbound":
            return int(self.server.ports["inbound"])
        if listener == "outbound":
            return int(self.client.ports["outbound"])
        return int(self.gateway.settings.gateway_port)


@pytest.fixture
def captured_log() -> Iterator[io.StringIO]:
    """The process's log as production writes it (JSON lines), captured."""
    config = structlog.get_config()
    stream = io.StringIO()
    logs.configure("info", json=True, stream=stream)
    yield stream
    structlog.configure(**config)
    logs._generation += 1


@pytest.fixture
async def mesh(nats_server, etcd_server, prefix, captured_log) -> AsyncIterator[Mesh]:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as harness:
        server = await harness.sidecar("reviews")
        client = await harness.sidecar("productpage")
        gateway = await harness.sidecar(
            "ingressgateway",
            "",
            app=False,
            gateway=True,
            gateway_port=free_port(),
            labels={"istio": "ingressgateway"},
        )
        yield Mesh(harness, server, client, gateway, captured_log)


def request(
    method: str, target: str, host: str | None, extra: str = "", *, hosts: int = 1
) -> bytes:
    """A request head exactly as written (no client-side normalisation)."""
    host_lines = f"Host: {host}\r\n" * hosts if host is not None else ""
    return (
        f"{method} {target} HTTP/1.1\r\n{host_lines}Authorization: Bearer {SECRET}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    ).encode("latin-1")


async def send(mesh: Mesh, listener: str, head: bytes) -> RawReply:
    reply = await raw_http(mesh.port(listener), head)
    assert reply is not None, (listener, head)
    return reply


def seen(reply: RawReply) -> dict[str, Any]:
    """What the echo app received, from its answer."""
    assert reply.status == 200, (reply.status, reply.body)
    return json.loads(reply.body)  # type: ignore[no-any-return]


def assert_clean(mesh: Mesh, *replies: RawReply) -> None:
    """No traceback or secret on the wire or in the log."""
    for reply in replies:
        assert b"Traceback" not in reply.body and b'File "' not in reply.body, reply.body
        assert SECRET.encode() not in reply.body
    text = mesh.log.getvalue()
    assert SECRET not in text
    assert "Traceback" not in text and '"frames"' not in text


# ---------------------------------------------------------------- item 3: paths


# each resolves above /public: routed as /admin, which nothing exposes
ESCAPES_FROM_PUBLIC = [
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/public/%2E%2E/admin",
    "/public/./../admin",
    "/public//../../admin",
    "/public/x/../../admin",
    "/public;x/../admin",
    "/public/..;x/admin",
]


async def test_gateway_and_outbound_route_the_normalised_path(mesh: Mesh) -> None:
    await mesh.harness.apply(GATEWAY_PUBLIC_ONLY)
    await mesh.harness.apply(OUTBOUND_PUBLIC_ONLY)

    async def exposed(listener: str, target: str, host: str) -> bool:
        reply = await send(mesh, listener, request("GET", target, host))
        return reply.status == 200 and seen(reply)["path"] == "/public/x"

    await eventually(lambda: exposed("gateway", "/public/x", "public.example.com"), timeout=10)
    await eventually(
        lambda: exposed("outbound", "http://reviews:9080/public/x", "reviews:9080"), timeout=10
    )
    via = {
        "gateway": lambda path: request("GET", path, "public.example.com"),
        "outbound": lambda path: request("GET", f"http://reviews:9080{path}", "reviews:9080"),
    }
    for listener, build in via.items():
        for path in ESCAPES_FROM_PUBLIC:
            before = mesh.app.requests
            reply = await send(mesh, listener, build(path))
            # 404 (gateway: no route), 418 (outbound: the catch-all route) or 400 (a
            # path parameter): never the app
            assert reply.status in (400, 404, 418), (listener, path, reply.status, reply.body)
            assert mesh.app.requests == before, (listener, path)
        # what was routed is what the app receives
        for path, expected in [
            ("/public/a/../b", "/public/b"),
            ("//public//./b", "/public/b"),
            ("/public/%61", "/public/a"),
            ("/x/../public/b?q=/../admin", "/public/b?q=/../admin"),
        ]:
            reply = await send(mesh, listener, build(path))
            assert seen(reply)["path"] == expected, (listener, path)
    # the inbound forwards the normalised path too
    for path, expected in [("/public/../admin", "/admin"), ("//a/./b/%7e", "/a/b/~")]:
        reply = await send(mesh, "inbound", request("GET", path, "reviews"))
        assert seen(reply)["path"] == expected
    assert_clean(mesh)


@pytest.mark.parametrize("listener", ["inbound", "outbound", "gateway"])
async def test_paths_apps_read_differently_are_refused(mesh: Mesh, listener: str) -> None:
    await mesh.harness.apply(GATEWAY_PUBLIC_ONLY)
    await eventually(
        lambda: _status(mesh, "gateway", request("GET", "/public/x", "a.example.com"), 200),
        timeout=10,
    )
    target = {"inbound": "", "outbound": "http://reviews:9080", "gateway": ""}[listener]
    before = mesh.app.requests
    for path, reason in [
        ("/public/admin;x", b"path parameter"),
        ("/public/admin.", b"ending in '.' or a space"),
        ("/public/admin%20", b"ending in '.' or a space"),
        ("/public/%C1%A1dmin", b"not valid UTF-8"),
        ("/public/%2e%2e%2fadmin", b"encoded slash"),
    ]:
        reply = await send(mesh, listener, request("GET", target + path, "reviews"))
        assert reply.status == 400, (listener, path, reply.status)
        assert reason in reply.body, (listener, path, reply.body)
    assert mesh.app.requests == before
    # method and URL overrides never reach the app
    reply = await send(
        mesh,
        listener,
        request(
            "GET",
            target + "/public/x",
            "reviews",
            "X-HTTP-Method-Override: DELETE\r\nX-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\n",
        ),
    )
    headers = {name.lower() for name in seen(reply)["headers"]}
    assert not headers & {"x-http-method-override", "x-original-url", "x-rewrite-url"}
    assert_clean(mesh)


async def _status(mesh: Mesh, listener: str, head: bytes, status: int) -> bool:
    return (await send(mesh, listener, head)).status == status


# ---------------------------------------------------------------- item 4: Host


async def test_absolute_form_authority_is_the_host_authorized_and_forwarded(mesh: Mesh) -> None:
    await mesh.harness.apply(DENY_ADMIN_HOST)
    await mesh.harness.apply(GATEWAY_PUBLIC_ONLY)
    await eventually(
        lambda: _status(mesh, "inbound", request("GET", "/echo", "admin.example.com"), 403),
        timeout=10,
    )
    await eventually(
        lambda: _status(mesh, "gateway", request("GET", "/public/x", "a.example.com"), 200),
        timeout=10,
    )
    # inbound: authorized as public.example.com, and the app is told public.example.com
    reply = await send(
        mesh, "inbound", request("GET", "http://public.example.com/echo", "admin.example.com")
    )
    assert seen(reply)["host"] == "public.example.com"
    assert seen(reply)["headers"]["Host"] == "public.example.com"
    # and the other way round: an absolute-form admin authority is denied whatever Host says
    reply = await send(
        mesh, "inbound", request("GET", "http://admin.example.com/echo", "public.example.com")
    )
    assert reply.status == 403 and reply.flags == "RBAC"
    # a trailing dot does not dodge the host rule
    reply = await send(mesh, "inbound", request("GET", "/echo", "Admin.Example.com."))
    assert reply.status == 403
    # outbound and gateway: the authority routes and is what the app sees
    reply = await send(
        mesh, "outbound", request("GET", "http://reviews:9080/echo", "admin.example.com")
    )
    assert seen(reply)["host"] == "reviews:9080"
    reply = await send(
        mesh, "gateway", request("GET", "http://public.example.com/public/x", "admin.example.com")
    )
    assert seen(reply)["host"] == "public.example.com"
    assert_clean(mesh)


@pytest.mark.parametrize("listener", ["inbound", "outbound", "gateway"])
async def test_several_or_invalid_hosts_are_refused_with_400(mesh: Mesh, listener: str) -> None:
    target = "http://reviews:9080/echo" if listener == "outbound" else "/public/echo"
    before = mesh.app.requests
    replies = []
    for head, reason in [
        (request("GET", target, "reviews", hosts=2), b""),
        (request("GET", target, "target, client"), b"invalid Host"),
        (request("GET", target, "target client"), b"invalid Host"),
        (request("GET", target, ">"), b"invalid Host"),
        (request("GET", target, "reviews.*"), b"invalid Host"),
        (request("GET", target, "reviews:http"), b"invalid Host"),
        (request("GET", "http://>/echo", "reviews"), b""),  # llhttp refuses this URL itself
        (request("GET", "http://a,b:9080/echo", "reviews"), b"invalid Host"),
        (request("GET", "http://reviews:9080/echo", "target client"), b"invalid Host"),
    ]:
        reply = await send(mesh, listener, head)
        assert reply.status == 400, (listener, head, reply.status, reply.body)
        assert reason in reply.body, (listener, head, reply.body)
        replies.append(reply)
    assert mesh.app.requests == before
    assert_clean(mesh, *replies)


# ---------------------------------------------------------------- item 5: errors


GATEWAY_ALL = GATEWAY_PUBLIC_ONLY.replace(
    """  - match:
    - uri: {prefix: /public}
    route:""",
    "  - route:",
)


@pytest.mark.parametrize("listener", ["inbound", "outbound", "gateway"])
async def test_connect_is_answered_404_without_a_traceback(mesh: Mesh, listener: str) -> None:
    # a catch-all route: the CONNECT reached the forwarding step and raised there
    await mesh.harness.apply(GATEWAY_ALL)
    await eventually(
        lambda: _status(mesh, "gateway", request("GET", "/x", "a.example.com"), 200), timeout=10
    )
    before = mesh.app.requests
    # Envoy answers 404 to a CONNECT that no `connect_matcher` route accepts; the
    # outbound listener accepts CONNECT to mesh services only (the test below)
    target = "unknown.example:443" if listener == "outbound" else "reviews:9080"
    reply = await send(mesh, listener, request("CONNECT", target, target))
    assert reply.status == 404 and reply.flags == "NR", (reply.status, reply.body)
    assert mesh.app.requests == before
    assert_clean(mesh, reply)


async def test_outbound_connect_to_a_mesh_service_serves_the_tunnel_as_http(mesh: Mesh) -> None:
    """What gRPC and other proxy-aware clients send given the sidecar's http_proxy:
    the requests inside the tunnel are normalised and routed one by one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.port("outbound"))
    try:
        writer.write(b"CONNECT reviews:9080 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        before = mesh.app.requests
        for _ in range(2):  # keep-alive inside the tunnel
            writer.write(b"GET /a/../echo HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(
                next(
                    line.split(b":", 1)[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
            )
            body = json.loads(await reader.readexactly(length))
            assert body["path"] == "/echo"
        assert mesh.app.requests == before + 2
    finally:
        writer.close()


async def test_handler_error_is_a_generic_500_logged_without_locals_or_headers(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(host: str) -> None:
        raise RuntimeError("injected routing failure")

    monkeypatch.setattr(mesh.client.dataplane.routes, "_service", broken)
    replies = [
        await send(mesh, "outbound", request("GET", "http://reviews:9080/echo", "reviews"))
        for _ in range(20)
    ]
    for reply in replies:
        assert reply.status == 500
        assert reply.body == b"Internal Server Error\n"  # nothing internal on the wire
    records = [json.loads(line) for line in mesh.log.getvalue().splitlines() if line]
    errors = [r for r in records if r.get("event") == "http.handler_error"]
    assert errors, records
    first = errors[0]
    assert (first["error_type"], first["error"]) == ("RuntimeError", "injected routing failure")
    assert "broken" in first["traceback"] and first["path"] == "/echo"
    # short records (the was 7 KB: locals of every frame), never more than asked
    assert all(len(json.dumps(r)) < 4096 for r in errors)
    assert len(errors) <= len(replies)
    assert_clean(mesh, *replies)
