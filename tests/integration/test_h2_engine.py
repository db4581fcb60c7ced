"""The HTTP engine's HTTP/2 path over real sockets: a stock grpcio client and server
with the engine in between (h2c prior knowledge downstream, an `H2UpstreamPool`
upstream), an HTTP/1.1 client on the same listener, and CONNECT accepted into a
served connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from proxy.forward import forward, local_reply
from proxy.http import Exchange, Limits, Request, serve, strip_hop_by_hop
from proxy.http.h2.client import H2UpstreamPool
from tests.grpc_support import EchoClient, EchoService

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def chain() -> AsyncIterator[tuple[int, EchoService]]:
    app = EchoService("app").start()
    limits = Limits()
    pool = H2UpstreamPool("127.0.0.1", app.port, limits=limits)

    async def handler(req: Request, ex: Exchange) -> None:
        if req.method == "CONNECT":
            await ex.accept_connect()
            return
        if req.path == "/local-deny":
            await local_reply(ex, 403, "RBAC", "denied")
            return
        headers = strip_hop_by_hop(req.headers, None)
        await forward(ex, req, pool, method=req.method, path=req.path, headers=headers)

    server = await serve(handler, "127.0.0.1", 0, limits=limits)
    port = server.sockets[0].getsockname()[1]
    yield port, app
    server.close()
    pool.close()
    app.stop()


async def test_grpc_unary_and_trailers_through_the_engine(chain: tuple[int, EchoService]) -> None:
    port, app = chain
    client = EchoClient(f"127.0.0.1:{port}")
    try:
        reply, call = await asyncio.to_thread(
            client.unary.with_call, b"hi", metadata=(("x-meta", "m"),), timeout=10
        )
        assert reply == b"app:hi"
        assert ("x-served-by", "app") in call.trailing_metadata()
        assert app.seen_metadata[-1]["x-meta"] == "m"
        with pytest.raises(grpc.RpcError) as failed:
            await asyncio.to_thread(client.unary, b"unavailable", timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()


async def test_grpc_streaming_kinds_through_the_engine(chain: tuple[int, EchoService]) -> None:
    port, _ = chain
    client = EchoClient(f"127.0.0.1:{port}")
    try:
        got = await asyncio.to_thread(lambda: list(client.server_stream(b"50", timeout=10)))
        assert got == [f"app:{i}".encode() for i in range(50)]
        joined = await asyncio.to_thread(
            client.client_stream, iter([b"a" * 100_000, b"b", b"c"]), timeout=10
        )
        assert joined == b"a" * 100_000 + b",b,c"
        echoed = await asyncio.to_thread(
            lambda: list(client.bidi(iter([b"1", b"2", b"3"]), timeout=10))
        )
        assert echoed == [b"app:1", b"app:2", b"app:3"]
    finally:
        client.close()


async def test_local_reply_to_grpc_is_trailers_only(chain: tuple[int, EchoService]) -> None:
    port, _ = chain
    client = EchoClient(f"127.0.0.1:{port}")
    deny = client.channel.unary_unary("/local-deny")
    try:
        with pytest.raises(grpc.RpcError) as failed:
            await asyncio.to_thread(deny, b"x", timeout=10)
        assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        client.close()


async def test_grpc_through_connect_http_proxy(chain: tuple[int, EchoService]) -> None:
    """What a stock client does with `http_proxy` set: CONNECT, then h2c inside."""
    port, app = chain
    client = EchoClient(
        f"dns:///svc.example:{app.port}", options=[("grpc.http_proxy", f"http://127.0.0.1:{port}")]
    )
    try:
        reply = await asyncio.to_thread(client.unary, b"via-connect", timeout=10)
        assert reply == b"app:via-connect"
    finally:
        client.close()


async def test_http1_client_on_the_same_listener(chain: tuple[int, EchoService]) -> None:
    port, _ = chain
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /local-deny HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403")
    writer.close()


# -- the HTTP/2 shell's protections, over a real socket --------------------------------------


async def _h2_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]:
    import h2.config
    import h2.connection

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    writer.write(peer.data_to_send())
    return reader, writer, peer


REQUEST_HEAD = [
    (":method", "GET"),
    (":scheme", "http"),
    (":authority", "svc"),
    (":path", "/big"),
]


async def test_rapid_reset_flood_gets_goaway_enhance_your_calm() -> None:
    import h2.events

    async def handler(req: Request, ex: Exchange) -> None:
        await asyncio.sleep(5)  # slow, so that resets arrive while streams are open
        await ex.respond(200, [], b"late")

    server = await serve(handler, "127.0.0.1", 0, limits=Limits())
    port = server.sockets[0].getsockname()[1]
    reader, writer, peer = await _h2_client(port)
    try:
        for i in range(300):
            stream_id = 1 + 2 * i
            peer.send_headers(stream_id, REQUEST_HEAD, end_stream=True)
            peer.reset_stream(stream_id)
        writer.write(peer.data_to_send())
        terminated = None
        while terminated is None:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "closed without GOAWAY"
            for event in peer.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    terminated = event
        assert terminated.error_code == 11  # ENHANCE_YOUR_CALM
    finally:
        writer.close()
        server.close()


async def test_a_client_that_does_not_read_holds_back_the_upstream_body() -> None:
    """The client opens no window: the response body waits in bounded buffers, and the
    handler's writer waits instead of queueing the whole body in memory."""
    sent = 0
    stalled = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(200):  # 200 x 16 KiB = 3.2 MiB offered
            sent += 16 * 1024
            yield b"z" * (16 * 1024)

    async def handler(req: Request, ex: Exchange) -> None:
        try:
            await ex.respond(200, [("content-type", "application/octet-stream")], chunks())
        finally:
            stalled.set()

    server = await serve(handler, "127.0.0.1", 0, limits=Limits())
    port = server.sockets[0].getsockname()[1]
    reader, writer, peer = await _h2_client(port)
    try:
        peer.send_headers(1, REQUEST_HEAD, end_stream=True)
        writer.write(peer.data_to_send())
        received = 0
        # read what the window allows (65535 bytes by default), acknowledging nothing
        while received < 65_535:
            data = await asyncio.wait_for(reader.read(65536), 10)
            for event in peer.receive_data(data):
                if hasattr(event, "flow_controlled_length") and event.data:
                    received += len(event.data)
        await asyncio.sleep(0.3)
        # what was produced: the window, the stream's send buffer, one chunk in flight
        assert sent <= 65_535 + 64 * 1024 + 2 * 16 * 1024, sent
        assert not stalled.is_set()
    finally:
        writer.close()
        server.close()
