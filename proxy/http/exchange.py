"""What a handler uses to answer one request: respond, forward or tunnel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import Protocol

from .body import BodyStream
from .client import UpstreamConnection, UpstreamResponse
from .exchange_state import ExchangeState, check_local_status, discard_body, grpc_status_of
from .flow import ReadGate, WriteGate
from .h1.events import ResponseHead
from .h1.server import ServerConnection
from .headers import get_header
from .request import Request
from .tunnel import Tunnel
from .wire import no_body_status, parse_content_length


class Downstream(Protocol):
    """What an Exchange needs from the client connection (server.py implements it)."""

    @property
    def transport(self) -> asyncio.Transport: ...
    @property
    def read_gate(self) -> ReadGate: ...
    @property
    def write_gate(self) -> WriteGate: ...
    @property
    def h1(self) -> ServerConnection: ...
    def will_close(self, request: Request) -> bool: ...
    def start_tunnel(self, tunnel: Tunnel) -> None: ...
    def serve_tunnelled(self, protocol: asyncio.Protocol | None = None) -> None: ...


class Exchange(ExchangeState):
    """The response side of one request.

    Exactly one of `respond`, `forward` or `tunnel` is awaited per request; each returns
    once the last byte was handed to the transport (with backpressure on the way).
    Telemetry: `status`, `request_bytes` and `response_bytes` (body bytes, or relayed
    bytes for a tunnel), `started_at`/`finished_at` (time.monotonic()), `grpc_status`
    (of a trailers-only answer, or of the upstream's trailers).

    An upstream's trailers (HTTP/2, gRPC) reach the client as chunked trailer fields
    when it asked with `TE: trailers` and the body is chunked (as Envoy's
    `enable_trailers`); otherwise they are dropped, as HTTP/1.1 allows.
    """

    __slots__ = ("_closing", "_downstream", "_tunnel")

    def __init__(self, downstream: Downstream, request: Request) -> None:
        super().__init__(request)
        self._downstream = downstream
        self._closing = False
        self._tunnel: Tunnel | None = None

    # -- telemetry -------------------------------------------------------------------------

    @property
    def request_bytes(self) -> int:
        relayed = self._tunnel.bytes_up if self._tunnel is not None else 0
        return self._request.body.bytes_received + relayed

    @property
    def peak_write_buffer(self) -> int:
        """Largest write buffer the client connection has held (bounded by flow control)."""
        return self._downstream.write_gate.peak

    @property
    def closing(self) -> bool:
        """The connection closes after this response."""
        return self._closing or self.close_after

    # -- answers ---------------------------------------------------------------------------

    async def respond(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] = b"",
    ) -> None:
        """Send a local response.

        bytes get a Content-Length; an async iterable is sent chunked unless `headers`
        carry a Content-Length (then exactly that many bytes must follow), or delimited
        by closing the connection for an HTTP/1.0 client.
        """
        check_local_status(status)
        self.grpc_status = grpc_status_of(headers)
        h1 = self._downstream.h1
        transport = self._downstream.transport
        if isinstance(body, bytes | bytearray | memoryview):
            length = len(body)
            head = self._send_head(status, headers, None if no_body_status(status) else length)
            self._begin(status)
            if length and h1.sending_body:
                transport.writelines((head, h1.send_data(bytes(body))))
                self.response_bytes = length
            else:
                transport.write(head)
            h1.send_end()
            self._finish()
            return
        declared_text = get_header(headers, "content-length")
        declared = parse_content_length(declared_text) if declared_text is not None else None
        head = self._send_head(status, headers, declared)
        self._begin(status)
        transport.write(head)
        if not h1.sending_body:
            await discard_body(body)
        else:
            await self._stream(body)
        tail = h1.send_end()
        if tail:
            transport.write(tail)
        self._finish()

    async def forward(self, response: UpstreamResponse) -> None:
        """Stream an upstream response to the client.

        Hop-by-hop fields are removed; the body keeps its Content-Length, or is sent
        chunked (closed for HTTP/1.0 clients) when the upstream chunked it or delimited
        it by closing. HEAD, 204 and 304 answers carry no body.
        """
        try:
            status = response.status
            if status < 200:
                raise ValueError("a 101 response is answered with tunnel()")
            head = self._send_head(
                status, response.headers, response.content_length, response.reason
            )
            self._begin(status)
            self.grpc_status = grpc_status_of(response.headers)
            h1 = self._downstream.h1
            if not h1.sending_body:
                self._downstream.transport.write(head)
                h1.send_end()
                response.close()  # a body the client must not get (HEAD sent upstream as GET)
            else:
                await self._forward_body(head, response.body)
                trailed = grpc_status_of(response.body.trailers)
                if trailed:
                    self.grpc_status = trailed
        except BaseException:
            response.close()
            raise
        self._finish()

    async def tunnel(self, response: UpstreamResponse) -> None:
        """After a 101 from the upstream: answer 101, then relay bytes until one side closes."""
        request = self._request
        if response.status != 101 or request.upgrade is None:
            response.close()
            raise ValueError("tunnel() needs a 101 answer to an upgrade request")
        try:
            self._check_unanswered()
            head = self._downstream.h1.send(ResponseHead(101, response.headers))
        except BaseException:
            response.close()
            raise
        self._begin(101)
        await self._relay(head, response._connection)

    async def relay_connect(self, upstream: UpstreamConnection) -> None:
        """Answer a CONNECT with 200 and relay the tunnelled bytes, opaque, to and from
        `upstream` (a fresh connection to the host the CONNECT named) until one side
        closes: TLS from the app reaches that host untouched."""
        if self._request.method != "CONNECT":
            upstream.abort()
            raise ValueError("relay_connect() answers a CONNECT request")
        self._check_unanswered()
        head = self._downstream.h1.send(ResponseHead(200, []))
        self._begin(200)
        await self._relay(head, upstream)

    async def _relay(self, head: bytes, upstream: UpstreamConnection) -> None:
        """Send the answer's `head`, then relay bytes both ways until one side closes."""
        self._closing = True
        downstream = self._downstream
        downstream.transport.write(head)
        tunnel = self._tunnel = Tunnel(
            downstream.transport, downstream.read_gate, upstream.transport, upstream.read_gate
        )
        try:
            downstream.start_tunnel(tunnel)
            upstream.start_tunnel(tunnel)
            await tunnel.wait_closed()
        finally:
            tunnel.close()
            self.response_bytes = tunnel.bytes_down
        self._finish()

    async def accept_connect(self, protocol: asyncio.Protocol | None = None) -> None:
        """Answer a CONNECT with 200 and serve what the client sends through it as a
        new HTTP/1.1 or h2c connection on this listener (its requests routed one by
        one, like any other), or hand the connection to `protocol` (a TCP relay that
        routes the tunnelled bytes itself); this exchange ends here."""
        if self._request.method != "CONNECT":
            raise ValueError("accept_connect() answers a CONNECT request")
        self._check_unanswered()
        head = self._downstream.h1.send(ResponseHead(200, []))
        self._begin(200)
        self._closing = True
        self._downstream.transport.write(head)
        self._downstream.serve_tunnelled(protocol)
        self._finish()

    # -- internals -------------------------------------------------------------------------

    def _send_head(
        self,
        status: int,
        headers: list[tuple[str, str]],
        content_length: int | None,
        reason: str = "",
    ) -> bytes:
        """The response head, framed by the connection (`proxy.http.h1`)."""
        self._check_unanswered()
        downstream = self._downstream
        keep_alive = not (self.close_after or downstream.will_close(self._request))
        h1 = downstream.h1
        head = h1.send(ResponseHead(status, headers, reason, content_length, keep_alive=keep_alive))
        self._closing = not h1.keep_alive
        return head

    async def _forward_body(self, head: bytes, body: BodyStream) -> None:
        # Coalesce the head with whatever body is already here: a small response
        # leaves in one write.
        send_data = self._downstream.h1.send_data
        parts = [head]
        sent = 0
        for chunk in body.take_ready():
            sent += len(chunk)
            parts.append(send_data(chunk))
        transport = self._downstream.transport
        self.response_bytes = sent
        if body.complete and not body.failed:
            end = self._downstream.h1.send_end(body.trailers)
            if end:
                parts.append(end)
            transport.writelines(parts)
            return
        transport.writelines(parts)
        await self._stream(body)
        tail = self._downstream.h1.send_end(body.trailers)
        if tail:
            transport.write(tail)

    async def _stream(self, chunks: AsyncIterable[bytes]) -> None:
        """Write body chunks as the connection frames them, waiting while the client's
        socket is full."""
        transport = self._downstream.transport
        gate = self._downstream.write_gate
        send_data = self._downstream.h1.send_data
        write = transport.write
        for_sent = self.response_bytes
        async for chunk in chunks:
            framed = send_data(chunk)
            if framed:
                write(framed)
                for_sent += len(chunk)
                self.response_bytes = for_sent
            if gate.paused:
                await gate.wait()
