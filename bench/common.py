"""Shared benchmark plumbing: a control plane on free ports, wrk, results files, tables."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mesh.servers import ManagedProcess, free_port

# MESH_BENCH_RESULTS sends results elsewhere (the smoke test does, to keep the real ones)
RESULTS = Path(os.environ.get("MESH_BENCH_RESULTS") or Path(__file__).parent / "results")


def ensure_wrk() -> str | None:
    """wrk, installed from Debian if missing (unless MESH_BENCH_INSTALL=0, as in the
    smoke run); None when it cannot be had: then the Python load generator stands in."""
    found = shutil.which("wrk")
    if found or os.environ.get("MESH_BENCH_INSTALL", "1") == "0":
        return found
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True, timeout=300
    )
    found = shutil.which("wrk")
    if not found:
        print("wrk is not installed and `apt-get install wrk` failed: using the Python load")
    return found


def run_wrk(
    url: str,
    *,
    seconds: int,
    connections: int,
    threads: int = 1,
    host: str = "",
    prefix: list[str] | None = None,
) -> dict[str, float]:
    """wrk's figures; `prefix` runs it under another command (e.g. `taskset -c 0`).
    Without wrk, the Python load generator's (same keys)."""
    wrk = ensure_wrk()
    if wrk is None:
        from bench.loadgen import run_python

        row = run_python(
            url, seconds=seconds, connections=connections, rate=0, host=host, core=None
        )
        return {**row, "non_2xx": row.get("errors", 0.0)}
    args = [*(prefix or []), wrk, f"-t{threads}", f"-c{connections}"]
    args += [f"-d{seconds}s", "--latency"]
    if host:
        args += ["-H", f"Host: {host}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    lat = {}
    for pct in ("50", "90", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        if m:
            value, unit = float(m.group(1)), m.group(2)
            lat[f"p{pct}_ms"] = (
                value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
            )
    return {
        "rps": rps,
        "requests": float(total.group(1)) if total else 0.0,
        "non_2xx": float(errors.group(1)) if errors else 0.0,
        **lat,
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n{title}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    sys.stdout.flush()


def temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="meshbench-"))


def serve(work: Path, svc: str, nats_url: str, etcd_url: str) -> tuple[ManagedProcess, int]:
    """`meshctl serve <svc>` started (not yet ready), one replica on `nats_url` and
    `etcd_url` (the CA with a key-encryption key in `work`): its process and HTTP port."""
    port = free_port()
    extra: list[str] = []
    if svc == "ca":
        kek = work / "ca-kek"
        kek.write_text("11" * 32 + "\n")
        kek.chmod(0o600)
        extra = ["--set", f"kek-file={kek}"]
    proc = ManagedProcess(
        svc,
        [sys.executable, "-m", "meshctl.main", "serve", svc, "--nats", nats_url,
         "--etcd", etcd_url, "--http-port", str(port), *extra],
        work / f"{svc}.log",
    )  # fmt: skip
    proc.start()
    return proc, port


def _leads(port: int) -> bool:
    """The service on `port` is ready and, if it elects a leader, leads (it runs alone:
    its election is won); its /healthz says."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            health = json.loads(r.read())
    except (OSError, ValueError):
        return False
    return bool(health.get("ready")) and health.get("leader") is not False


async def until_leading(ports: Iterable[int], timeout: float = 60.0) -> None:
    """Wait until every service on `ports` is ready and leads (what a fixed wait for the
    elections to settle stood for)."""
    deadline = time.monotonic() + timeout
    waiting = list(ports)
    while waiting:
        waiting = [port for port in waiting if not _leads(port)]
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"services on ports {waiting} not leading after {timeout}s")
        await asyncio.sleep(0.05)
