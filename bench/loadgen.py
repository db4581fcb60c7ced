"""Load generators: `hey` at a fixed rate (latency percentiles) and `wrk` flat out
(maximum requests/s), both from Debian; when either is missing, a small asyncio
keep-alive client stands in (run as a subprocess, so it can be pinned like the others).

    python -m bench.loadgen URL --seconds 1 --connections 4 [--rate 1000] [--host H]

prints one JSON object: rps, requests, errors, p50_ms, p90_ms, p99_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from urllib.parse import urlsplit

from bench.common import percentile, run_wrk
from bench.procstat import pinned

Figures = dict[str, float]


def tool(name: str, allowed: str) -> str | None:
    """The binary when it is installed and `allowed` ("auto" or its name) lets us use it."""
    return shutil.which(name) if allowed in ("auto", name) else None


# ---------------------------------------------------------------- hey (fixed rate)


def parse_hey(out: str) -> Figures:
    def num(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else 0.0

    ok = sum(int(n) for n in re.findall(r"\[2\d\d\]\s+(\d+) responses", out))
    all_codes = sum(int(n) for n in re.findall(r"\[\d+\]\s+(\d+) responses", out))
    errors = sum(int(n) for n in re.findall(r"\[(\d+)\]\s+Get ", out))
    return {
        "rps": num(r"Requests/sec:\s+([\d.]+)"),
        "requests": float(ok),
        "errors": float(all_codes - ok + errors),
        **{f"p{p}_ms": num(rf"\s{p}% in ([\d.]+) secs") * 1000 for p in (50, 90, 99)},
    }


def run_hey(
    url: str, *, seconds: float, connections: int, rate: float, host: str, core: int | None
) -> Figures:
    # hey's -q is per worker: the total rate is spread over the connections
    args = [
        "hey", "-z", f"{seconds}s", "-c", str(connections), "-q", f"{rate / connections:g}",
        "-t", "10",
    ]  # fmt: skip
    if host:
        args += ["-host", host]
    out = subprocess.run(
        pinned([*args, url], core), capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    return parse_hey(out)


# ---------------------------------------------------------------- the Python stand-in


async def _connection(
    host: str, port: int, request: bytes, deadline: float, interval: float, lat: list[float]
) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    errors = 0
    next_at = time.perf_counter()
    try:
        while True:
            if interval:
                next_at += interval
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            started = time.perf_counter()
            if started >= deadline:
                return errors
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            if head.startswith(b"HTTP/1.1 2"):
                lat.append(time.perf_counter() - started)
            else:
                errors += 1
    finally:
        writer.close()


async def python_load(
    url: str, seconds: float, connections: int, rate: float, host: str
) -> Figures:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    request = (f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host or parts.netloc}\r\n\r\n").encode()
    interval = connections / rate if rate else 0.0
    lat: list[float] = []
    started = time.perf_counter()
    errors = await asyncio.gather(
        *(
            _connection(parts.hostname, parts.port, request, started + seconds, interval, lat)
            for _ in range(connections)
        )
    )
    elapsed = time.perf_counter() - started
    ms = [x * 1000 for x in lat]
    return {
        "rps": len(lat) / elapsed,
        "requests": float(len(lat)),
        "errors": float(sum(errors)),
        **{f"p{p}_ms": percentile(ms, p) for p in (50, 90, 99)},
    }


def run_python(
    url: str, *, seconds: float, connections: int, rate: float, host: str, core: int | None
) -> Figures:
    args = [sys.executable, "-m", "bench.loadgen", url, "--seconds", str(seconds)]
    args += ["--connections", str(connections), "--rate", str(rate), "--host", host]
    out = subprocess.run(
        pinned(args, core), capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- the two measurements


class LoadGen:
    """Fixed-rate latency (hey) and maximum throughput (wrk), or the Python stand-in."""

    def __init__(self, prefer: str = "auto", core: int | None = None):
        self.hey = tool("hey", prefer)
        self.wrk = tool("wrk", prefer)
        self.core = core

    @property
    def names(self) -> dict[str, str]:
        return {
            "fixed_rate": "hey" if self.hey else "python",
            "max_throughput": "wrk" if self.wrk else "python",
        }

    def fixed_rate(
        self, url: str, *, seconds: float, connections: int, rate: float, host: str = ""
    ) -> Figures:
        run = run_hey if self.hey else run_python
        return run(
            url, seconds=seconds, connections=connections, rate=rate, host=host, core=self.core
        )

    def max_throughput(
        self, url: str, *, seconds: float, connections: int, host: str = ""
    ) -> Figures:
        if self.wrk is None:
            return run_python(
                url, seconds=seconds, connections=connections, rate=0, host=host, core=self.core
            )
        row = run_wrk(
            url,
            seconds=max(1, round(seconds)),
            connections=connections,
            host=host,
            prefix=pinned([], self.core),
        )
        return {**row, "errors": row.get("non_2xx", 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s in total; 0 = flat out")
    ap.add_argument("--host", default="")
    a = ap.parse_args()
    figures = asyncio.run(python_load(a.url, a.seconds, a.connections, a.rate, a.host))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
