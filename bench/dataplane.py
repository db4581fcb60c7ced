"""Data plane: requests/s and latency, client -> app directly (baseline) vs client ->
client sidecar -> server sidecar -> app, measured with wrk in the same run.

    python -m bench.dataplane [--seconds 5] [--connections 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

from bench.common import median, print_rows, run_wrk, temp_dir, write_result
from mesh.servers import EtcdServer, ManagedProcess, NatsServer, free_port, http_ok


def start(name: str, args: list[str], logs: Path) -> ManagedProcess:
    proc = ManagedProcess(name, args, logs / f"{name}.log")
    proc.start()
    return proc


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    work = temp_dir()
    nats = NatsServer(work / "nats").start()
    etcd = EtcdServer(work / "etcd").start()
    procs: list[ManagedProcess] = []
    py = sys.executable
    common = ["--nats", nats.url]
    try:
        for svc in ("registry", "config"):
            port = free_port()
            procs.append(
                start(
                    svc,
                    [
                        py,
                        "-m",
                        "mesh.cli.main",
                        "serve",
                        svc,
                        *common,
                        "--etcd",
                        etcd.url,
                        "--http-port",
                        str(port),
                    ],
                    work,
                )
            )
            deadline = time.monotonic() + 30
            while not http_ok(f"http://127.0.0.1:{port}/readyz"):
                if time.monotonic() > deadline:
                    raise SystemExit(f"{svc} did not start")
                time.sleep(0.05)
        app_port, outbound, admin_c, admin_s = free_port(), free_port(), free_port(), free_port()
        procs.append(start("upstream", [py, "-m", "bench.upstream", str(app_port)], work))
        procs.append(
            start(
                "server-sidecar",
                [
                    py,
                    "-m",
                    "mesh.cli.main",
                    *common,
                    "sidecar",
                    "--service",
                    "app",
                    "--version",
                    "v1",
                    "--app-port",
                    str(app_port),
                    "--admin-port",
                    str(admin_s),
                ],
                work,
            )
        )
        procs.append(
            start(
                "client-sidecar",
                [
                    py,
                    "-m",
                    "mesh.cli.main",
                    *common,
                    "sidecar",
                    "--service",
                    "client",
                    "--app-port",
                    "9",
                    "--outbound-port",
                    str(outbound),
                    "--admin-port",
                    str(admin_c),
                ],
                work,
            )
        )
        deadline = time.monotonic() + 30
        while not (
            http_ok(f"http://127.0.0.1:{admin_s}/ready")
            and http_ok(f"http://127.0.0.1:{admin_c}/ready")
        ):
            if time.monotonic() > deadline:
                raise SystemExit("sidecars did not become ready")
            time.sleep(0.05)
        # first request: the client sidecar learns the destination
        req = urllib.request.Request(f"http://127.0.0.1:{outbound}/", headers={"Host": "app"})
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("no route through the sidecars")
            time.sleep(0.1)
        direct, meshed = [], []
        for _ in range(args.repeats):
            direct.append(
                run_wrk(
                    f"http://127.0.0.1:{app_port}/",
                    seconds=args.seconds,
                    connections=args.connections,
                )
            )
            meshed.append(
                run_wrk(
                    f"http://127.0.0.1:{outbound}/",
                    seconds=args.seconds,
                    connections=args.connections,
                    host="app",
                )
            )

        def med(rows: list[dict[str, float]], key: str) -> float:
            return median([r.get(key, 0.0) for r in rows])

        result = {
            "connections": args.connections,
            "seconds": args.seconds,
            "repeats": args.repeats,
            "direct": {k: med(direct, k) for k in ("rps", "p50_ms", "p90_ms", "p99_ms")},
            "sidecar_pair": {
                k: med(meshed, k) for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "non_2xx")
            },
        }
        result["rps_ratio_sidecar_over_direct"] = round(
            result["sidecar_pair"]["rps"] / result["direct"]["rps"], 3
        )  # type: ignore[index]
        for p in ("p50_ms", "p99_ms"):
            result[f"added_{p}"] = round(result["sidecar_pair"][p] - result["direct"][p], 3)  # type: ignore[index]
        write_result("dataplane", result)
        print_rows(
            f"data plane: wrk, {args.connections} connections, "
            f"{args.seconds}s x {args.repeats} (medians)",
            [
                ("direct requests/s", f"{result['direct']['rps']:.0f}"),  # type: ignore[index]
                ("sidecar pair requests/s", f"{result['sidecar_pair']['rps']:.0f}"),  # type: ignore[index]
                ("ratio sidecar/direct", f"{result['rps_ratio_sidecar_over_direct']}"),
                ("added p50 / p99 ms", f"{result['added_p50_ms']} / {result['added_p99_ms']}"),
            ],
        )
        return result
    finally:
        for p in reversed(procs):
            p.stop(timeout=5)
        etcd.stop()
        nats.stop()


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
