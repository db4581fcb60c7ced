"""`make bench`: every benchmark, then one summary table and bench/results/summary.json.

    python -m bench [--smoke]

`--smoke` runs each with tiny sizes (a second or less of load, 10 simulated proxies),
to check that they work, not to measure: `tests/integration/test_bench_smoke.py` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

from bench import ca, convergence, dataplane, profile, telemetry, vs_envoy
from bench.common import RESULTS, write_result

FULL: dict[str, list[str]] = {
    "vs_envoy": ["--seconds", "5", "--repeats", "3"],
    "dataplane": ["--seconds", "5", "--repeats", "3"],
    "convergence": ["--proxies", "10", "--simulated", "10,100,1000", "--repeats", "20"],
    "ca": [],
    "telemetry": [],
    "profile": ["--seconds", "10"],
}
SMOKE: dict[str, list[str]] = {
    "vs_envoy": [
        "--seconds",
        "0.5",
        "--repeats",
        "1",
        "--connections",
        "4",
        "--grpc-concurrency",
        "4",
        "--stream-concurrency",
        "2",
    ],
    "dataplane": ["--seconds", "1", "--repeats", "1", "--lag-samples", "2"],
    "convergence": [
        "--proxies",
        "2",
        "--simulated",
        "10",
        "--repeats",
        "2",
        "--samples",
        "5",
        "--up-replicas",
        "0",
    ],
    "ca": ["--sidecars", "3", "--sign-seconds", "0.3", "--only", "spread_0s"],
    "telemetry": ["--proxies", "2", "--rounds", "2", "--requests", "10"],
    "profile": [],  # py-spy is not part of the smoke: its parsing is unit-tested
}
MAINS = {
    "vs_envoy": vs_envoy.main,
    "dataplane": dataplane.main,
    "convergence": convergence.main,
    "ca": ca.main,
    "telemetry": telemetry.main,
    "profile": profile.main,
}

Row = tuple[str, str, str, str, str]  # figure, ratio, ours, reference, goal


def fmt(x: object, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def dataplane_rows(v: dict[str, Any], d: dict[str, Any]) -> list[Row]:
    """Our Python pair against the static Envoy pair; goals from issue 15 (requests/s
    per core >= 0.55x, added p99 <= 2x, memory <= 1.0x)."""
    rows: list[Row] = []
    r = v.get("ratios_ours_over_envoy") or {}
    ours, env = v["ours"], v.get("envoy")
    ref = "envoy" if env else "(no envoy)"
    for c in v["connections"]:
        for pct in ("p50", "p90", "p99"):
            key = f"fixed_rate_c{c}"
            rows.append((
                f"added {pct} ms, {v['rate']:.0f} req/s, {c} conns (ours / {ref})",
                fmt(r.get(f"added_{pct}_c{c}")),
                fmt(ours[key][f"added_{pct}_ms"]),
                fmt(env[key][f"added_{pct}_ms"]) if env else "-",
                "<= 2" if pct == "p99" else "",
            ))  # fmt: skip
    rows.append((
        "max req/s, pair pinned to one core" if v["pinned"] else "max req/s, pair (not pinned)",
        fmt(r.get("max_rps_per_core")), fmt(ours["max"]["rps"], 0),
        fmt(env["max"]["rps"], 0) if env else "-", ">= 0.55",
    ))  # fmt: skip
    top = f"fixed_rate_c{max(v['connections'])}"
    rows.append((
        f"CPU s per 1,000 requests at {v['rate']:.0f} req/s (pair)",
        fmt(r.get("cpu_s_per_1000_fixed_rate")), fmt(ours[top]["cpu_s_per_1000"], 3),
        fmt(env[top]["cpu_s_per_1000"], 3) if env else "-", "",
    ))  # fmt: skip
    rows.append((
        "CPU s per 1,000 requests flat out (pair)",
        fmt(r.get("cpu_s_per_1000_max")), fmt(ours["max"]["cpu_s_per_1000"], 3),
        fmt(env["max"]["cpu_s_per_1000"], 3) if env else "-", "",
    ))  # fmt: skip
    rows.append((
        "RSS MiB idle (pair)", fmt(r.get("rss_idle")), fmt(ours["rss_idle_mib"], 1),
        fmt(env["rss_idle_mib"], 1) if env else "-", "<= 1.0",
    ))  # fmt: skip
    rows.append((
        "RSS MiB under load (pair)", fmt(r.get("rss_under_load")),
        fmt(ours["max"]["rss_peak_mib"], 1), fmt(env["max"]["rss_peak_mib"], 1) if env else "-",
        "<= 1.0",
    ))  # fmt: skip
    rows.append((
        "max req/s, our pair / direct (wrk, 16 conns, not pinned)",
        fmt(d["rps_ratio_sidecar_over_direct"], 3), fmt(d["sidecar_pair"]["rps"], 0),
        fmt(d["direct"]["rps"], 0), "",
    ))  # fmt: skip
    rows.append((
        "req/s telemetry on / off (A/B, side by side)",
        fmt(d["ab_rps_ratio_telemetry_on_over_off"], 3), fmt(d["ab"]["telemetry"]["rps"], 0),
        fmt(d["ab"]["no_telemetry"]["rps"], 0), "",
    ))  # fmt: skip
    return rows


def mesh_envoy_rows(v: dict[str, Any]) -> list[Row]:
    """Meshwork on Envoy against the static Envoy pair, with issue 14's goals."""
    goals = v.get("goals_mesh_envoy")
    if not goals:
        reason = (v.get("mesh_envoy") or {}).get("skipped", "not run")
        return [("Meshwork on Envoy / static Envoy pair", "-", f"skipped: {reason}", "-", "")]
    me, env = v["mesh_envoy"], v["envoy"]
    top = f"fixed_rate_c{max(v['connections'])}"

    def verdict(key: str) -> str:
        g = goals[key]
        return f"{g['goal']} ({'met' if g['met'] else 'NOT met'})"

    rows: list[Row] = [(
        "Meshwork on Envoy: max req/s, pair pinned to one core (/ static Envoy)",
        fmt(goals["max_rps_per_core"]["value"]), fmt(me["max"]["rps"], 0),
        fmt(env["max"]["rps"], 0), verdict("max_rps_per_core"),
    )]  # fmt: skip
    for c in v["connections"]:
        key = f"fixed_rate_c{c}"
        rows.append((
            f"Meshwork on Envoy: added p99 ms, {v['rate']:.0f} req/s, {c} conns (/ static Envoy)",
            fmt(goals[f"added_p99_c{c}"]["value"]), fmt(me[key]["added_p99_ms"]),
            fmt(env[key]["added_p99_ms"]), verdict(f"added_p99_c{c}"),
        ))  # fmt: skip
    rows.append((
        "Meshwork on Envoy: RSS MiB idle, 2 agents + 2 Envoys (/ 2 static Envoys)",
        fmt(goals["rss_idle"]["value"]), fmt(me["rss_idle_mib"], 1),
        fmt(env["rss_idle_mib"], 1), verdict("rss_idle"),
    ))  # fmt: skip
    rows.append((
        "Meshwork on Envoy: RSS MiB under load (/ static Envoys)",
        fmt(goals["rss_under_load"]["value"]), fmt(me["max"]["rss_peak_mib"], 1),
        fmt(env["max"]["rss_peak_mib"], 1), verdict("rss_under_load"),
    ))  # fmt: skip
    for key, row, label in (("fixed_rate", me[top], f"at {v['rate']:.0f} req/s"),
                            ("max", me["max"], "flat out")):  # fmt: skip
        rows.append((
            f"Meshwork on Envoy: agent CPU, % of its Envoy's, {label} (ratio: / 100)",
            fmt(row["agent_cpu_pct_of_envoy"] / 100, 3),
            f"{row['agent_cpu_s']:.2f} s", f"Envoys {row['envoy_cpu_s']:.2f} s",
            verdict(f"agent_cpu_pct_of_envoy_{key}"),
        ))  # fmt: skip
    return rows


def grpc_rows(v: dict[str, Any]) -> list[Row]:
    """gRPC unary and streaming through the pairs, over the static Envoy pair's."""
    g = v.get("grpc")
    if not g:
        return []
    env = g.get("envoy") or {}
    ref = "envoy" if "unary" in env else "(no envoy)"
    rows: list[Row] = []
    for name, label in (("ours", "our pair"), ("mesh_envoy", "Meshwork on Envoy")):
        fig = g.get(name) or {}
        if "unary" not in fig:
            err = fig.get("error", "not run")
            rows.append((f"gRPC through {label}", "-", f"left out: {err}"[:120], "-", ""))
            continue
        r = g.get(f"ratios_{name}_over_envoy") or {}
        u, s = fig["unary"], fig["stream"]
        c = g["concurrency"]
        rows += [
            (f"gRPC unary calls/s, {c} in flight, {label} (/ {ref})", fmt(r.get("unary_rps")),
             fmt(u["rps"], 0), fmt(env["unary"]["rps"], 0) if ref == "envoy" else "-", ""),
            (f"gRPC unary p99 ms, {c} in flight, {label} (/ {ref})", fmt(r.get("unary_p99")),
             fmt(u["p99_ms"]), fmt(env["unary"]["p99_ms"]) if ref == "envoy" else "-", ""),
            (f"gRPC server-stream msgs/s, {g['stream_concurrency']} streams, {label} (/ {ref})",
             fmt(r.get("stream_messages_per_s")), fmt(s["messages_per_s"], 0),
             fmt(env["stream"]["messages_per_s"], 0) if ref == "envoy" else "-", ""),
        ]  # fmt: skip
    d = g.get("direct") or {}
    if "unary" in d:
        rows.append((
            "gRPC direct (no proxy): unary calls/s; stream msgs/s", "",
            f"{d['unary']['rps']:.0f}; {d['stream']['messages_per_s']:.0f}", "", "",
        ))  # fmt: skip
    return rows


def control_rows(
    c: dict[str, Any], a: dict[str, Any], t: dict[str, Any], d: dict[str, Any]
) -> list[Row]:
    rows: list[Row] = []
    for s in c["simulated"]:
        n = s["proxies"]
        goal = "< 100 ms" if n >= 1000 else ""
        rows.append((
            f"apply -> {n} simulated proxies SYNCED p50 / p99 ms (ratio: p99 / 100 ms)",
            fmt(s["synced_p99_ms"] / 100), f"{s['synced_p50_ms']} / {s['synced_p99_ms']}",
            f"last report {s['reported_p50_ms']} / {s['reported_p99_ms']}", goal,
        ))  # fmt: skip
        rows.append((
            f"endpoint change -> {n} simulated proxies p50 / p99 ms", "",
            f"{s['endpoints_p50_ms']} / {s['endpoints_p99_ms']}", "", "",
        ))  # fmt: skip
    for s in c["convergence"]:
        rows.append((
            f"apply -> {s['proxies']} real sidecars SYNCED p50 / p99 ms", "",
            f"{s['synced_p50_ms']} / {s['synced_p99_ms']}", "", "",
        ))  # fmt: skip
    reg = c["registry_event"]
    rows.append(("register -> endpoint event p50 / p99 ms", "",
                 f"{reg['p50_ms']} / {reg['p99_ms']}", "", ""))  # fmt: skip
    sign = a["signing"]
    for name in ("bootstrap_16_in_flight", "renewal_16_in_flight"):
        if name in sign:
            rows.append((f"CA signs/s, one replica, {name.replace('_', ' ')}", "",
                         fmt(sign[name]["per_s"], 0), "", ""))  # fmt: skip
    for rot in a["rotation"]:
        rows.append((
            f"CA rotate-root -> {rot['sidecars']} sidecars renewed, s (spread "
            f"{rot['rotate_spread_s']:g}s)", "", fmt(rot["request_to_all_moved_s"]), "", "",
        ))  # fmt: skip
    if "telemetry_lag_p50_s" in d:
        lag = f"{d['telemetry_lag_p50_s']} / {d['telemetry_lag_max_s']}"
        rows.append(("request -> counted on telemetry /metrics, p50 / max s", "", lag, "", ""))
    rows.append(("telemetry ingest, one replica: requests counted/s", "",
                 fmt(t["requests_counted_per_s"]), "", ""))  # fmt: skip
    rows.append(("telemetry ingest, one replica: access records/s", "",
                 fmt(t["access_records_per_s"]), "", ""))  # fmt: skip
    return rows


def print_table(title: str, rows: list[Row]) -> None:
    head: Row = ("figure", "ratio", "ours", "reference", "goal")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    order = (1, 2, 3, 4, 0)  # the ratio columns first
    print(f"\n{title}")
    for r in [head, *rows]:
        print("  " + "  ".join(f"{r[i]:<{widths[i]}}" for i in order).rstrip())
    sys.stdout.flush()


def machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores {model}, {platform.system()} {platform.release()}".strip()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check they work")
    ap.add_argument("--only", default="", help="comma list of benchmarks (default: all)")
    args = ap.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    wanted = [b for b in plan if not args.only or b in args.only.split(",")]
    if args.smoke:
        wanted = [b for b in wanted if b != "profile"]
    out: dict[str, Any] = {"machine": machine(), "smoke": args.smoke}
    for name in wanted:
        print(f"\n=== bench.{name} {' '.join(plan[name])}", flush=True)
        out[name] = MAINS[name](plan[name])
    for name in plan:  # with --only: the others' latest results, for the summary
        if name not in out and (RESULTS / f"{name}.json").exists():
            out[name] = json.loads((RESULTS / f"{name}.json").read_text())
    rows: list[Row] = []
    if "vs_envoy" in out and "dataplane" in out:
        rows += dataplane_rows(out["vs_envoy"], out["dataplane"])
    if "vs_envoy" in out:
        rows += mesh_envoy_rows(out["vs_envoy"]) + grpc_rows(out["vs_envoy"])
    if all(k in out for k in ("convergence", "ca", "telemetry", "dataplane")):
        rows += control_rows(out["convergence"], out["ca"], out["telemetry"], out["dataplane"])
    out["table"] = [dict(zip(("figure", "ratio", "ours", "reference", "goal"), r, strict=True))
                    for r in rows]  # fmt: skip
    write_result("summary", out)
    if rows:
        print_table(f"summary (bench/results/summary.json), {out['machine']}", rows)
    return out


if __name__ == "__main__":
    main()
