"""The benchmarks keep working: `python -m bench --smoke` runs each with tiny sizes (real
nats-server, etcd, services, sidecars; nginx, hey, wrk and Envoy when installed, else
the Python stand-ins, and the Envoy legs, static and Meshwork on Envoy, skipped with a
printed reason; gRPC through the pairs with the bench's grpcio load generator). Checks shapes and sane values, never
timings. Results go to a temporary directory, not bench/results/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.loadgen import parse_hey
from bench.profile import top_functions
from bench.vs_envoy import table

ROOT = Path(__file__).resolve().parents[2]

HEY_OUTPUT = """
Summary:
  Total:\t1.0011 secs
  Requests/sec:\t998.2

Latency distribution:
  10% in 0.0004 secs
  50% in 0.0007 secs
  90% in 0.0012 secs
  99% in 0.0031 secs

Status code distribution:
  [200]\t995 responses
  [503]\t4 responses
"""


def test_parse_hey() -> None:
    fig = parse_hey(HEY_OUTPUT)
    assert fig["rps"] == 998.2
    assert fig["requests"] == 995
    assert fig["errors"] == 4
    assert fig["p50_ms"] == pytest.approx(0.7)
    assert fig["p99_ms"] == pytest.approx(3.1)


def test_top_functions_from_collapsed_stacks() -> None:
    collapsed = (
        "run (uvloop/__init__.py:1);handle (/work/main/proxy/outbound.py:10);"
        "write (ssl.py:5) 3\n"
        "run (uvloop/__init__.py:1);handle (/work/main/proxy/outbound.py:10) 1\n"
    )
    top = top_functions(collapsed)
    assert top["self"][0] == ("ssl.py:write", 75.0)
    assert ("proxy/outbound.py:handle", 100.0) in top["total"]
    assert not any(f.startswith("uvloop") for f, _ in top["total"])


def test_table_of_a_run_without_envoy_names_what_was_left_out() -> None:
    lat = {"p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0}
    added = {"added_p50_ms": 0.5, "added_p90_ms": 1.0, "added_p99_ms": 1.5}
    run = {
        "rate": 1000.0,
        "direct": {"fixed_rate_c4": lat, "max": {"rps": 9000.0}},
        "ours": {
            "fixed_rate_c4": {**lat, **added, "cpu_s_per_1000": 1.0},
            "max": {"rps": 900.0, "cpu_s_per_1000": 1.0, "rss_peak_mib": 80.0},
            "rss_idle_mib": 75.0,
        },
        "mesh_envoy": {"skipped": "envoy not installed"},
        "grpc": {
            "direct": {"unary": {"rps": 1000.0, **lat}, "stream": {"messages_per_s": 5000.0}},
            "mesh_envoy": {"error": "skipped: no Meshwork-on-Envoy pair in this run"},
        },
    }
    rows = dict(table(run, [4]))
    assert "max req/s, ours" in rows and not any("mesh_envoy:" in k for k in rows)
    assert rows["gRPC mesh_envoy"].startswith("left out: skipped")
    assert rows["gRPC direct: unary calls/s, p50/p90/p99 ms; stream msgs/s"].startswith("1000,")


@pytest.mark.timeout(400)
def test_every_benchmark_runs_small(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MESH_BENCH_RESULTS": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "MESH_BENCH_INSTALL": "0",  # what is missing is stood in for, never installed here
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("vs_envoy", "dataplane", "convergence", "ca", "telemetry", "summary"):
        assert (tmp_path / f"{name}.json").exists(), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["smoke"] is True and summary["machine"]
    assert "ratio" in summary["table"][0] and len(summary["table"]) > 10

    v = summary["vs_envoy"]
    for path in ("direct", "ours"):
        for c in v["connections"]:
            fixed = v[path][f"fixed_rate_c{c}"]
            assert fixed["requests"] > 0 and fixed["p99_ms"] >= fixed["p50_ms"] > 0
        assert v[path]["max"]["rps"] > 0
    assert v["ours"]["rss_idle_mib"] > 10 and v["ours"]["max"]["cpu_s_per_1000"] > 0
    if "envoy" in v:  # Envoy installed: the same figures, and the ratios
        assert v["envoy"]["max"]["rps"] > 0
        r = v["ratios_ours_over_envoy"]
        assert r["max_rps_per_core"] > 0 and r["rss_idle"] > 0
        # Meshwork on Envoy: the same figures, the agents' CPU apart, the issue's goals
        me = v["mesh_envoy"]
        assert me["max"]["rps"] > 0 and me["rss_idle_mib"] > 0
        assert me["max"]["agent_cpu_s"] >= 0 and me["max"]["envoy_cpu_s"] >= 0
        assert me["fixed_rate_c4"]["requests"] > 0
        goals = v["goals_mesh_envoy"]
        assert {"max_rps_per_core", "added_p99_c4", "rss_idle", "agent_cpu_pct_of_envoy_max"} <= (
            goals.keys()
        )
        assert all(g["met"] in (True, False, None) and g["goal"] for g in goals.values())
        assert v["ratios_mesh_envoy_over_envoy"]["rss_idle"] > 0
    else:
        assert v["envoy_version"].startswith("skipped")
        assert "SKIPPING the Envoy leg" in proc.stdout
        assert "SKIPPING Meshwork on Envoy" in proc.stdout
        assert v["mesh_envoy"]["skipped"]

    # gRPC through the pairs: unary and streaming figures, or why a path was left out
    g = v["grpc"]
    for path in ("direct", "ours") + (("envoy",) if "envoy" in v else ()):
        unary, stream = g[path]["unary"], g[path]["stream"]
        assert unary["requests"] > 0 and unary["p99_ms"] >= unary["p50_ms"] > 0, path
        assert stream["messages"] > 0 and stream["messages_per_s"] > 0, path
    if "envoy" in v:
        assert g["ratios_ours_over_envoy"]["unary_rps"] > 0
    # Meshwork on Envoy carries gRPC, or the reason it did not is recorded
    mesh_grpc = g["mesh_envoy"]
    assert mesh_grpc.get("error") or mesh_grpc["unary"]["requests"] > 0
    figures = [row["figure"] for row in summary["table"]]
    assert any(f.startswith("Meshwork on Envoy") for f in figures)
    assert any(f.startswith("gRPC") for f in figures)

    d = summary["dataplane"]
    assert d["sidecar_pair"]["rps"] > 0 and d["direct"]["rps"] > 0
    assert d["telemetry_lag_p50_s"] > 0

    c = summary["convergence"]
    sim = c["simulated"][0]
    assert sim["proxies"] == 10
    assert 0 < sim["applied_p50_ms"] <= sim["synced_p50_ms"]
    assert sim["endpoints_p99_ms"] > 0 and sim["sim_cpu_us_per_proxy_route"] > 0
    assert c["convergence"][0]["synced_p99_ms"] > 0

    ca = summary["ca"]
    assert ca["signing"]["bootstrap_16_in_flight"]["per_s"] > 0
    assert ca["rotation"][0]["sidecar_failures"] == 0

    t = summary["telemetry"]
    assert t["requests_counted_per_s"] > 0 and t["access_records"] == 2 * 2 * 10


@pytest.mark.timeout(60)
def test_scale_bench_runs_small(tmp_path: Path) -> None:
    """`python -m bench.scale --smoke`: a few proxies over two simulator processes,
    through apply -> SYNCED, an endpoint change and a short churn; every proxy ends
    with the registry's set and no change goes unseen."""
    env = {**os.environ, "MESH_BENCH_RESULTS": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "scale.json").read_text())
    assert result["smoke"] is True
    [size] = result["sizes"]
    assert "failed" not in size, size
    assert size["proxies"] == 6 and size["processes"] == 2
    assert 0 < size["applied_p50_ms"] <= size["synced_p99_ms"]
    assert size["endpoints_p99_ms"] > 0 and size["nats_out_msgs_per_update"] >= 6
    [churn] = result["churn"]
    assert churn["changes"] == 10 and churn["never_seen"] == 0
    assert churn["proxies_with_registry_set"] == churn["proxies"] == 4
    assert churn["final_instances"] >= 1 and churn["endpoint_sets_published"] >= 1
