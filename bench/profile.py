"""Where a sidecar's time goes under load: py-spy samples both sidecars of a pair
(mTLS, telemetry on, nginx behind) while wrk drives it flat out, then prints the
functions with the most samples, self (the frame on top) and total (anywhere on the
stack). Without `--native`, time in C (uvloop's event loop and its TLS, the ssl
module, syscalls) is charged to the Python frame that called it: `Runner.run` self
time is the event loop's own work.

    python -m bench.profile [--seconds 10] [--native] [--dataplane envoy]
        [--envoy-telemetry access-log|stats] [--rate R]

Writes, per sidecar (`client`, `app`): bench/results/profile-<side>.txt, py-spy's
collapsed stacks (open it in https://www.speedscope.app or feed it to flamegraph.pl),
and bench/results/profile.json with the top functions. `--dataplane envoy` profiles
the two agents of a Meshwork-on-Envoy pair instead (`bench.mesh_envoy`; Envoy carries
the traffic, the agents serve xDS and take its access logs and spans):
profile-envoy-agent-<side>.txt and profile_envoy_agents.json. `--envoy-telemetry`
picks the agents' telemetry mode (docs/architecture.md §7; default: the agents'
default), `--rate R` drives the pair at R requests/s (hey) instead of flat out, where
an agent's fixed per-second work shows (stats mode).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench import mesh_envoy
from bench.common import RESULTS, print_rows, temp_dir, write_result
from bench.dataplane import Cluster
from bench.loadgen import LoadGen
from bench.nginx import start_upstream
from bench.procstat import can_pin, cpu_seconds, pin
from bench.vs_envoy import start_our_pair


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def frame_name(frame: str) -> str:
    """`handle (proxy/outbound.py:120)` -> `proxy/outbound.py:handle`."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0].rstrip(")")
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{name}" if path else name


# the frames every sample shares (process start, event loop): uninformative as "total"
ROOTS = ("<frozen runpy>", "meshctl/main.py", "meshctl/sidecar_cmds.py", "uvloop/__init__.py")


def top_functions(collapsed: str, limit: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Self and total shares (% of samples) per function from collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [frame_name(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            if not f.startswith(ROOTS) and f != "asyncio/runners.py:Runner.run":
                total[f] += n
    if not samples:
        return {"self": [], "total": []}

    def share(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100 * n / samples, 1)) for f, n in c.most_common(limit)]

    return {"self": share(own), "total": share(total), "samples": [("all", samples)]}


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--native", action="store_true", help="C frames too (uvloop, ssl)")
    ap.add_argument("--dataplane", choices=("python", "envoy"), default="python")
    ap.add_argument("--envoy-telemetry", choices=("access-log", "stats"), default=None)
    ap.add_argument("--rate", type=float, default=0, help="requests/s; 0 = flat out (wrk)")
    args = ap.parse_args(argv)
    py_spy = find_py_spy()
    if py_spy is None:
        print("bench.profile: SKIPPED: py-spy is not installed (pip install 'meshwork[bench]')")
        return {"skipped": "py-spy not installed"}
    pinning = can_pin()
    load = LoadGen("auto", 0 if pinning else None)
    cluster = Cluster(temp_dir(), ("registry", "config", "telemetry", "ca"))
    envoys: list[int] = []
    on_envoy: mesh_envoy.MeshEnvoyPair | None = None
    try:
        kind, app_port, upstream = start_upstream(cluster.work, core=0 if pinning else None)
        cluster.procs.append(upstream)
        if args.dataplane == "envoy":
            extra = ("--envoy-telemetry", args.envoy_telemetry) if args.envoy_telemetry else ()
            on_envoy = mesh_envoy.start_pair(
                cluster, app_port, service="app", client="client", extra=extra
            )
            envoys = on_envoy.envoy_pids
            url, host = f"http://127.0.0.1:{on_envoy.outbound}/", on_envoy.host
            profiled, pinned = on_envoy.agent_pids, on_envoy.pids
            prefix, name = "profile-envoy-agent-", "profile_envoy_agents"
        else:
            ours = start_our_pair(cluster, app_port)
            url, host, profiled, pinned = ours.url, ours.host, ours.pids, ours.pids
            prefix, name = "profile-", "profile"
        if pinning:
            for pid in pinned:
                pin(pid, 1)
        load.max_throughput(url, seconds=1, connections=args.connections, host=host)
        RESULTS.mkdir(parents=True, exist_ok=True)
        spies = {}
        for side, pid in zip(("app", "client"), profiled, strict=True):
            out = RESULTS / f"{prefix}{side}.txt"
            cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(args.seconds)]
            cmd += ["--rate", "200", "--format", "raw", "--nonblocking", "-o", str(out)]
            cmd += ["--native"] if args.native else []
            spies[side] = (
                out,
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
            )
        before = cpu_seconds(profiled), cpu_seconds(envoys)
        if args.rate:
            row = load.fixed_rate(
                url,
                seconds=args.seconds + 1,
                connections=args.connections,
                rate=args.rate,
                host=host,
            )
        else:
            row = load.max_throughput(
                url, seconds=args.seconds + 1, connections=args.connections, host=host
            )
        result: dict[str, object] = {"upstream": kind, "loadgen": load.names, "rps": row["rps"]}
        result["dataplane"] = args.dataplane
        result["rate"] = args.rate or "flat out"
        if args.envoy_telemetry:
            result["envoy_telemetry"] = args.envoy_telemetry
        if envoys:
            agents, envoy = cpu_seconds(profiled) - before[0], cpu_seconds(envoys) - before[1]
            result["agent_cpu_s"], result["envoy_cpu_s"] = round(agents, 2), round(envoy, 2)
            result["agent_cpu_pct_of_envoy"] = round(100 * agents / envoy, 1) if envoy else None
        for side, (out, proc) in spies.items():
            _, err = proc.communicate(timeout=args.seconds + 60)
            if proc.returncode != 0 or not out.exists():
                raise SystemExit(f"py-spy failed on the {side} sidecar: {err.decode()[-500:]}")
            result[side] = top_functions(out.read_text())
        write_result(name, result)
        driven = f"{args.rate:g} req/s" if args.rate else "wrk flat out"
        for side in ("client", "app"):
            top: dict[str, list[tuple[str, float]]] = result[side]  # type: ignore[assignment]
            rows = [(f"self  {f}", f"{pct}%") for f, pct in top["self"][:12]]
            rows += [(f"total {f}", f"{pct}%") for f, pct in top["total"][:12]]
            print_rows(
                f"py-spy, {side} {'agent' if envoys else 'sidecar'}, {driven} "
                f"({row['rps']:.0f} req/s); stacks in bench/results/{prefix}{side}.txt",
                rows,
            )
        return result
    finally:
        cluster.stop()
        if on_envoy is not None:
            on_envoy.stop_envoys()


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
