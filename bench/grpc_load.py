"""gRPC load: a small echo app and an asyncio grpcio load generator (ghz stands in for
neither here: it is not packaged). Both run as subprocesses, so they can be pinned.

    python -m bench.grpc_load serve PORT
    python -m bench.grpc_load unary TARGET [--authority A] [--seconds 5] [--concurrency 16]
    python -m bench.grpc_load stream TARGET [--authority A] [--seconds 5] [--concurrency 4]

The app (`bench.Echo`, generic handlers, bytes in and out, no generated code) answers
`Unary` with the request and `Stream` (server streaming) with as many 100-byte
messages as the request asks for. `unary` keeps `concurrency` calls in flight on one
channel for `seconds` and prints rps, requests, errors, p50/p90/p99 ms; `stream` keeps
`concurrency` server streams of `STREAM_BATCH` messages going and prints messages/s.
`--authority` sets the :authority the calls carry (a mesh service behind a sidecar's
outbound listener, spoken to in h2c with prior knowledge).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import grpc

from bench.common import percentile
from bench.procstat import pinned

SERVICE = "bench.Echo"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"
PAYLOAD = b"x" * 100
STREAM_BATCH = 1000  # messages per server stream


def _identity(b: bytes) -> bytes:
    return b


async def _unary(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _stream(request: bytes, _context: grpc.aio.ServicerContext) -> Any:
    for _ in range(int(request)):
        yield PAYLOAD


async def serve(port: int) -> None:
    kw: dict[str, Any] = {"request_deserializer": _identity, "response_serializer": _identity}
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary, **kw),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream, **kw),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def _channel(target: str, authority: str) -> grpc.aio.Channel:
    options: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0)]
    if authority:
        options.append(("grpc.default_authority", authority))
    return grpc.aio.insecure_channel(target, options=options)


async def unary_load(
    target: str, authority: str, seconds: float, concurrency: int
) -> dict[str, float]:
    """`concurrency` calls in flight for `seconds`: calls/s and latency percentiles."""
    async with _channel(target, authority) as channel:
        call = channel.unary_unary(UNARY, request_serializer=_identity,
                                   response_deserializer=_identity)  # fmt: skip
        await call(PAYLOAD, timeout=10)  # connected, routed
        lat: list[float] = []
        errors = 0
        first_error = ""
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal errors, first_error
            while (t0 := time.perf_counter()) < deadline:
                try:
                    await call(PAYLOAD, timeout=10)
                except grpc.aio.AioRpcError as e:
                    errors += 1
                    first_error = first_error or f"{e.code().name}: {e.details()}"
                    continue
                lat.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if first_error:  # a figure with errors says what they were
        print(f"unary load: {errors} calls failed, the first with {first_error}", file=sys.stderr)
    ms = [x * 1000 for x in lat]
    return {
        "rps": len(lat) / elapsed,
        "requests": float(len(lat)),
        "errors": float(errors),
        **{f"p{p}_ms": percentile(ms, p) for p in (50, 90, 99)},
    }


async def stream_load(
    target: str, authority: str, seconds: float, concurrency: int
) -> dict[str, float]:
    """`concurrency` server streams at a time for `seconds`: messages received/s."""
    async with _channel(target, authority) as channel:
        call = channel.unary_stream(STREAM, request_serializer=_identity,
                                    response_deserializer=_identity)  # fmt: skip
        async for _ in call(b"1", timeout=10):
            pass
        messages = 0
        streams = 0
        errors = 0
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal messages, streams, errors
            while time.perf_counter() < deadline:
                stream = call(str(STREAM_BATCH).encode(), timeout=30)
                try:
                    async for _ in stream:
                        messages += 1
                        if time.perf_counter() >= deadline:
                            stream.cancel()
                            break
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                streams += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "messages_per_s": messages / elapsed,
        "messages": float(messages),
        "streams": float(streams),
        "errors": float(errors),
    }


def run_load(
    kind: str, target: str, *, authority: str, seconds: float, concurrency: int,
    core: int | None,
) -> dict[str, float]:  # fmt: skip
    """One load run (`unary` or `stream`) as a subprocess, pinned to `core`."""
    args = [sys.executable, "-m", "bench.grpc_load", kind, target, "--seconds", str(seconds)]
    args += ["--concurrency", str(concurrency), "--authority", authority]
    out = subprocess.run(pinned(args, core), capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        reason = out.stderr.strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        raise RuntimeError(f"gRPC {kind} load on {target} failed: {reason[0][:300]}")
    for line in out.stderr.splitlines():
        if line.startswith("unary load:"):  # what the failed calls failed with
            print(f"  {target}: {line}", file=sys.stderr)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=("serve", "unary", "stream"))
    ap.add_argument("target", help="PORT to serve on, or host:port to load")
    ap.add_argument("--authority", default="")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args()
    if a.kind == "serve":
        asyncio.run(serve(int(a.target)))
        return
    load = unary_load if a.kind == "unary" else stream_load
    try:
        figures = asyncio.run(load(a.target, a.authority, a.seconds, a.concurrency))
    except grpc.aio.AioRpcError as e:  # the first call, before the load: no figures
        sys.exit(f"the first call failed: {e.code().name}: {e.details()}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
