"""A quick gRPC loop (well under a minute) for work on the Python HTTP/2 path: the
gRPC app, our sidecar pair in front of it (mTLS, telemetry on, `--app-protocol grpc`)
and, when Envoy is installed, the static Envoy pair set up for HTTP/2, all in one run;
unary calls through each path, rotating, then the ratios ours / Envoy and ours / direct
from that same run (figures from different runs do not compare on a shared machine).

    python -m bench.grpc_pair [--seconds 3] [--repeats 2] [--concurrency 16]
        [--stream] [--no-envoy] [--profile SECONDS] [--baseline TREE]

`--baseline TREE` adds a second sidecar pair ("base") run from another source tree
(e.g. /work/main, the code before a change), loaded in the same rotation: on a shared
machine, ours / base from one run is the figure that says what a change did.

`--profile S` also records both sidecars with py-spy for S seconds under unary load
and prints the functions with the most samples (bench.profile's summary); the
collapsed stacks go to bench/results/grpc-profile-<side>.txt. The full comparison,
with streaming and Meshwork on Envoy, is `python -m bench.vs_envoy`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from pathlib import Path

from bench.common import RESULTS, median, print_rows, temp_dir
from bench.dataplane import PY, Cluster, start, wait_until
from bench.envoy import find_envoy, obtain_certs, start_pair
from bench.grpc_load import run_load
from bench.procstat import can_pin, cpu_seconds, pin, pinned, rss_mib
from bench.profile import find_py_spy, top_functions
from bench.vs_envoy import LOAD_CORE, PROXY_CORE
from mesh.servers import ManagedProcess, free_port, http_ok


def _sidecar_from(cluster: Cluster, tree: str, name: str, args: list[str]) -> tuple[str, int]:
    """A sidecar run from the source tree `tree` (its admin URL and pid)."""
    admin = free_port()
    service = args[args.index("--service") + 1]
    boot = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
            "runpy.run_module('meshctl.main', run_name='__main__', alter_sys=True)")  # fmt: skip
    proc = ManagedProcess(
        name,
        [PY, "-c", boot, tree, *cluster.common, "sidecar", *args, "--admin-port", str(admin),
         "--token", cluster.token(service)],
        cluster.work / f"{name}.log",
    )  # fmt: skip
    proc.start()
    cluster.procs.append(proc)
    return f"http://127.0.0.1:{admin}", proc.pid


def _profile(pids: dict[str, int], seconds: int, target: str, authority: str,
             concurrency: int, core: int | None) -> dict[str, object]:  # fmt: skip
    py_spy = find_py_spy()
    if py_spy is None:
        return {"skipped": "py-spy not installed"}
    spies = {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for side, pid in pids.items():
        out = RESULTS / f"grpc-profile-{side}.txt"
        cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200"]
        cmd += ["--format", "raw", "--nonblocking", "-o", str(out)]
        spies[side] = (out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE))  # fmt: skip
    load: dict[str, float] = {}

    def drive() -> None:
        load.update(run_load("unary", target, authority=authority, seconds=seconds + 1,
                             concurrency=concurrency, core=core))  # fmt: skip

    driver = threading.Thread(target=drive)
    driver.start()
    result: dict[str, object] = {}
    for side, (out, proc) in spies.items():
        _, err = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"py-spy failed on the {side} sidecar: {err.decode()[-500:]}")
        result[side] = top_functions(out.read_text(), limit=25)
    driver.join()
    result["rps"] = load.get("rps", 0.0)
    return result


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--stream", action="store_true", help="server streaming too")
    ap.add_argument("--no-envoy", action="store_true")
    ap.add_argument("--profile", type=int, default=0, help="py-spy both sidecars for S s")
    ap.add_argument("--baseline", default="", help="a source tree for a second pair, 'base'")
    args = ap.parse_args(argv)
    pinning = can_pin()
    proxy_core = PROXY_CORE if pinning else None
    load_core = LOAD_CORE if pinning else None
    envoy_bin = None if args.no_envoy else find_envoy()
    cluster = Cluster(temp_dir(), ("registry", "config", "telemetry", "ca"))
    envoy = None
    try:
        work: Path = cluster.work
        app_port = free_port()
        cluster.procs.append(start("grpc-app", pinned([sys.executable, "-m", "bench.grpc_load",
                                   "serve", str(app_port)], load_core), work))  # fmt: skip
        outbound = free_port()
        server_admin, server = cluster.sidecar(
            "grpc-app-sidecar",
            ["--service", "grpcapp", "--app-port", str(app_port), "--app-protocol", "grpc"],
            True,
        )
        client_admin, client = cluster.sidecar(
            "client-sidecar",
            ["--service", "client", "--app-port", "9", "--outbound-port", str(outbound)],
            True,
        )
        wait_until(lambda: http_ok(f"{server_admin}/ready") and http_ok(f"{client_admin}/ready"),
                   "sidecars ready")  # fmt: skip
        if proxy_core is not None:
            pin(server.pid, proxy_core)
            pin(client.pid, proxy_core)
        paths: dict[str, tuple[str, str]] = {
            "direct": (f"127.0.0.1:{app_port}", ""),
            "ours": (f"127.0.0.1:{outbound}", "grpcapp"),
        }
        pids: dict[str, list[int]] = {"direct": [], "ours": [server.pid, client.pid]}
        if args.baseline:
            base_out = free_port()
            base_admins = [
                _sidecar_from(cluster, args.baseline, "base-app-sidecar",
                    ["--service", "grpcbase", "--app-port", str(app_port), "--app-protocol",
                     "grpc"]),
                _sidecar_from(cluster, args.baseline, "base-client-sidecar",
                    ["--service", "baseclient", "--app-port", "9", "--outbound-port",
                     str(base_out)]),
            ]  # fmt: skip
            wait_until(lambda: all(http_ok(f"{a}/ready") for a, _ in base_admins),
                       "baseline sidecars ready")  # fmt: skip
            paths["base"] = (f"127.0.0.1:{base_out}", "grpcbase")
            pids["base"] = [pid for _, pid in base_admins]
            for pid in pids["base"]:
                if proxy_core is not None:
                    pin(pid, proxy_core)
        if envoy_bin is not None:
            certs = work / "envoy-certs"
            srv = obtain_certs(cluster.nats.url, cluster.token("app"), "app", certs)
            cli = obtain_certs(cluster.nats.url, cluster.token("client"), "client", certs)
            envoy = start_pair(envoy_bin, work, app_port, cli, srv, core=proxy_core, h2=True)
            paths["envoy"] = (f"127.0.0.1:{envoy.port}", "")
            pids["envoy"] = envoy.pids
        for target, authority in paths.values():  # warm up: connections, routes, TLS
            run_load("unary", target, authority=authority, seconds=1, concurrency=args.concurrency,
                     core=load_core)  # fmt: skip
        rss = {"ours_server_mib": rss_mib([server.pid]), "ours_client_mib": rss_mib([client.pid])}
        if "base" in pids:
            rss["base_pair_mib"] = rss_mib(pids["base"])
        if envoy is not None:
            rss["envoy_pair_mib"] = rss_mib(envoy.pids)
        kinds = ("unary", "stream") if args.stream else ("unary",)
        rows: dict[str, dict[str, list[dict[str, float]]]] = {
            k: {n: [] for n in paths} for k in kinds
        }
        names = list(paths)
        for i in range(args.repeats):
            for kind in kinds:
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    target, authority = paths[name]
                    conc = args.concurrency if kind == "unary" else 4
                    before = cpu_seconds(pids[name])
                    row = run_load(kind, target, authority=authority, seconds=args.seconds,
                                   concurrency=conc, core=load_core)  # fmt: skip
                    if pids[name]:  # the pair's CPU per 1,000 calls (or messages)
                        done = row.get("requests") or row.get("messages") or 1.0
                        row["cpu_s_per_1000"] = (cpu_seconds(pids[name]) - before) * 1000 / done
                    rows[kind][name].append(row)
        result: dict[str, object] = {"rss_idle": rss}
        for kind in kinds:
            fig = {
                n: {k: round(median([r[k] for r in rs]), 3) for k in rs[0]}
                for n, rs in rows[kind].items()
            }
            result[kind] = fig
            key = "rps" if kind == "unary" else "messages_per_s"
            for other in ("direct", "envoy", "base"):
                if other in fig and fig[other][key] > 0:
                    result[f"{kind}_{key}_ours_over_{other}"] = round(
                        fig["ours"][key] / fig[other][key], 3
                    )
            for other in ("envoy", "base"):
                if other in fig and fig[other]["cpu_s_per_1000"] > 0:
                    result[f"{kind}_cpu_per_call_ours_over_{other}"] = round(
                        fig["ours"]["cpu_s_per_1000"] / fig[other]["cpu_s_per_1000"], 3
                    )
        if args.profile:
            result["profile"] = _profile(
                {"client": client.pid, "server": server.pid}, args.profile, *paths["ours"],
                args.concurrency, load_core,
            )  # fmt: skip
        table = [(f"{k}", json.dumps(v)) for k, v in result.items() if k != "profile"]
        print_rows(f"gRPC quick loop, {args.seconds}s x {args.repeats} (medians)", table)
        prof = result.get("profile")
        if isinstance(prof, dict) and "client" in prof:
            for side in ("client", "server"):
                top: dict[str, list[tuple[str, float]]] = prof[side]
                print_rows(
                    f"py-spy, {side} sidecar, unary load ({prof['rps']:.0f} calls/s)",
                    [(f"self  {f}", f"{p}%") for f, p in top["self"]]
                    + [(f"total {f}", f"{p}%") for f, p in top["total"]],
                )
        return result
    finally:
        if envoy is not None:
            envoy.stop()
        cluster.stop()


if __name__ == "__main__":
    main()
