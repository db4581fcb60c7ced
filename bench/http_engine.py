"""The HTTP engine's own cost: requests/s and latency through `proxy.http` forwarding to
an upstream, against the same upstream directly, in the same run.

    python -m bench.http_engine [--seconds 5] [--connections 32] [--repeats 3]

Three processes: a minimal keep-alive upstream (httptools on uvloop, 1 KiB answers),
the engine with a forwarding handler (strip hop-by-hop, X-Forwarded-For, pool.request,
exchange.forward), and the load generator: wrk when installed, otherwise a built-in
asyncio keep-alive client. Each case alternates direct / engine `--repeats` times and
reports medians, with the CPU time each process spent per request (from /proc, Linux
only): on a shared machine req/s swing with the other load, CPU per request much less.
Nothing is written to disk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httptools

ANSWER_BODY = b"x" * 1024
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1024\r\n\r\n" + ANSWER_BODY
)
POST_BODY_SIZE = 16 * 1024


# -- roles run as subprocesses ----------------------------------------------------------------


class _Upstream(asyncio.Protocol):
    """Answers every request with ANSWER once its body is read; never closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        self.transport.write(ANSWER)  # type: ignore[attr-defined]


async def _run_upstream(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Upstream, "127.0.0.1", port)
    print("ready", flush=True)
    await server.serve_forever()


async def _run_engine(port: int, upstream_port: int) -> None:
    from proxy.http import (
        Exchange,
        Limits,
        Request,
        UpstreamPool,
        append_forwarded_for,
        serve,
        strip_hop_by_hop,
    )

    limits = Limits()
    pool = UpstreamPool("127.0.0.1", upstream_port, limits=limits)

    async def handler(request: Request, exchange: Exchange) -> None:
        headers = append_forwarded_for(strip_hop_by_hop(request.headers), request.peer[0])
        response = await pool.request(request.method, request.path, headers, request.body)
        await exchange.forward(response)

    server = await serve(handler, "127.0.0.1", port, limits=limits)
    print("ready", flush=True)
    await server.serve_forever()


def _serve_role(role: str, port: int, upstream_port: int, loop: str) -> None:
    coroutine = _run_upstream(port) if role == "upstream" else _run_engine(port, upstream_port)
    if loop == "uvloop":
        import uvloop

        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)


# -- load generation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _run_wrk(wrk: str, url: str, seconds: int, connections: int, post: bool) -> Measurement:
    args = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    with tempfile.TemporaryDirectory() as tmp:
        if post:
            script = Path(tmp) / "post.lua"
            script.write_text(
                f'wrk.method = "POST"\nwrk.body = string.rep("p", {POST_BODY_SIZE})\n'
                'wrk.headers["Content-Type"] = "application/octet-stream"\n'
            )
            args += ["-s", str(script)]
        out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    latency: dict[str, float] = {}
    for pct in ("50", "99"):
        found = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)\b", out)
        if found:
            value, unit = float(found.group(1)), found.group(2)
            latency[pct] = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    failed = int(errors.group(1)) if errors else 0
    if socket_errors:
        failed += sum(int(n) for n in socket_errors.groups())
    assert rps is not None, out
    return Measurement(float(rps.group(1)), latency.get("50", 0.0), latency.get("99", 0.0), failed)


async def _client_connection(
    port: int, request: bytes, deadline: float, latencies: list[float]
) -> int:
    """One keep-alive connection sending requests back to back until `deadline`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    errors = 0
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
            length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()
    return errors


def _run_python_client(url_port: int, seconds: int, connections: int, post: bool) -> Measurement:
    if post:
        body = b"p" * POST_BODY_SIZE
        request = b"POST / HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    else:
        request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

    async def run() -> Measurement:
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()
        errors = await asyncio.gather(
            *(
                _client_connection(url_port, request, deadline, latencies)
                for _ in range(connections)
            )
        )
        elapsed = time.perf_counter() - started
        latencies.sort()
        return Measurement(
            len(latencies) / elapsed,
            latencies[len(latencies) // 2] * 1000,
            latencies[int(len(latencies) * 0.99)] * 1000,
            sum(errors),
        )

    return asyncio.run(run())


# -- orchestration -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far (0.0 where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _process(role: str, port: int, upstream_port: int, loop: str) -> Iterator[int]:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    args = [sys.executable, "-m", "bench.http_engine", "--role", role, "--port", str(port)]
    args += ["--upstream-port", str(upstream_port), "--loop", loop]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, cwd=root)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"{role} failed to start")
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--role", choices=("upstream", "engine"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    if args.role:
        _serve_role(args.role, args.port, args.upstream_port, args.loop)
        return {}

    wrk = shutil.which("wrk") if args.client in ("auto", "wrk") else None
    if args.client == "wrk" and wrk is None:
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")

    def measure(port: int, post: bool) -> Measurement:
        if wrk is not None:
            return _run_wrk(wrk, f"http://127.0.0.1:{port}/", args.seconds, args.connections, post)
        return _run_python_client(port, args.seconds, args.connections, post)

    upstream_port, engine_port = _free_port(), _free_port()
    results: dict[str, dict[str, float]] = {}

    def cpu_per_request(pid: int, port: int, post: bool) -> tuple[Measurement, float]:
        before = _cpu_seconds(pid)
        measurement = measure(port, post)
        requests = measurement.rps * args.seconds
        return measurement, (_cpu_seconds(pid) - before) / max(requests, 1.0) * 1e6

    with _process("upstream", upstream_port, 0, "uvloop") as upstream_pid:
        with _process("engine", engine_port, upstream_port, args.loop) as engine_pid:
            for case, post in (("GET 1 KiB answer", False), ("POST 16 KiB body", True)):
                runs: dict[str, list[Measurement]] = {"direct": [], "engine": []}
                # CPU us per request: the upstream's when called directly, the engine's
                cpu: dict[str, list[float]] = {"direct": [], "engine": []}
                measure(engine_port, post)  # warm-up: pooled connections, caches
                for _ in range(args.repeats):
                    for name, pid, port in (
                        ("direct", upstream_pid, upstream_port),
                        ("engine", engine_pid, engine_port),
                    ):
                        measurement, cpu_us = cpu_per_request(pid, port, post)
                        runs[name].append(measurement)
                        cpu[name].append(cpu_us)
                row: dict[str, float] = {}
                for name, measurements in runs.items():
                    row[f"{name}_rps"] = round(statistics.median(m.rps for m in measurements))
                    row[f"{name}_p50_ms"] = round(
                        statistics.median(m.p50_ms for m in measurements), 3
                    )
                    row[f"{name}_p99_ms"] = round(
                        statistics.median(m.p99_ms for m in measurements), 3
                    )
                    row[f"{name}_errors"] = sum(m.errors for m in measurements)
                    row[f"{name}_cpu_us"] = round(statistics.median(cpu[name]), 1)
                row["engine_over_direct"] = round(row["engine_rps"] / row["direct_rps"], 3)
                results[case] = row

    client = "wrk" if wrk else "python asyncio client"
    print(
        f"\nproxy.http engine ({args.loop}) vs direct; {client}, {args.connections} connections, "
        f"{args.seconds}s x {args.repeats} (medians), CPUs: {os.cpu_count()}"
    )
    header = f"{'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'CPU us/req':>11}"
    print(f"  {'case':<18} {'':>8} {header}")
    for case, row in results.items():
        for name in ("direct", "engine"):
            print(
                f"  {case if name == 'direct' else '':<18} {name:>8} {row[f'{name}_rps']:>9.0f} "
                f"{row[f'{name}_p50_ms']:>8.3f} {row[f'{name}_p99_ms']:>8.3f} "
                f"{row[f'{name}_errors']:>7.0f} {row[f'{name}_cpu_us']:>11.1f}"
            )
        print(f"  {'':<18} {'ratio':>8} {row['engine_over_direct']:>9.3f}")
    return results


if __name__ == "__main__":
    main()
