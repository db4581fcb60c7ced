"""Trailers to HTTP/1.1 clients, as byte transcripts (no sockets): an upstream's
trailers (HTTP/2, gRPC) end a chunked response as trailer fields when the client sent
`TE: trailers`, and are dropped otherwise, or when the body has a Content-Length."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.http import Exchange, Limits, Request
from proxy.http.body import BodyStream
from proxy.http.flow import WriteGate
from proxy.http.h1.encode import LAST_CHUNK, last_chunk
from proxy.http.h1.server import ServerConnection
from proxy.http.headers import accepts_trailers

GRPC_TRAILERS = [("grpc-status", "0"), ("grpc-message", ""), ("x-served-by", "app")]


class RecordingTransport:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.written += part

    def is_closing(self) -> bool:
        return False


class Downstream:
    """The client connection: `request` arrives as bytes on a sans-IO HTTP/1.1 server
    connection, which frames the answer."""

    def __init__(self, request: Request) -> None:
        self.transport = RecordingTransport()
        self.write_gate = WriteGate()
        self.read_gate = None
        self.h1 = ServerConnection(Limits())
        fields = [("host", request.authority)] + [h for h in request.headers if h[0] != "host"]
        wire = f"{request.method} {request.target} HTTP/{request.http_version}\r\n"
        wire += "".join(f"{n}: {v}\r\n" for n, v in fields) + "content-length: 0\r\n\r\n"
        events = self.h1.receive_data(wire.encode("latin-1"))
        assert [type(e).__name__ for e in events] == ["RequestHead", "EndOfMessage"]

    def will_close(self, request: Request) -> bool:
        return False


class UpstreamAnswer:
    """What `Exchange.forward` reads of an upstream response (HTTP/2's has the same)."""

    def __init__(self, body: BodyStream, headers: list[tuple[str, str]]) -> None:
        self.status, self.reason, self.headers, self.body = 200, "", headers, body
        self.content_length = body.length
        self.closed = False

    def close(self) -> None:
        self.closed = True


def request(headers: list[tuple[str, str]], version: str = "1.1") -> Request:
    return Request(
        method="POST", target="/mesh.test.Echo/Unary", absolute_form=False, scheme="http",
        authority="reviews", path="/mesh.test.Echo/Unary", headers=headers,
        http_version=version, keep_alive=True, upgrade=None, peer=("127.0.0.1", 1),
        local=("127.0.0.1", 2), ssl_object=None, content_length=0, chunked=False,
        body=BodyStream.empty(),
    )  # fmt: skip


def streamed_body(chunks: list[bytes], trailers: list[tuple[str, str]] | None) -> BodyStream:
    body = BodyStream(length=None)
    for chunk in chunks:
        body.feed(chunk)
    body.trailers = trailers
    body.feed_eof()
    return body


async def transcript(
    request_headers: list[tuple[str, str]],
    body: BodyStream,
    *,
    version: str = "1.1",
    late: list[bytes] | None = None,
) -> tuple[bytes, Exchange]:
    """What the client receives; `late` chunks (and the end) arrive after forwarding
    started, so the streaming path writes the last chunk."""
    req = request(request_headers, version)
    downstream = Downstream(req)
    ex = Exchange(downstream, req)  # type: ignore[arg-type]
    answer = UpstreamAnswer(body, [("content-type", "application/grpc")])
    task = asyncio.ensure_future(ex.forward(answer))  # type: ignore[arg-type]
    if late is not None:
        await asyncio.sleep(0)
        for chunk in late:
            body.feed(chunk)
        body.trailers = GRPC_TRAILERS
        body.feed_eof()
    await task
    return bytes(downstream.transport.written), ex


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\n"
WITH_TRAILERS = b"0\r\ngrpc-status: 0\r\ngrpc-message: \r\nx-served-by: app\r\n\r\n"


async def test_a_client_that_sent_te_trailers_gets_them_after_the_last_chunk() -> None:
    body = streamed_body([b"\x00\x00\x00\x00\x02hi"], GRPC_TRAILERS)
    wire, ex = await transcript([("host", "reviews"), ("te", "trailers")], body)
    assert wire == HEAD + b"7\r\n\x00\x00\x00\x00\x02hi\r\n" + WITH_TRAILERS
    assert ex.grpc_status == "0"


async def test_trailers_arriving_while_the_body_streams() -> None:
    body = BodyStream(length=None)
    body.feed(b"abc")
    wire, _ = await transcript([("te", "deflate;q=0.5, Trailers")], body, late=[b"de"])
    assert wire == HEAD + b"3\r\nabc\r\n2\r\nde\r\n" + WITH_TRAILERS


async def test_without_te_trailers_they_are_dropped() -> None:
    body = streamed_body([b"abc"], GRPC_TRAILERS)
    wire, ex = await transcript([("host", "reviews")], body)
    assert wire == HEAD + b"3\r\nabc\r\n" + LAST_CHUNK
    assert ex.grpc_status == "0"  # still counted
    body = BodyStream(length=None)
    wire, _ = await transcript([("te", "gzip")], body, late=[b"x"])
    assert wire.endswith(b"1\r\nx\r\n" + LAST_CHUNK)


async def test_no_trailers_where_the_body_is_not_chunked() -> None:
    # a Content-Length body has nowhere to put them
    body = BodyStream(length=3)
    body.feed(b"abc")
    body.trailers = GRPC_TRAILERS
    body.feed_eof()
    wire, _ = await transcript([("te", "trailers")], body)
    assert wire.endswith(b"content-length: 3\r\n\r\nabc")
    # an HTTP/1.0 client reads to the close
    body = streamed_body([b"abc"], GRPC_TRAILERS)
    wire, _ = await transcript([("te", "trailers")], body, version="1.0")
    assert b"grpc-status" not in wire and wire.endswith(b"\r\n\r\nabc")


def test_last_chunk_drops_fields_that_frame_or_route_and_refuses_broken_ones() -> None:
    assert last_chunk(None) == last_chunk([]) == LAST_CHUNK
    assert last_chunk([("content-length", "9"), ("host", "x"), ("trailer", "a")]) == LAST_CHUNK
    assert last_chunk([("transfer-encoding", "chunked"), ("grpc-status", "14")]) == (
        b"0\r\ngrpc-status: 14\r\n\r\n"
    )
    with pytest.raises(ValueError, match="invalid name or value"):
        last_chunk([("x-evil", "a\r\nx-smuggled: 1")])


@pytest.mark.parametrize(
    ("headers", "accepted"),
    [
        ([("te", "trailers")], True),
        ([("TE", "gzip, Trailers;q=1")], True),
        ([("te", "gzip"), ("te", "trailers")], True),
        ([("te", "gzip")], False),
        ([("x-te", "trailers")], False),
        ([], False),
    ],
)
def test_accepts_trailers(headers: list[tuple[str, str]], accepted: bool) -> None:
    assert accepts_trailers(headers) is accepted
