"""The HTTP engine's HTTP/2 path over real sockets: a stock grpcio client and server
with the engine in between (h2c prior knowledge downstream, an `H2UpstreamPool`
upstream), an HTTP/1.1 client on the same listener, and CONNECT accepted into a
served connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

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
