"""The HTTP engine over real sockets on 127.0.0.1.

An upstream (aiohttp.web, or a raw asyncio server when the test needs exact bytes), the
engine running a small forwarding handler written here, and raw-socket or aiohttp
clients. Ports come from the OS. Assertions are about behaviour, never durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import pytest
import uvloop
from aiohttp import ClientPayloadError, ClientSession, TCPConnector, WSMsgType, web

from proxy.http import (
    BodyStream,
    ConnectionSet,
    Exchange,
    Handler,
    Limits,
    Request,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResetError,
    UpstreamResponse,
    append_forwarded_for,
    serve,
    strip_hop_by_hop,
)
from tests.support import eventually

pytestmark = pytest.mark.timeout(60)

LOCAL = "127.0.0.1"
# The most one socket read hands a protocol (asyncio and uvloop): the granularity by
# which buffers may overshoot their high-water marks.
READ_SIZE = 256 * 1024
# asyncio's default transport high-water mark for writes.
WRITE_HIGH_WATER = 64 * 1024
MiB = 1024 * 1024


# -- upstream built with aiohttp.web -------------------------------------------------------


@dataclass
class AppUpstream:
    port: int
    entered: int = 0  # handler calls (a head arrived)
    completed: int = 0  # requests whose body was read completely
    peers: set[tuple[str, int]] = field(default_factory=set)


def build_app(state: AppUpstream) -> web.Application:
    @web.middleware
    async def count(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        state.entered += 1
        assert request.transport is not None
        peer = request.transport.get_extra_info("peername")
        state.peers.add((peer[0], peer[1]))
        return await handler(request)

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        state.completed += 1
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": [[k.decode().lower(), v.decode()] for k, v in request.raw_headers],
                "length": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }
        )

    async def slow_upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            digest.update(chunk)
            size += len(chunk)
            await asyncio.sleep(0.001)  # a slow reader, so backpressure must engage
        state.completed += 1
        return web.json_response({"length": size, "sha256": digest.hexdigest()})

    async def big(request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        response = web.StreamResponse()
        if request.query.get("chunked") != "1":
            response.content_length = size
        await response.prepare(request)
        block = pattern_block()
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def echo_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"x-upstream-te": request.headers.get("Transfer-Encoding", "")}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        async for chunk in request.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        state.completed += 1
        return response

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.Response(status=code, headers={"etag": '"v1"'})

    async def sleep(request: web.Request) -> web.Response:
        await asyncio.sleep(int(request.query.get("ms", "0")) / 1000)
        return web.Response(text=request.query.get("tag", ""))

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws

    app = web.Application(middlewares=[count])
    app.router.add_route("*", "/echo", echo)
    app.router.add_post("/slow-upload", slow_upload)
    app.router.add_get("/big", big)
    app.router.add_post("/echo-stream", echo_stream)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/sleep", sleep)
    app.router.add_get("/ws", websocket)
    return app


def pattern_block() -> bytes:
    return bytes(range(256)) * 256  # 64 KiB, not all one byte value


def small_receive_buffer(sock: socket.socket) -> socket.socket:
    """Fix the socket's receive buffer at 64 KiB (no autotuning, which can grow to tens of
    MiB on loopback): a slow reader then pushes back after a bounded amount, so flow
    control in the engine must engage whatever the kernel's settings."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    return sock


@contextlib.asynccontextmanager
async def running_app_upstream(small_buffers: bool = False) -> AsyncIterator[AppUpstream]:
    state = AppUpstream(port=0)
    runner = web.AppRunner(build_app(state), access_log=None)
    await runner.setup()
    site: web.BaseSite
    if small_buffers:
        listening = small_receive_buffer(socket.socket())  # inherited by accepted sockets
        listening.bind((LOCAL, 0))
        site = web.SockSite(runner, listening)
    else:
        site = web.TCPSite(runner, LOCAL, 0)
    await site.start()
    assert runner.addresses
    state.port = runner.addresses[0][1]
    try:
        yield state
    finally:
        await runner.cleanup()


# -- raw upstream ----------------------------------------------------------------------------

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def running_raw_upstream(handler: RawHandler) -> AsyncIterator[int]:
    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            # Ends normally even when cancelled at teardown: asyncio 3.11's start_server
            # callback logs an error for a handler task that ends cancelled.
            pass
        finally:
            writer.close()

    tasks: set[asyncio.Task[None]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        await guarded(reader, writer)

    server = await asyncio.start_server(tracked, LOCAL, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks)
        await server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


# -- the engine with a forwarding handler ------------------------------------------------------


@dataclass
class Engine:
    port: int
    pool: UpstreamPool
    seen: list[Request]
    exchanges: list[tuple[Exchange, UpstreamResponse]]


def forwarding_handler(
    pool: UpstreamPool, seen: list[Request], exchanges: list[tuple[Exchange, UpstreamResponse]]
) -> Handler:
    """Forward every request to the upstream pool (what a listener does, minus routing)."""

    async def handler(request: Request, exchange: Exchange) -> None:
        seen.append(request)
        headers = strip_hop_by_hop(request.headers, request.upgrade)
        headers = append_forwarded_for(headers, request.peer[0])
        response = await pool.request(request.method, request.path, headers, request.body)
        exchanges.append((exchange, response))
        if response.status == 101:
            await exchange.tunnel(response)
        else:
            await exchange.forward(response)

    return handler


@contextlib.asynccontextmanager
async def running_engine(
    upstream_port: int, limits: Limits | None = None, handler: Handler | None = None
) -> AsyncIterator[Engine]:
    limits = limits or Limits()
    pool = UpstreamPool(LOCAL, upstream_port, limits=limits)
    seen: list[Request] = []
    exchanges: list[tuple[Exchange, UpstreamResponse]] = []
    connections = ConnectionSet()
    server = await serve(
        handler or forwarding_handler(pool, seen, exchanges),
        LOCAL,
        0,
        limits=limits,
        connections=connections,
    )
    try:
        yield Engine(server.sockets[0].getsockname()[1], pool, seen, exchanges)
    finally:
        server.close()
        await connections.drain(1.0)
        pool.close()
        await server.wait_closed()


@pytest.fixture
async def app_upstream() -> AsyncIterator[AppUpstream]:
    async with running_app_upstream() as state:
        yield state


@pytest.fixture
async def engine(app_upstream: AppUpstream) -> AsyncIterator[Engine]:
    async with running_engine(app_upstream.port) as running:
        yield running


# -- raw clients -------------------------------------------------------------------------------


async def exchange_raw(port: int, data: bytes) -> bytes:
    """Send `data`, then read until the server closes (a timeout fails the test)."""
    reader, writer = await asyncio.open_connection(LOCAL, port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool = False

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


class _ResponseCollector:
    def __init__(self) -> None:
        self.responses: list[RawResponse] = []
        self._body: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode().lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.responses.append(RawResponse(status, self._headers, b""))
        self._headers = []

    def on_body(self, data: bytes) -> None:
        self._body.append(data)
        self.responses[-1].body = b"".join(self._body)

    def on_message_complete(self) -> None:
        self.responses[-1].complete = True
        self._body = []


def parse_responses(data: bytes) -> list[RawResponse]:
    """Responses in `data`; the last may be incomplete (delimited or cut by the close)."""
    collector = _ResponseCollector()
    collector.parser.feed_data(data)
    return collector.responses


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        return int(sock.getsockname()[1])


# -- keep-alive, forwarding ----------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection_on_each_side(
    engine: Engine, app_upstream: AppUpstream
) -> None:
    async with ClientSession(connector=TCPConnector(limit=1)) as session:
        for index in range(20):
            async with session.post(
                f"http://{LOCAL}:{engine.port}/echo?i={index}", data=b"x" * index
            ) as response:
                assert response.status == 200
                echoed = await response.json()
                assert echoed["path"] == f"/echo?i={index}"
                assert echoed["length"] == index
    assert len(app_upstream.peers) == 1
    assert engine.pool.stats().opened == 1
    assert len({request.peer for request in engine.seen}) == 1
    assert app_upstream.completed == 20


async def test_request_fields_for_origin_form(engine: Engine) -> None:
    data = await exchange_raw(
        engine.port,
        b"GET /echo?a=1 HTTP/1.1\r\nHost: Reviews:9080\r\nX-Multi: 1\r\nx-multi: 2\r\n"
        b"Connection: close\r\n\r\n",
    )
    (response,) = parse_responses(data)
    assert response.status == 200
    (request,) = engine.seen
    assert (request.method, request.target, request.path) == ("GET", "/echo?a=1", "/echo?a=1")
    # the host name is case-insensitive: normalised to lower case, Host field too
    assert (request.absolute_form, request.scheme, request.authority) == (
        False,
        "http",
        "reviews:9080",
    )
    assert ("host", "reviews:9080") in request.headers
    assert request.headers[-3:] == [("x-multi", "1"), ("x-multi", "2"), ("connection", "close")]
    assert (request.http_version, request.keep_alive, request.upgrade) == ("1.1", False, None)
    assert request.peer[0] == LOCAL and request.local[1] == engine.port
    assert request.ssl_object is None
    assert (request.content_length, request.chunked) == (None, False)


async def test_absolute_form_target_is_parsed(engine: Engine) -> None:
    data = await exchange_raw(
        engine.port,
        b"GET http://reviews.default:9080/echo?x=1 HTTP/1.1\r\nHost: other\r\n"
        b"Connection: close\r\n\r\n",
    )
    (response,) = parse_responses(data)
    assert response.status == 200
    assert json.loads(response.body)["path"] == "/echo?x=1"
    (request,) = engine.seen
    assert request.absolute_form
    assert (request.scheme, request.authority, request.path) == (
        "http",
        "reviews.default:9080",
        "/echo?x=1",
    )


async def test_http_proxy_client_sends_absolute_form(engine: Engine) -> None:
    # What an application honouring HTTP_PROXY does.
    async with ClientSession() as session:
        async with session.get(
            "http://reviews:9080/echo?p=1", proxy=f"http://{LOCAL}:{engine.port}"
        ) as r:
            assert r.status == 200
            assert (await r.json())["path"] == "/echo?p=1"
    (request,) = engine.seen
    assert request.absolute_form and request.authority == "reviews:9080"


async def test_hop_by_hop_request_headers_are_not_forwarded(engine: Engine) -> None:
    data = await exchange_raw(
        engine.port,
        b"GET /echo HTTP/1.1\r\nHost: u\r\nConnection: close, X-Secret\r\nX-Secret: s\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\n"
        b"Trailer: x-t\r\nUpgrade: h2c\r\nX-End-To-End: kept\r\n\r\n",
    )
    (response,) = parse_responses(data)
    names = {name for name, _ in json.loads(response.body)["headers"]}
    assert names.isdisjoint(
        {"connection", "x-secret", "keep-alive", "te", "proxy-connection", "trailer", "upgrade"}
    )
    assert "x-end-to-end" in names
    assert "x-forwarded-for" in names


async def test_hop_by_hop_response_headers_are_not_forwarded() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: secret\r\n"
            b"Keep-Alive: timeout=5\r\nProxy-Connection: x\r\nTrailer: x-t\r\n"
            b"Upgrade: foo\r\nX-Public: yes\r\nContent-Length: 2\r\n\r\nok"
        )
        await writer.drain()

    async with running_raw_upstream(upstream) as port, running_engine(port) as engine:
        data = await exchange_raw(
            engine.port, b"GET / HTTP/1.1\r\nHost: u\r\nConnection: close\r\n\r\n"
        )
    (response,) = parse_responses(data)
    names = {name for name, _ in response.headers}
    assert names.isdisjoint({"x-internal", "keep-alive", "proxy-connection", "trailer", "upgrade"})
    assert response.header("x-public") == "yes"
    assert response.header("connection") == "close"  # the engine's own, for this client
    assert response.body == b"ok"


async def test_pipelined_requests_are_answered_in_order(engine: Engine) -> None:
    data = await exchange_raw(
        engine.port,
        b"GET /sleep?ms=150&tag=first HTTP/1.1\r\nHost: u\r\n\r\n"
        b"GET /sleep?ms=0&tag=second HTTP/1.1\r\nHost: u\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: u\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /sleep?tag=last HTTP/1.1\r\nHost: u\r\nConnection: close\r\n\r\n",
    )
    responses = parse_responses(data)
    assert [r.status for r in responses] == [200, 200, 200, 200]
    assert responses[0].body == b"first" and responses[1].body == b"second"
    assert json.loads(responses[2].body)["length"] == 5
    assert responses[3].body == b"last" and responses[3].header("connection") == "close"


async def test_pipelined_malformed_request_is_answered_after_the_valid_ones(
    engine: Engine, app_upstream: AppUpstream
) -> None:
    data = await exchange_raw(
        engine.port,
        b"GET /sleep?tag=ok HTTP/1.1\r\nHost: u\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: u\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"
        b"GET /sleep?tag=never HTTP/1.1\r\nHost: u\r\n\r\n",
    )
    responses = parse_responses(data)
    assert [r.status for r in responses] == [200, 400]
    assert responses[0].body == b"ok"
    assert [r.path for r in engine.seen] == ["/sleep?tag=ok"]
    assert app_upstream.entered == 1


# -- bodies: chunked, big, bounded ---------------------------------------------------------------


async def test_chunked_request_and_chunked_response(engine: Engine) -> None:
    data = await exchange_raw(
        engine.port,
        b"POST /echo-stream HTTP/1.1\r\nHost: u\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\n\r\n",
    )
    (response,) = parse_responses(data)
    assert response.complete
    assert response.header("transfer-encoding") == "chunked"
    assert response.header("content-length") is None
    assert response.header("x-upstream-te") == "chunked"  # forwarded chunked, as sent
    assert response.body == b"hello world"
    (request,) = engine.seen
    assert request.chunked and request.content_length is None


async def test_request_trailers_are_accepted_and_dropped(engine: Engine) -> None:
    data = await exchange_raw(
        engine.port,
        b"POST /echo HTTP/1.1\r\nHost: u\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        b"\r\n3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n",
    )
    (response,) = parse_responses(data)
    echoed = json.loads(response.body)
    assert echoed["length"] == 3
    assert "x-checksum" not in {name for name, _ in echoed["headers"]}


async def test_content_length_response_keeps_its_length(engine: Engine) -> None:
    data = await exchange_raw(
        engine.port, b"GET /big?size=100000 HTTP/1.1\r\nHost: u\r\nConnection: close\r\n\r\n"
    )
    (response,) = parse_responses(data)
    assert response.header("content-length") == "100000"
    assert response.header("transfer-encoding") is None
    assert response.complete and len(response.body) == 100000


async def test_10mb_upload_streams_with_bounded_buffers() -> None:
    limits = Limits(max_body_buffer=32 * 1024)
    payload = pattern_block() * 160  # 10 MiB
    async with (
        running_app_upstream(small_buffers=True) as app_upstream,
        running_engine(app_upstream.port, limits) as engine,
    ):
        async with ClientSession() as session:
            async with session.post(
                f"http://{LOCAL}:{engine.port}/slow-upload", data=payload
            ) as response:
                assert response.status == 200
                result = await response.json()
        assert result == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        (request,) = engine.seen
        assert request.content_length == len(payload)
        # Flow control engaged: the upstream socket filled up and the engine waited ...
        stats = engine.pool.stats()
        assert stats.peak_write_buffer > WRITE_HIGH_WATER
        # ... while what it held stayed within one read past each high-water mark.
        assert request.body.peak_buffered <= limits.max_body_buffer + READ_SIZE
        assert stats.peak_write_buffer <= WRITE_HIGH_WATER + READ_SIZE
        assert request.body.bytes_received == len(payload)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_10mb_download_to_a_slow_client_with_bounded_buffers(
    app_upstream: AppUpstream, chunked: bool
) -> None:
    limits = Limits(max_body_buffer=32 * 1024)
    size = 10 * MiB
    async with running_engine(app_upstream.port, limits) as engine:
        client = small_receive_buffer(socket.socket())
        client.connect((LOCAL, engine.port))
        reader, writer = await asyncio.open_connection(sock=client, limit=64 * 1024)
        query = f"size={size}&chunked={int(chunked)}"
        writer.write(f"GET /big?{query} HTTP/1.1\r\nHost: u\r\nConnection: close\r\n\r\n".encode())
        received = bytearray()
        while chunk := await asyncio.wait_for(reader.read(64 * 1024), 10):
            received += chunk
            await asyncio.sleep(0.0005)  # a slow reader
        writer.close()
        (response,) = parse_responses(bytes(received))
        assert response.complete
        assert response.header("content-length") == (None if chunked else str(size))
        assert response.body == (pattern_block() * 160)[:size]
        ((exchange, upstream_response),) = engine.exchanges
        assert exchange.response_bytes == size and exchange.status == 200
        assert exchange.peak_write_buffer > WRITE_HIGH_WATER  # the client was the bottleneck
        assert exchange.peak_write_buffer <= WRITE_HIGH_WATER + READ_SIZE + 64
        assert upstream_response.body.peak_buffered <= limits.max_body_buffer + READ_SIZE
        assert upstream_response.body.bytes_received == size


async def test_expect_100_continue_is_answered_when_the_body_is_wanted(engine: Engine) -> None:
    reader, writer = await asyncio.open_connection(LOCAL, engine.port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: u\r\nContent-Length: 4\r\nExpect: 100-continue\r\n"
        b"Connection: close\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ping")
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    (response,) = parse_responses(data)
    assert json.loads(response.body)["length"] == 4


# -- responses without bodies, and bodies delimited by close ---------------------------------------


async def test_head_204_304_carry_no_body_and_keep_the_connection(
    engine: Engine, app_upstream: AppUpstream
) -> None:
    async with ClientSession(connector=TCPConnector(limit=1)) as session:
        base = f"http://{LOCAL}:{engine.port}"
        async with session.head(f"{base}/echo") as response:
            assert response.status == 200
            assert int(response.headers["Content-Length"]) > 0  # what a GET would carry
            assert await response.read() == b""
        for code in (204, 304):
            async with session.get(f"{base}/status/{code}") as response:
                assert response.status == code
                assert await response.read() == b""
                assert response.headers["ETag"] == '"v1"'
        async with session.get(f"{base}/echo") as response:
            assert (await response.json())["method"] == "GET"
    assert len(app_upstream.peers) == 1
    assert engine.pool.stats().opened == 1


async def test_head_response_bytes_on_the_wire(engine: Engine) -> None:
    data = await exchange_raw(
        engine.port,
        b"HEAD /big?size=5000 HTTP/1.1\r\nHost: u\r\n\r\nGET /sleep?tag=after HTTP/1.1\r\n"
        b"Host: u\r\nConnection: close\r\n\r\n",
    )
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"\r\ncontent-length: 5000" in head
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")  # nothing between the two responses
    assert rest.endswith(b"\r\n\r\nafter")


async def _http10_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    for piece in (b"delimited ", b"by ", b"close"):
        writer.write(piece)
        await writer.drain()
    writer.close()


async def test_close_delimited_upstream_is_rechunked_for_http11_clients() -> None:
    async with running_raw_upstream(_http10_upstream) as port, running_engine(port) as engine:
        async with ClientSession(connector=TCPConnector(limit=1)) as session:
            url = f"http://{LOCAL}:{engine.port}/"
            for _ in range(2):  # the client connection survives: the body was chunked
                async with session.get(url) as response:
                    assert response.headers["Transfer-Encoding"] == "chunked"
                    assert await response.read() == b"delimited by close"
        assert len({request.peer for request in engine.seen}) == 1
        assert engine.pool.stats().opened == 2  # an upstream delimited by close is not reused


async def test_close_delimited_upstream_to_http10_client_is_delimited_by_close() -> None:
    async with running_raw_upstream(_http10_upstream) as port, running_engine(port) as engine:
        data = await exchange_raw(engine.port, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"\r\nconnection: close" in head
    assert body == b"delimited by close"


async def _trailing_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
        b"2\r\nok\r\n0\r\ngrpc-status: 0\r\nHost: elsewhere\r\n\r\n"
    )
    await writer.drain()


@pytest.mark.parametrize(("te", "trailer"), [(b"TE: trailers\r\n", True), (b"", False)])
async def test_upstream_trailers_reach_a_client_that_asked_for_them(
    te: bytes, trailer: bool
) -> None:
    request = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" + te + b"\r\n"
    async with running_raw_upstream(_trailing_upstream) as port, running_engine(port) as engine:
        data = await exchange_raw(engine.port, request)
    _, _, body = data.partition(b"\r\n\r\n")
    # framing fields never travel as trailers
    expected = b"0\r\ngrpc-status: 0\r\n\r\n" if trailer else b"0\r\n\r\n"
    assert body == b"2\r\nok\r\n" + expected


async def test_http10_keep_alive_client_gets_keep_alive(engine: Engine) -> None:
    reader, writer = await asyncio.open_connection(LOCAL, engine.port)
    for tag in ("one", "two"):
        writer.write(f"GET /sleep?tag={tag} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"\r\nconnection: keep-alive" in head
        assert await reader.readexactly(len(tag)) == tag.encode()
    writer.close()


# -- local responses -------------------------------------------------------------------------------


async def test_local_responses_bytes_and_streams() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"a", b"", b"bc"):
            yield piece

    async def handler(request: Request, exchange: Exchange) -> None:
        if request.path == "/bytes":
            await exchange.respond(201, [("x-local", "1"), ("content-length", "999")], b"made")
        elif request.path == "/stream":
            await exchange.respond(200, [("content-type", "text/plain")], pieces())
        else:
            await exchange.respond(200, [("content-length", "3")], pieces())

    async with running_engine(free_port(), handler=handler) as engine:
        data = await exchange_raw(
            engine.port,
            b"GET /bytes HTTP/1.1\r\nHost: u\r\n\r\nGET /stream HTTP/1.1\r\nHost: u\r\n\r\n"
            b"GET /sized HTTP/1.1\r\nHost: u\r\nConnection: close\r\n\r\n",
        )
        first, second, third = parse_responses(data)
        assert (first.status, first.header("content-length"), first.body) == (201, "4", b"made")
        assert second.header("transfer-encoding") == "chunked" and second.body == b"abc"
        assert third.header("content-length") == "3" and third.body == b"abc"
        http10 = await exchange_raw(engine.port, b"GET /stream HTTP/1.0\r\n\r\n")
        assert http10.endswith(b"\r\nconnection: close\r\n\r\nabc")


async def test_handler_failures_map_to_500_and_502(app_upstream: AppUpstream) -> None:
    async def handler(request: Request, exchange: Exchange) -> None:
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        if request.path == "/silent":
            return
        dead = UpstreamPool(LOCAL, free_port(), limits=Limits())
        await dead.request("GET", "/", [])

    async with running_engine(app_upstream.port, handler=handler) as engine:
        for path, status in (("/boom", 500), ("/silent", 500), ("/dead", 502)):
            data = await exchange_raw(
                engine.port, f"GET {path} HTTP/1.1\r\nHost: u\r\n\r\n".encode()
            )
            assert data.startswith(f"HTTP/1.1 {status} ".encode())


# -- strictness ------------------------------------------------------------------------------------

# (id, raw request, who refuses it). "llhttp" is httptools' parser with its strict
# defaults; "engine" marks checks in proxy.http.server that llhttp lets through.
CHUNKED = b"Transfer-Encoding: chunked\r\n"


def post(fields: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"POST /echo HTTP/" + version + b"\r\nHost: u\r\n" + fields + b"\r\n" + body


def get(fields: bytes = b"", line: bytes = b"GET /echo HTTP/1.1") -> bytes:
    return line + b"\r\nHost: u\r\n" + fields + b"\r\n"


MALFORMED: list[tuple[str, bytes, str]] = [
    ("cl-then-te", post(b"Content-Length: 5\r\n" + CHUNKED, b"0\r\n\r\n"), "llhttp"),
    ("te-then-cl", post(CHUNKED + b"Content-Length: 5\r\n", b"0\r\n\r\n"), "llhttp"),
    ("duplicate-cl-equal", post(b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc"), "llhttp"),
    ("duplicate-cl-differ", post(b"Content-Length: 3\r\ncontent-length: 4\r\n", b"abcd"), "llhttp"),
    ("cl-list", post(b"Content-Length: 3, 3\r\n", b"abc"), "llhttp"),
    ("cl-non-digit", post(b"Content-Length: 3a\r\n", b"abc"), "llhttp"),
    ("cl-negative", post(b"Content-Length: -3\r\n", b"abc"), "llhttp"),
    ("cl-plus", post(b"Content-Length: +5\r\n", b"abcde"), "llhttp"),
    ("cl-empty", post(b"Content-Length: \r\n"), "llhttp"),
    ("cl-overflow-u64", post(b"Content-Length: 99999999999999999999\r\n"), "llhttp"),
    ("cl-over-i63", post(b"Content-Length: 9223372036854775808\r\n"), "engine"),
    ("te-gzip", post(b"Transfer-Encoding: gzip\r\n", b"abc"), "llhttp"),
    ("te-identity", post(b"Transfer-Encoding: identity\r\n"), "llhttp"),
    (
        "te-chunked-identity",
        post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
        "llhttp",
    ),
    ("te-gzip-chunked", post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"), "engine"),
    ("te-chunked-twice", post(CHUNKED + CHUNKED, b"0\r\n\r\n"), "llhttp"),
    ("te-in-http10", post(CHUNKED, b"0\r\n\r\n", version=b"1.0"), "engine"),
    ("obs-fold-space", get(b"X-A: b\r\n c\r\n"), "llhttp"),
    ("obs-fold-tab", get(b"X-A: b\r\n\tc\r\n"), "llhttp"),
    ("space-before-first-field", b"GET /echo HTTP/1.1\r\n Host: u\r\n\r\n", "llhttp"),
    ("bare-lf-request-line", b"GET /echo HTTP/1.1\nHost: u\r\n\r\n", "llhttp"),
    ("bare-lf-header", get(b"X-A: b\nX-B: c\r\n"), "llhttp"),
    ("bare-lf-end-of-head", b"GET /echo HTTP/1.1\r\nHost: u\r\n\n", "llhttp"),
    ("bare-cr-header", get(b"X-A: b\rX-B: c\r\n"), "llhttp"),
    ("bare-lf-chunk-size", post(CHUNKED, b"3\nabc\r\n0\r\n\r\n"), "llhttp"),
    ("bare-lf-chunk-data", post(CHUNKED, b"3\r\nabc\n0\r\n\r\n"), "llhttp"),
    ("bare-lf-last-chunk", post(CHUNKED, b"3\r\nabc\r\n0\n\n"), "llhttp"),
    ("chunk-size-not-hex", post(CHUNKED, b"xyz\r\nabc\r\n0\r\n\r\n"), "llhttp"),
    ("chunk-longer-than-size", post(CHUNKED, b"3\r\nabcdef\r\n0\r\n\r\n"), "llhttp"),
    ("method-lowercase", get(line=b"get /echo HTTP/1.1"), "llhttp"),
    ("method-unknown", get(line=b"FOO /echo HTTP/1.1"), "llhttp"),
    ("method-rtsp", get(line=b"DESCRIBE /echo HTTP/1.1"), "llhttp"),
    ("field-name-space", get(b"X A: b\r\n"), "llhttp"),
    ("field-name-space-before-colon", get(b"Content-Length : 0\r\n"), "llhttp"),
    ("field-name-non-token", get(b"X@A: b\r\n"), "llhttp"),
    ("field-name-non-ascii", get(b"X\xe9: b\r\n"), "llhttp"),
    ("field-value-nul", get(b"X-A: b\x00c\r\n"), "llhttp"),
    ("field-value-control", get(b"X-A: b\x01c\r\n"), "llhttp"),
    ("field-value-del", get(b"X-A: b\x7fc\r\n"), "llhttp"),
    ("target-control", get(line=b"GET /ec\x01ho HTTP/1.1"), "llhttp"),
    ("target-space", get(line=b"GET /ec ho HTTP/1.1"), "llhttp"),
    ("target-fragment", get(line=b"GET /echo#frag HTTP/1.1"), "engine"),
    ("absolute-form-userinfo", get(line=b"GET http://user@u/echo HTTP/1.1"), "engine"),
    ("absolute-form-ftp", get(line=b"GET ftp://u/echo HTTP/1.1"), "engine"),
    ("version-0.9-request-line", get(line=b"GET /echo"), "engine"),
    ("version-0.9", get(line=b"GET /echo HTTP/0.9"), "engine"),
    ("version-1.2", get(line=b"GET /echo HTTP/1.2"), "llhttp"),
    ("version-2.0", get(line=b"GET /echo HTTP/2.0"), "engine"),
    ("version-lowercase", get(line=b"GET /echo http/1.1"), "llhttp"),
    ("missing-host-http11", b"GET /echo HTTP/1.1\r\nX-A: b\r\n\r\n", "engine"),
    ("duplicate-host", get(b"Host: v\r\n"), "engine"),
    (
        "upgrade-with-body",
        post(b"Connection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 3\r\n", b"abc"),
        "engine",
    ),
]


class _NullCallbacks:
    def on_header(self, name: bytes, value: bytes) -> None:
        pass


@pytest.mark.parametrize(("raw", "refused_by"), [pytest.param(r, b, id=i) for i, r, b in MALFORMED])
def test_malformed_table_says_who_refuses_each_case(raw: bytes, refused_by: str) -> None:
    # Keeps the table honest (and flags an httptools upgrade that changes llhttp).
    parser = httptools.HttpRequestParser(_NullCallbacks())
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        llhttp_refuses = False
    except httptools.HttpParserError:
        llhttp_refuses = True
    else:
        llhttp_refuses = False
    assert llhttp_refuses == (refused_by == "llhttp")


@pytest.mark.parametrize(("raw", "refused_by"), [pytest.param(r, b, id=i) for i, r, b in MALFORMED])
async def test_malformed_request_gets_400_close_and_never_reaches_the_handler(
    engine: Engine, app_upstream: AppUpstream, raw: bytes, refused_by: str
) -> None:
    data = await exchange_raw(engine.port, raw)  # returns only once the engine closed
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nconnection: close\r\n" in data
    assert engine.seen == []
    assert app_upstream.entered == 0


async def test_malformed_chunk_after_forwarding_began_fails_the_request(
    engine: Engine, app_upstream: AppUpstream
) -> None:
    reader, writer = await asyncio.open_connection(LOCAL, engine.port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: u\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    for _ in range(500):  # until the handler is streaming the body upstream
        if engine.seen:
            break
        await asyncio.sleep(0.01)
    writer.write(b"3\nabc\r\n0\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nconnection: close\r\n" in data
    assert app_upstream.completed == 0  # the upstream never got a complete request


async def test_too_many_header_fields_gets_431(engine: Engine) -> None:
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(100))  # + Host = 101
    data = await exchange_raw(engine.port, b"GET /echo HTTP/1.1\r\nHost: u\r\n" + fields + b"\r\n")
    assert data.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"\r\nconnection: close\r\n" in data
    assert engine.seen == []


async def test_exactly_max_header_fields_is_accepted(engine: Engine) -> None:
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(98))  # + Host + Connection = 100
    data = await exchange_raw(
        engine.port, b"GET /echo HTTP/1.1\r\nHost: u\r\nConnection: close\r\n" + fields + b"\r\n"
    )
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_too_many_header_bytes_gets_431(engine: Engine) -> None:
    data = await exchange_raw(
        engine.port, b"GET /echo HTTP/1.1\r\nHost: u\r\nX-Big: " + b"v" * 70_000 + b"\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 431 ")
    assert engine.seen == []


async def test_endless_header_is_cut_off_with_431(engine: Engine) -> None:
    # The head never ends: the engine must answer 431 and close while the client is
    # still sending. The client keeps writing until the answer has arrived (however much
    # the kernel's buffers absorb); a cap far beyond any loopback buffering only keeps
    # an engine that reads forever from hanging the test.
    cap = 256 * MiB
    reader, writer = await asyncio.open_connection(LOCAL, engine.port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: u\r\nX-Endless: ")
    answer = asyncio.ensure_future(reader.read())  # complete once the server closes
    sent = 0
    block = b"v" * 65536
    try:
        while not answer.done() and sent < cap:
            writer.write(block)
            await writer.drain()
            sent += len(block)
            await asyncio.sleep(0)  # drain() need not yield: let the reader see the answer
    except ConnectionError:
        pass  # the server closed (its linger ended) before the reader task ran
    data = await asyncio.wait_for(answer, 10)
    writer.close()
    assert data.startswith(b"HTTP/1.1 431 "), data[:80]
    assert b"\r\nconnection: close\r\n" in data
    assert answer.done() and sent < cap  # answered while the header was still coming
    assert engine.seen == []


async def test_slow_head_gets_408(app_upstream: AppUpstream) -> None:
    async with running_engine(app_upstream.port, Limits(header_timeout=0.2)) as engine:
        data = await exchange_raw(engine.port, b"GET /echo HTTP/1.1\r\nHost: u\r\n")
        assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert b"\r\nconnection: close\r\n" in data
        # A connection that never sent a byte is closed without an answer.
        assert await exchange_raw(engine.port, b"") == b""
        assert engine.seen == []


async def test_idle_keep_alive_connection_is_closed(app_upstream: AppUpstream) -> None:
    async with running_engine(app_upstream.port, Limits(idle_timeout=0.2)) as engine:
        data = await exchange_raw(engine.port, b"GET /sleep?tag=x HTTP/1.1\r\nHost: u\r\n\r\n")
        assert parse_responses(data)[0].body == b"x"  # answered, then closed once idle


# -- upstream failures ---------------------------------------------------------------------------


async def test_upstream_connect_refused() -> None:
    pool = UpstreamPool(LOCAL, free_port(), limits=Limits())
    with pytest.raises(UpstreamConnectError):
        await pool.request("GET", "/", [("host", "u")])
    assert pool.stats().active == 0
    async with running_engine(free_port()) as engine:
        data = await exchange_raw(engine.port, b"GET / HTTP/1.1\r\nHost: u\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


async def test_upstream_closes_before_the_response_head() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)

    async with running_raw_upstream(upstream) as port:
        pool = UpstreamPool(LOCAL, port, limits=Limits())
        with pytest.raises(UpstreamResetError):
            await pool.request("GET", "/", [("host", "u")])
        pool.close()
        async with running_engine(port) as engine:
            data = await exchange_raw(engine.port, b"GET / HTTP/1.1\r\nHost: u\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 502 ")


async def test_upstream_closes_mid_body() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        await writer.drain()

    async with running_raw_upstream(upstream) as port:
        pool = UpstreamPool(LOCAL, port, limits=Limits())
        response = await pool.request("GET", "/", [("host", "u")])
        assert response.status == 200
        with pytest.raises(UpstreamResetError):
            await response.body.read_all(1000)
        pool.close()
        async with running_engine(port) as engine:
            async with ClientSession() as session:
                async with session.get(f"http://{LOCAL}:{engine.port}/") as client_response:
                    assert client_response.status == 200
                    with pytest.raises(ClientPayloadError):  # truncation is visible
                        await client_response.read()


# Raw upstream answers that must each end as a protocol error: a 502 to the client and
# the upstream connection closed (never a hang, never reused).
MALFORMED_UPSTREAM = [
    ("duplicate-cl", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi"),
    ("same-cl-twice", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi"),
    ("cl-and-te", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nhi"),
    ("negative-cl", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
    ("non-numeric-cl", b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nhi"),
    ("bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi"),
    ("http2", b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
    (
        "unrequested-101",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
    ),
    ("not-http", b"SSH-2.0-OpenSSH_9.0\r\n\r\n"),
    ("no-status-line", b"Content-Length: 2\r\n\r\nhi"),
    ("status-099", b"HTTP/1.1 099 Weird\r\nContent-Length: 2\r\n\r\nhi"),
    ("status-000", b"HTTP/1.1 000 Zero\r\n\r\n"),
    ("status-600", b"HTTP/1.1 600 Nope\r\nContent-Length: 2\r\n\r\nhi"),
    ("status-999", b"HTTP/1.1 999 Nope\r\nContent-Length: 2\r\n\r\nhi"),
    ("two-digit-status", b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nhi"),
    ("100-then-099", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 099 Weird\r\n\r\n"),
    (
        "1xx-with-body",
        b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nhello"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
    ),
    ("endless-1xx", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 64),
    ("head-too-large", b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 70_000 + b"\r\n\r\n"),
    ("head-never-ends", b"HTTP/1.1 200 OK\r\nX-Endless: " + b"v" * 200_000),
    (
        "too-many-fields",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-F%d: v\r\n" % i for i in range(200)) + b"\r\n",
    ),
]


@pytest.mark.parametrize("answer", [pytest.param(a, id=i) for i, a in MALFORMED_UPSTREAM])
async def test_malformed_upstream_response_is_a_protocol_error(answer: bytes) -> None:
    closed: list[bool] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(answer)
        await writer.drain()
        try:
            rest = await reader.read()
        except ConnectionError:  # aborted: a reset is a close too
            rest = b""
        closed.append(rest == b"")  # the proxy closed it without sending anything more

    async with running_raw_upstream(upstream) as port:
        pool = UpstreamPool(LOCAL, port, limits=Limits())
        with pytest.raises(UpstreamProtocolError):
            await asyncio.wait_for(pool.request("GET", "/", [("host", "u")]), 10)
        await eventually(lambda: closed == [True])
        assert pool.stats().active == 0 and pool.stats().idle == 0
        pool.close()
        async with running_engine(port) as engine:
            data = await exchange_raw(engine.port, b"GET / HTTP/1.1\r\nHost: u\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 502 ")
            await eventually(lambda: closed == [True, True])
            assert engine.pool.stats().active == 0 and engine.pool.stats().idle == 0


@pytest.mark.parametrize("leave", ["close", "half-close"])
async def test_client_leaving_cancels_its_upstream_exchange(leave: str) -> None:
    # HTTP/1.1 has no half-close: an end of the client's stream before its answer means
    # it left (Envoy: DC, nginx: 499). The handler is cancelled, its mid-exchange
    # upstream connection closed, and pipelined requests behind it never run.
    asked: list[bytes] = []
    closed = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await read_head(reader))
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        closed.set()

    async with running_raw_upstream(upstream) as port, running_engine(port) as engine:
        reader, writer = await asyncio.open_connection(LOCAL, engine.port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: u\r\n\r\nGET /b HTTP/1.1\r\nHost: u\r\n\r\n")
        await eventually(lambda: len(asked) == 1)
        if leave == "close":
            writer.close()
        else:
            writer.write_eof()
        await asyncio.wait_for(closed.wait(), 10)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # no answer, closed
        writer.close()
        assert [request.path for request in engine.seen] == ["/a"]
        assert engine.pool.stats().active == 0 and engine.pool.stats().idle == 0


async def test_stale_pooled_connection_is_retried_once_when_replayable() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_head(reader)  # a second request on this connection: drop it unanswered

    async with running_raw_upstream(upstream) as port:
        pool = UpstreamPool(LOCAL, port, limits=Limits())
        for body in (None, b"replayable"):
            response = await pool.request("POST", "/", [("host", "u")], body)
            assert await response.body.read_all(10) == b"ok"
        assert pool.stats().opened == 2  # the second request was retried on a new one
        response = await pool.request("GET", "/", [("host", "u")])
        assert await response.body.read_all(10) == b"ok"
        assert pool.stats().opened == 3
        with pytest.raises(UpstreamResetError):  # a consumed stream cannot be replayed
            await pool.request("POST", "/", [("host", "u")], BodyStream.from_bytes(b"once"))
        pool.close()


async def test_idle_pooled_connections_expire(app_upstream: AppUpstream) -> None:
    pool = UpstreamPool(LOCAL, app_upstream.port, limits=Limits(upstream_idle_timeout=0.1))
    response = await pool.request("GET", "/sleep?tag=x", [("host", "u")])
    assert await response.body.read_all(10) == b"x"
    assert pool.stats().idle == 1
    for _ in range(200):
        if pool.stats().idle == 0:
            break
        await asyncio.sleep(0.01)
    assert pool.stats() == pool.stats().__class__(active=0, idle=0, opened=1, peak_write_buffer=0)
    pool.close()


async def test_pool_honours_connection_close(app_upstream: AppUpstream) -> None:
    pool = UpstreamPool(LOCAL, app_upstream.port, limits=Limits())
    for _ in range(3):
        response = await pool.request(
            "GET", "/sleep?tag=x", [("host", "u"), ("connection", "close")]
        )
        assert await response.body.read_all(10) == b"x"
    assert pool.stats().opened == 3 and pool.stats().idle == 0
    pool.close()


# -- WebSocket ---------------------------------------------------------------------------------


async def test_websocket_upgrade_is_tunnelled(engine: Engine, app_upstream: AppUpstream) -> None:
    async with ClientSession() as session:
        async with session.ws_connect(f"http://{LOCAL}:{engine.port}/ws") as ws:
            await ws.send_str("hello")
            assert (await ws.receive_str(timeout=10)) == "echo:hello"
            payload = bytes(range(256)) * 1000
            await ws.send_bytes(payload)
            assert (await ws.receive_bytes(timeout=10)) == payload[::-1]
    (request,) = engine.seen
    assert request.upgrade == "websocket"
    ((exchange, response),) = engine.exchanges
    for _ in range(200):  # the tunnel ends once both sides closed
        if exchange.finished:
            break
        await asyncio.sleep(0.01)
    assert exchange.status == 101 and response.status == 101
    assert exchange.request_bytes > 256_000 and exchange.response_bytes > 256_000


# -- TLS ---------------------------------------------------------------------------------------


def tls_contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for 127.0.0.1/localhost, and a
    client context trusting it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOCAL))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


async def test_tls_on_both_sides_exposes_the_ssl_objects(tmp_path: Path) -> None:
    server_context, client_context = tls_contexts(tmp_path)
    state = AppUpstream(port=0)
    runner = web.AppRunner(build_app(state), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOCAL, 0, ssl_context=server_context)
    await site.start()
    upstream_port = runner.addresses[0][1]
    limits = Limits()
    pool = UpstreamPool(
        LOCAL, upstream_port, ssl=client_context, server_hostname="localhost", limits=limits
    )
    seen: list[Request] = []
    exchanges: list[tuple[Exchange, UpstreamResponse]] = []
    server = await serve(
        forwarding_handler(pool, seen, exchanges), LOCAL, 0, ssl=server_context, limits=limits
    )
    port = server.sockets[0].getsockname()[1]
    try:
        async with ClientSession() as session:
            for _ in range(3):
                url = f"https://{LOCAL}:{port}/echo"
                async with session.post(url, data=b"secret", ssl=client_context) as response:
                    assert (await response.json())["length"] == 6
        assert all(request.ssl_object is not None for request in seen)
        assert len({request.peer for request in seen}) == 1
        upstream_ssl = exchanges[0][1].connection.ssl_object
        assert upstream_ssl is not None and upstream_ssl.getpeercert()
        assert pool.stats().opened == 1
        untrusting = UpstreamPool(
            LOCAL, upstream_port, ssl=ssl.create_default_context(), limits=limits
        )
        with pytest.raises(UpstreamConnectError):  # certificate verification fails
            await untrusting.request("GET", "/echo", [("host", "u")])
    finally:
        server.close()
        pool.close()
        await runner.cleanup()


# -- graceful shutdown and uvloop -------------------------------------------------------------


async def test_drain_finishes_in_flight_responses(app_upstream: AppUpstream) -> None:
    limits = Limits()
    pool = UpstreamPool(LOCAL, app_upstream.port, limits=limits)
    connections = ConnectionSet()
    server = await serve(
        forwarding_handler(pool, [], []), LOCAL, 0, limits=limits, connections=connections
    )
    port = server.sockets[0].getsockname()[1]
    idle_reader, idle_writer = await asyncio.open_connection(LOCAL, port)
    busy = asyncio.ensure_future(
        exchange_raw(port, b"GET /sleep?ms=200&tag=done HTTP/1.1\r\nHost: u\r\n\r\n")
    )
    for _ in range(500):
        if len(connections) == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    server.close()
    await connections.drain(5.0)
    assert len(connections) == 0
    (response,) = parse_responses(await busy)
    assert response.body == b"done" and response.header("connection") == "close"
    assert await idle_reader.read() == b""
    idle_writer.close()
    pool.close()


async def _scenario_under_running_loop() -> str:
    async with running_app_upstream() as upstream, running_engine(upstream.port) as engine:
        async with ClientSession(connector=TCPConnector(limit=1)) as session:
            base = f"http://{LOCAL}:{engine.port}"
            for index in range(5):
                async with session.post(f"{base}/echo-stream", data=b"u" * index * 1000) as r:
                    assert await r.read() == b"u" * index * 1000
            async with session.get(f"{base}/big?size={MiB}") as r:
                assert len(await r.read()) == MiB
            async with session.ws_connect(f"{base}/ws") as ws:
                await ws.send_str("uv")
                assert await ws.receive_str(timeout=10) == "echo:uv"
        # One upstream connection: kept alive, then taken over by the WebSocket tunnel.
        assert len(upstream.peers) == 1
        return type(asyncio.get_running_loop()).__module__


def test_engine_runs_on_uvloop() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(_scenario_under_running_loop()).startswith("uvloop")
