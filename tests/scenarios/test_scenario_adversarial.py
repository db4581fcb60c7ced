"""Adversarial inputs to the listeners added last round, on both data planes: h2c from
the app to the outbound listener (smuggling heads and path tricks aimed at an
AuthorizationPolicy on the server, h2 -> h1 downgrade to the app) and the ALLOW_ANY
passthrough of the outbound listener (§5.5), which must never loop back into the
sidecar's own listeners. What a user notices: the denied path never reaches the app,
a malformed request never does either, and the sidecar keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
import pytest_asyncio
import structlog

from mesh import logs
from tests.scenarios.helpers import Scenario, absolute, known_difference
from tests.support import replace_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

REVIEWS = "reviews.default:9080"

DENY_ADMIN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/admin", "/admin/*"]}
  - to:
    - operation: {methods: ["DELETE"]}
"""

ALLOW_ANY = """
apiVersion: meshwork.io/v1
kind: MeshConfig
metadata: {name: mesh, namespace: istio-system}
spec:
  outboundTrafficPolicy: {mode: ALLOW_ANY}
"""


@dataclass
class Env:
    s: Scenario
    server: Any
    client: Any


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(scenario: Scenario) -> Env:
    server = await scenario.sidecar("reviews")
    client = await scenario.sidecar("productpage")
    await scenario.apply(DENY_ADMIN)
    e = Env(scenario, server, client)
    await scenario.until(client, f"http://{REVIEWS}/admin", lambda r: r.status == 403)
    return e


@dataclass
class H2Reply:
    status: int | None  # None: no response (stream or connection refused)
    body: bytes
    ended_by: str  # "", "reset", "goaway", "closed"


async def h2c(
    port: int, headers: list[tuple[str, str]], data: bytes | None = None, timeout: float = 10
) -> H2Reply:
    """One request over h2c prior knowledge, sent exactly as given (the client's own
    checks are off, as a hostile app's would be)."""
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=data is None)
    if data is not None:
        conn.send_data(1, data, end_stream=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    status: int | None = None
    body = b""
    ended_by = "closed"
    try:
        writer.write(conn.data_to_send())
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                done = False
                for event in conn.receive_data(chunk):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, 1)
                    elif isinstance(event, h2.events.StreamEnded):
                        ended_by, done = "", True
                    elif isinstance(event, h2.events.StreamReset):
                        ended_by, done = "reset", True
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        ended_by, done = "goaway", True
                writer.write(conn.data_to_send())
                if done:
                    break
    except (ConnectionError, h2.exceptions.ProtocolError):
        ended_by = "closed"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return H2Reply(status, body, ended_by)


def head(path: str, authority: str = REVIEWS, method: str = "GET") -> list[tuple[str, str]]:
    return [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path)]


async def test_h2c_from_the_app_gets_no_spelling_of_a_denied_path_past_authorization(
    env: Env,
) -> None:
    port = env.client.ports["outbound"]
    ok = await h2c(port, head("/public"))
    assert ok.status == 200, ok
    before = env.server.echo.requests
    tricks = [
        "/admin",
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/%61dmin",
        "//admin",
        "/./admin/",
        "/public%2f..%2fadmin",
        "/public%5c..%5cadmin",
        "/public\\..\\admin",
        "/admin HTTP/1.1",
        "/admin\tx",
        "/public#/../../admin",
        f"http://{REVIEWS}/admin",
    ]
    passed = []
    for path in tricks:
        reply = await h2c(port, head(path))
        if not (reply.status is None or reply.status >= 400):
            passed.append((path, reply.status, reply.body[:100]))
        assert b"Traceback" not in reply.body
    assert passed == []
    for authority in (
        "REVIEWS.default:9080",
        "reviews.default.svc.cluster.local:9080",
        "reviews.default.svc.cluster.local.:9080",
        "reviews.default.:9080",
    ):
        reply = await h2c(port, head("/admin", authority))
        assert reply.status == 403, (authority, reply)
    reply = await h2c(port, head("/admin", method="delete"))  # a DENY on DELETE holds
    assert reply.status != 200, reply
    assert env.server.echo.requests == before
    # `;` is an ordinary character to Envoy (§5.3): forwarded exactly as authorized
    reply = await h2c(port, head("/admin;x"))
    if env.s.dataplane == "python":
        assert reply.status == 400, reply
    else:
        assert reply.status == 200 and json.loads(reply.body)["path"] == "/admin;x", reply


async def test_paths_apps_read_as_a_denied_one_are_refused(env: Env) -> None:
    """Spellings some apps serve as /admin (IIS and Windows drop a trailing dot or
    space, lenient decoders accept overlong UTF-8): refused by §6's defaults (Envoy:
    the inbound and gateway routes `refused_path|*`)."""
    port = env.client.ports["outbound"]
    before = env.server.echo.requests
    for path in ("/admin.", "/admin%20", "/public/%c0%ae%c0%ae/admin", "/%c1%a1dmin"):
        reply = await h2c(port, head(path))
        assert reply.status == 400, (path, reply)
    assert env.server.echo.requests == before


async def test_h2c_smuggling_heads_never_reach_the_app(env: Env) -> None:
    """Heads the h2 -> h1 downgrade could turn into a second request, or into fields
    the app reads as framing: refused, never answered 2xx, and nothing smuggled after
    a declared length ever becomes a request at the app."""
    port = env.client.ports["outbound"]
    before = env.server.echo.requests
    smuggled = b"GET /admin HTTP/1.1\r\nHost: reviews\r\nX-Smuggled: 1\r\n\r\n"
    post = head("/smuggle", method="POST")
    length_cases = [
        ([*post, ("content-length", "3")], b"0123456789" + smuggled),
        ([*post, ("content-length", "400")], b"short"),
        ([*post, ("transfer-encoding", "chunked")], b"0\r\n\r\n" + smuggled),
    ]
    head_cases: list[tuple[list[tuple[str, str]], bytes | None]] = [
        ([*post, ("content-length", "5")], None),
        ([*head("/smuggle"), ("connection", "keep-alive")], None),
        ([*head("/smuggle"), ("upgrade", "h2c")], None),
        ([*head("/smuggle"), ("te", "chunked")], None),
        ([*head("/smuggle"), ("x-a", "v\r\nx-injected: 1")], None),
        ([*head("/smuggle"), ("x-a", "v\x01")], None),
        ([*head("/smuggle"), (":path", "/admin")], None),
        (
            [
                (":method", "CONNECT"),
                (":protocol", "websocket"),
                (":scheme", "http"),
                (":authority", REVIEWS),
                (":path", "/admin"),
            ],
            None,
        ),
    ]
    # at once: Envoy closes a connection it refuses after its delayed-close second
    replies = await asyncio.gather(*(h2c(port, h, d) for h, d in head_cases))
    for (headers, _), reply in zip(head_cases, replies, strict=True):
        assert reply.status is None or reply.status >= 400, (headers[4:], reply)
        assert b"Traceback" not in reply.body
    assert env.server.echo.requests == before
    replies = await asyncio.gather(*(h2c(port, h, d) for h, d in length_cases))
    for (headers, _), reply in zip(length_cases, replies, strict=True):
        # Envoy streams the head on before the body disagrees with it, then resets
        # both sides: the app may see the start of that request, never a second one
        assert reply.status is None or reply.status >= 400, (headers[4:], reply)
    assert not any("X-Smuggled" in seen for seen in env.server.echo.seen_headers)
    # Host differing from :authority: refused (Python), or routed and forwarded by
    # :authority (Envoy, RFC 9113 §8.3.1): never to the Host's service
    other = await h2c(port, [*head("/smuggle"), ("host", "ratings.default:9080")])
    assert (
        other.status is None or other.status >= 400 or (json.loads(other.body)["host"] == REVIEWS)
    ), other
    ok = await h2c(port, [*post, ("content-length", "4")], b"body")
    assert ok.status == 200, ok
    assert json.loads(ok.body)["body_len"] == 4


async def test_allow_any_passthrough_never_loops_into_the_sidecar(env: Env) -> None:
    """ALLOW_ANY forwards an unknown Host to the host and port it names, and tunnels a
    CONNECT to it; naming the sidecar's own outbound listener must not send the
    request round again (each hop holding two connections until the process runs
    out of them): 508, and the sidecar still serves at once."""
    s = env.s
    port = env.client.ports["outbound"]
    await s.apply(ALLOW_ANY)
    try:
        unknown = f"http://localhost:{env.server.echo.port}/through"
        await s.until(env.client, unknown, lambda r: r.status == 200, timeout=15)
        for own in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            started = time.monotonic()
            reply = await s.raw(port, absolute(own, "/loop"))
            took = time.monotonic() - started
            assert reply is None or reply.status >= 400, (own, reply)
            assert took < 5, (own, took)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
            )
            async with asyncio.timeout(5):
                line = await reader.readline()
        finally:
            writer.close()
        assert not line.startswith(b"HTTP/1.1 200"), line  # no tunnel into itself
        ok = await s.call(env.client, f"http://{REVIEWS}/after")
        assert ok.status == 200
    finally:
        await s.delete("MeshConfig", "mesh", "istio-system")


MALFORMED_RESPONSES = {
    "CL and TE": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    "two lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nX-A: s3cr3t\x00b\r\nContent-Length: 2\r\n\r\nok",
    "status out of range": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
    "not HTTP": b"\x00\x01garbage\r\n\r\n",
    "space in a name": b"HTTP/1.1 200 OK\r\nX A: b\r\nContent-Length: 2\r\n\r\nok",
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "unsolicited 101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: upgrade\r\n\r\nGET /admin HTTP/1.1\r\n\r\n",
}
UNSOLICITED_101 = "unsolicited 101"


class MalformedUpstream:
    """Answers every request with the response named by its path (`/<name>`)."""

    def __init__(self) -> None:
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> MalformedUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            head = await reader.readuntil(b"\r\n\r\n")
            name = head.split(b" ", 2)[1].decode().rsplit("/", 1)[-1]
            writer.write(MALFORMED_RESPONSES.get(name.replace("%20", " "), b""))
            await writer.drain()
            await asyncio.sleep(0.2)
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_malformed_upstream_responses_through_the_passthrough(env: Env) -> None:
    """ALLOW_ANY's passthrough (§5.5) to a server answering what no HTTP server
    should: an error for the client (HTTP/1.1 and h2c), never the malformed message
    relayed, a traceback or a header value; the sidecar keeps serving."""
    s = env.s
    port = env.client.ports["outbound"]
    upstream = await MalformedUpstream().start()
    await s.apply(ALLOW_ANY)
    try:
        unknown = f"http://localhost:{env.server.echo.port}/through"
        await s.until(env.client, unknown, lambda r: r.status == 200, timeout=15)
        authority = f"localhost:{upstream.port}"
        for name in MALFORMED_RESPONSES:
            if name == UNSOLICITED_101:
                continue  # test_unsolicited_101_is_not_relayed
            path = "/" + name.replace(" ", "%20")
            reply = await s.raw(port, absolute(authority, path))
            if name == "obs-fold" and reply is not None and reply.status == 200:
                # RFC 9112 §5.2 lets a proxy replace obs-fold with spaces (Envoy)
                assert reply.headers["x-a"] == "a b", reply
            elif name == "bad chunk size" and reply is not None and reply.status == 200:
                # the head had gone when the body broke: the client sees it cut short
                assert not reply.body.endswith(b"0\r\n\r\n"), reply
            else:
                assert reply is None or reply.status >= 500, (name, reply)
            if reply is not None:
                assert b"Traceback" not in reply.body and b"s3cr3t" not in reply.body, name
            h2reply = await h2c(port, head(path, authority))
            assert (
                h2reply.status is None
                or h2reply.status >= 500
                or h2reply.ended_by  # reset: the body broke after the head
                or (name == "obs-fold" and h2reply.body == b"ok")
            ), (name, h2reply)
            assert b"Traceback" not in h2reply.body and b"s3cr3t" not in h2reply.body, name
        ok = await s.call(env.client, f"http://{REVIEWS}/after")
        assert ok.status == 200
    finally:
        upstream.close()
        await s.delete("MeshConfig", "mesh", "istio-system")


async def test_unsolicited_101_is_not_relayed(
    env: Env, request: pytest.FixtureRequest, dataplane: str
) -> None:
    """An upstream switching protocols on a request that asked for no upgrade: the
    bytes after it are not HTTP the client asked for; 502 (UPE), as the Python
    client does."""
    known_difference(
        request,
        dataplane,
        "envoy",
        "Envoy relays an unsolicited 101 head to the HTTP/1.1 client (then closes, "
        "without the bytes after it) where Python answers 502 UPE",
    )
    s = env.s
    upstream = await MalformedUpstream().start()
    await s.apply(ALLOW_ANY)
    try:
        unknown = f"http://localhost:{env.server.echo.port}/through"
        await s.until(env.client, unknown, lambda r: r.status == 200, timeout=15)
        path = "/" + UNSOLICITED_101.replace(" ", "%20")
        reply = await s.raw(
            env.client.ports["outbound"], absolute(f"localhost:{upstream.port}", path)
        )
        assert reply is not None and reply.status == 502, reply
        assert b"/admin" not in reply.body
    finally:
        upstream.close()
        await s.delete("MeshConfig", "mesh", "istio-system")


SMUGGLED = "GET /admin HTTP/1.1\r\nHost: reviews.default:9080\r\nX-Smuggled: 1\r\n\r\n"
H1_SMUGGLING = {
    "CL.TE": "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE.CL": "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n" + SMUGGLED + "0\r\n\r\n",
    "TE obs-fold": "Transfer-Encoding:\r\n chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE not last": "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE xchunked": "Transfer-Encoding: xchunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "space before colon": "Transfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "two lengths": "Content-Length: 0\r\nContent-Length: 5\r\n\r\n" + SMUGGLED,
    "signed length": "Content-Length: +5\r\n\r\nhello" + SMUGGLED,
    "bare LF": "Transfer-Encoding: chunked\nContent-Length: 4\r\n\r\n0\r\n\r\n" + SMUGGLED,
}  # fmt: skip


async def test_http1_smuggling_to_the_outbound_listener_never_reaches_the_app(env: Env) -> None:
    """Every CL/TE disagreement an HTTP/1.1 front and back end have read differently:
    refused, and the request hidden in the body never reaches the app."""
    port = env.client.ports["outbound"]
    before = env.server.echo.requests
    heads = {
        name: f"POST http://{REVIEWS}/public HTTP/1.1\r\nHost: {REVIEWS}\r\n{rest}".encode()
        for name, rest in H1_SMUGGLING.items()
    }
    # at once: Envoy closes a connection it refuses after its delayed-close second
    replies = await asyncio.gather(*(env.s.raw(port, head) for head in heads.values()))
    for name, reply in zip(heads, replies, strict=True):
        assert reply is None or reply.status in (400, 501), (name, reply)  # 501: Envoy, TE
    await asyncio.sleep(0.2)
    assert not any("X-Smuggled" in seen for seen in env.server.echo.seen_headers)
    assert env.server.echo.requests == before


class H2cUpgradingApp:
    """An app that switches to h2c when asked (`Upgrade: h2c`, RFC 7540 §3.2) and
    then records every byte sent in the tunnel: whatever arrives there passed no
    sidecar authorization (h2c smuggling)."""

    def __init__(self) -> None:
        self.port = 0
        self.upgrades = 0
        self.tunnelled = b""
        self._server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"\nupgrade: h2c" in head.lower():
                    self.upgrades += 1
                    writer.write(
                        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                        b"Upgrade: h2c\r\n\r\n"
                    )
                    await writer.drain()
                    while chunk := await reader.read(65536):
                        self.tunnelled += chunk
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


async def test_h2c_upgrade_never_opens_a_tunnel_past_authorization(env: Env) -> None:
    """`Upgrade: h2c` on a request the policy allows: an app that accepted it would
    serve every later request in the tunnel unseen by the server's sidecar (h2c
    smuggling). The upgrade is not passed on (Envoy strips it too)."""
    s = env.s
    details = await s.sidecar("details")
    app = await replace_app(s.mesh, details, H2cUpgradingApp())
    await s.until(env.client, "http://details.default:9080/", lambda r: r.status == 200)
    request = (
        "GET /public HTTP/1.1\r\nHost: details.default:9080\r\nConnection: Upgrade, "
        "HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        "GET /admin HTTP/1.1\r\nHost: details.default:9080\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", env.client.ports["outbound"])
    try:
        writer.write(request.encode())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while await reader.read(65536):
                    pass
    finally:
        writer.close()
    assert app.upgrades == 0
    assert b"/admin" not in app.tunnelled


async def test_no_header_value_reaches_a_log(env: Env) -> None:
    """Hostile requests carrying a secret in a header value, to every path above
    (refused heads, smuggling, a denied path, an unknown host): the secret is in no
    log line the sidecar processes write, at debug level."""
    secret = "tok-9f8e7d6c5b4a"
    config = structlog.get_config()
    stream = io.StringIO()
    logs.configure("debug", json=True, stream=stream)
    try:
        port = env.client.ports["outbound"]
        auth = ("authorization", f"Bearer {secret}")
        await asyncio.gather(
            h2c(port, [*head("/admin"), auth]),
            h2c(port, [*head("/public"), auth, ("x-a", f"{secret}\x01")]),
            h2c(port, [*head("/public"), auth, ("connection", secret)]),
            h2c(port, [*head("/public HTTP/1.1"), auth]),
            h2c(port, [*head("/", "nowhere.example:80"), auth]),
        )
        extras = (
            f"Authorization: Bearer {secret}\r\n",
            f"Authorization: Bearer {secret}\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n",
            f"X-Secret: {secret}\r\nX-Secret: {secret}\x01\r\n",
        )
        await asyncio.gather(
            *(env.s.raw(port, absolute(REVIEWS, "/admin", extra=extra)) for extra in extras),
            *(env.s.raw(port, absolute("nowhere.example", "/", extra=extra)) for extra in extras),
        )
        await asyncio.sleep(1.5)  # Envoy's access log arrives once a second
    finally:
        structlog.configure(**config)
        logs._generation += 1
    if env.s.dataplane == "python":
        assert stream.getvalue(), "nothing captured"  # the refusals are logged, as events
    assert secret not in stream.getvalue()
    for sidecar in (env.client, env.server):
        envoy = getattr(sidecar.dataplane, "_envoy", None)
        if envoy is not None:  # Envoy's own log, at the level the sidecar runs it
            assert secret not in envoy.log_path.read_text(errors="replace")
