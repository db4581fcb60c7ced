"""What a handler uses to answer one request: respond, forward or tunnel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import Protocol

from .body import BodyStream
from .client import UpstreamConnection, UpstreamResponse
from .exchange_state import ExchangeState, check_local_status, discard_body, grpc_status_of
from .flow import ReadGate, WriteGate
from .h1.encode import CRLF, LAST_CHUNK, chunk_size_line, encode_head, last_chunk, status_line
from .headers import HOP_BY_HOP, accepts_trailers, connection_tokens, get_header
from .request import Request
from .tunnel import Tunnel
from .wire import Framing, no_body_status, parse_content_length, response_framing

# The engine owns framing and connection management of every response it writes.
_SKIP_FIELDS: frozenset[str] = HOP_BY_HOP | {"content-length"}


class Downstream(Protocol):
    """What an Exchange needs from the client connection (server.py implements it)."""

    @property
    def transport(self) -> asyncio.Transport: ...
    @property
    def read_gate(self) -> ReadGate: ...
    @property
    def write_gate(self) -> WriteGate: ...
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
        head_request = self._request.method == "HEAD"
        transport = self._downstream.transport
        if isinstance(body, bytes | bytearray | memoryview):
            length = len(body)
            if head_request or no_body_status(status):
                framing = Framing.NONE
                announce = length if head_request and not no_body_status(status) else None
            else:
                framing = Framing.LENGTH
                announce = length
            head = self._encode_head(status, headers, _SKIP_FIELDS, framing, announce)
            self._begin(status)
            if framing is Framing.LENGTH and length:
                transport.writelines((head, body))
                self.response_bytes = length
            else:
                transport.write(head)
            self._finish()
            return
        declared_text = get_header(headers, "content-length")
        declared = parse_content_length(declared_text) if declared_text is not None else None
        framing = response_framing(
            status, head_request, declared, self._request.http_version == "1.1"
        )
        announce = declared if framing is not Framing.NONE or head_request else None
        head = self._encode_head(status, headers, _SKIP_FIELDS, framing, announce)
        self._begin(status)
        transport.write(head)
        if framing is Framing.NONE:
            await discard_body(body)
        else:
            await self._stream(body, framing, declared)
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
            request = self._request
            head_request = request.method == "HEAD"
            length = response.content_length
            framing = response_framing(status, head_request, length, request.http_version == "1.1")
            if framing is Framing.NONE:
                # HEAD and 304 may announce the length a GET would get; 204 must not.
                announce = length if status != 204 else None
            else:
                announce = length
            nominated = connection_tokens(response.headers)
            skip = _SKIP_FIELDS | nominated if nominated else _SKIP_FIELDS
            head = self._encode_head(
                status, response.headers, skip, framing, announce, response.reason
            )
            self._begin(status)
            self.grpc_status = grpc_status_of(response.headers)
            transport = self._downstream.transport
            if framing is Framing.NONE:
                transport.write(head)
                response.close()  # a body the client must not get (HEAD sent upstream as GET)
            else:
                await self._forward_body(head, response.body, framing)
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
        upgrade = get_header(response.headers, "upgrade") or request.upgrade
        extra = f"connection: upgrade\r\nupgrade: {upgrade}\r\n"
        nominated = connection_tokens(response.headers)
        skip = HOP_BY_HOP | nominated if nominated else HOP_BY_HOP
        try:
            self._check_unanswered()
            head = encode_head(status_line(101), response.headers, skip, extra)
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
        self._begin(200)
        await self._relay(b"HTTP/1.1 200 Connection established\r\n\r\n", upstream)

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
        self._begin(200)
        self._closing = True
        self._downstream.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self._downstream.serve_tunnelled(protocol)
        self._finish()

    # -- internals -------------------------------------------------------------------------

    def _encode_head(
        self,
        status: int,
        headers: list[tuple[str, str]],
        skip: frozenset[str],
        framing: Framing,
        announce: int | None,
        reason: str = "",
    ) -> bytes:
        self._check_unanswered()
        closing = (
            self.close_after
            or framing is Framing.CLOSE
            or self._downstream.will_close(self._request)
        )
        extra = ""
        if announce is not None:
            extra = f"content-length: {announce}\r\n"
        elif framing is Framing.CHUNKED:
            extra = "transfer-encoding: chunked\r\n"
        if closing:
            extra += "connection: close\r\n"
        elif self._request.http_version == "1.0":
            extra += "connection: keep-alive\r\n"
        head = encode_head(status_line(status, reason), headers, skip, extra)
        self._closing = closing
        return head

    async def _forward_body(self, head: bytes, body: BodyStream, framing: Framing) -> None:
        # Coalesce the head with whatever body is already here: a small response
        # leaves in one write.
        chunked = framing is Framing.CHUNKED
        parts = [head]
        sent = 0
        for chunk in body.take_ready():
            sent += len(chunk)
            if chunked:
                parts += (chunk_size_line(len(chunk)), chunk, CRLF)
            else:
                parts.append(chunk)
        transport = self._downstream.transport
        if body.complete and not body.failed:
            if chunked:
                parts.append(self._end_of_chunks(body))
            transport.writelines(parts)
            self.response_bytes = sent
            return
        transport.writelines(parts)
        self.response_bytes = sent
        await self._stream(body, framing, None, trailers_of=body)

    def _end_of_chunks(self, body: BodyStream) -> bytes:
        """The last chunk, with the body's trailers when the client asked for them."""
        trailers = body.trailers
        if trailers and accepts_trailers(self._request.headers):
            return last_chunk(trailers)
        return LAST_CHUNK

    async def _stream(
        self,
        chunks: AsyncIterable[bytes],
        framing: Framing,
        declared: int | None,
        *,
        trailers_of: BodyStream | None = None,
    ) -> None:
        transport = self._downstream.transport
        gate = self._downstream.write_gate
        if framing is Framing.CHUNKED:
            async for chunk in chunks:
                if not chunk:
                    continue  # an empty chunk would end the chunked body
                transport.writelines((chunk_size_line(len(chunk)), chunk, CRLF))
                self.response_bytes += len(chunk)
                if gate.paused:
                    await gate.wait()
            transport.write(LAST_CHUNK if trailers_of is None else self._end_of_chunks(trailers_of))
            return
        write = transport.write
        async for chunk in chunks:
            sent = self.response_bytes + len(chunk)
            if declared is not None and sent > declared:
                raise ValueError("response body longer than its Content-Length")
            write(chunk)
            self.response_bytes = sent
            if gate.paused:
                await gate.wait()
        if declared is not None and self.response_bytes != declared:
            raise ValueError("response body shorter than its Content-Length")
