"""A gRPC test service with generic handlers (no generated code): bytes in, bytes out.

`mesh.test.Echo`:
- `Unary`: answers `<name>:<request>`; trailing metadata `x-served-by: <name>`;
  a request `unavailable` aborts with UNAVAILABLE (counted in `unavailable_sent`),
  `sleep:<seconds>` sleeps first (deadlines), `hold` waits until `release` is set
  (calls kept in flight; `holding` counts them).
- `ServerStream`: request `n` -> n messages `<name>:<i>`.
- `ClientStream`: the requests joined with `,`.
- `Bidi`: echoes each request as `<name>:<request>`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

SERVICE = "mesh.test.Echo"


def _identity(b: bytes) -> bytes:
    return b


class EchoService:
    def __init__(self, name: str, *, fail_first: int = 0) -> None:
        self.name = name
        self.calls = 0
        self.fail_first = fail_first  # the first N unary calls answer UNAVAILABLE
        self.unavailable_sent = 0
        self.seen_metadata: list[dict[str, str]] = []
        self.release = threading.Event()
        self.holding = 0
        self._lock = threading.Lock()
        self.server: grpc.Server | None = None
        self.port = 0

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.calls += 1
            failing = self.fail_first > 0
            if failing:
                self.fail_first -= 1
        self.seen_metadata.append({k: str(v) for k, v in context.invocation_metadata()})
        if failing or request == b"unavailable":
            self.unavailable_sent += 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        if request.startswith(b"sleep:"):
            time.sleep(float(request[6:]))
        if request == b"hold":
            with self._lock:
                self.holding += 1
            self.release.wait(timeout=60)
        context.set_trailing_metadata((("x-served-by", self.name),))
        return f"{self.name}:".encode() + request

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            yield f"{self.name}:{i}".encode()

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b",".join(requests)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield f"{self.name}:".encode() + request

    def handler(self) -> grpc.GenericRpcHandler:
        kw: dict[str, Any] = {"request_deserializer": _identity, "response_serializer": _identity}
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary, **kw),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream, **kw),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream, **kw),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi, **kw),
            },
        )

    def start(self) -> EchoService:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((self.handler(),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None)


class EchoClient:
    """Blocking calls on one channel (run them with asyncio.to_thread)."""

    def __init__(self, target: str, options: list[tuple[str, Any]] | None = None) -> None:
        self.channel = grpc.insecure_channel(target, options=options or [])
        kw: dict[str, Any] = {"request_serializer": _identity, "response_deserializer": _identity}
        self.unary = self.channel.unary_unary(f"/{SERVICE}/Unary", **kw)
        self.server_stream = self.channel.unary_stream(f"/{SERVICE}/ServerStream", **kw)
        self.client_stream = self.channel.stream_unary(f"/{SERVICE}/ClientStream", **kw)
        self.bidi = self.channel.stream_stream(f"/{SERVICE}/Bidi", **kw)

    def close(self) -> None:
        self.channel.close()


async def http1_unary(
    port: int, target: str, message: bytes, *, te_trailers: bool
) -> tuple[bytes, bytes, list[tuple[str, str]]]:
    """One `Unary` call as an HTTP/1.1 client makes it (raw bytes to 127.0.0.1:`port`,
    request-target `target`): (response head, the chunked body decoded, the trailer
    fields after the last chunk)."""
    import asyncio
    import struct

    framed = b"\x00" + struct.pack(">I", len(message)) + message
    head = (
        f"POST {target} HTTP/1.1\r\nhost: {target.split('/')[2] if '://' in target else 'x'}"
        f"\r\ncontent-type: application/grpc\r\ncontent-length: {len(framed)}\r\n"
        + ("te: trailers\r\n" if te_trailers else "")
        + "\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + framed)
        response_head = await reader.readuntil(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in response_head.lower(), response_head
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
        trailers = []
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            trailers.append((name, value.strip()))
        return response_head, body, trailers
    finally:
        writer.close()
