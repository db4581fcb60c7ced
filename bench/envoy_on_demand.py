"""Envoy on demand (`--envoy-on-demand`, VHDS) against following every service: one
client sidecar on Envoy whose app calls 1 service, with 1 and 1,000 services in the
registry.

For each (services, mode): the client sidecar's start (process start until its admin
`/ready`), its Envoy's RSS once started and after the first call, the clusters Envoy
holds, and the cost of on demand on the first request: the first call's latency over
the median of warmed calls (a ratio, on this machine, not a threshold).

    python -m bench.envoy_on_demand            # writes bench/results/envoy_on_demand.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from typing import Any

from bench.common import median, print_rows, temp_dir, write_result
from bench.dataplane import PY, Cluster, start, wait_until
from bench.mesh_envoy import DRAIN, envoy_of, start_sidecar
from bench.nginx import start_upstream
from bench.procstat import rss_mib
from mesh.bus import Bus
from mesh.messages import Instance, RegisterReply, RegisterRequest
from mesh.servers import free_port, http_ok

SIZES = (1, 1000)
WARM_CALLS = 30
# idle services live this long without heartbeats
IDLE_TTL_S = 300  # the registry's maximum; a run of one size takes less


async def register_idle(nats_url: str, first: int, last: int) -> None:
    """Services idle<first>..idle<last-1>, one instance each (nothing listens there)."""
    bus = await Bus.connect([nats_url], name="bench-on-demand")
    try:
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with sem:
                await bus.request(
                    bus.subjects.registry_register,
                    RegisterRequest(
                        instance=Instance(
                            namespace="default",
                            service=f"idle{i}",
                            instance=f"idle{i}-v1-0",
                            address=f"127.0.0.1:{20000 + i % 20000}",
                            version="v1",
                        ),
                        ttl=IDLE_TTL_S,
                    ),
                    RegisterReply,
                )

        await asyncio.gather(*(one(i) for i in range(first, last)))
    finally:
        await bus.close()


def call_ms(outbound: int, host: str) -> tuple[int, float]:
    req = urllib.request.Request(f"http://127.0.0.1:{outbound}/", headers={"Host": host})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()
        status = r.status
    return status, (time.perf_counter() - t0) * 1000


def outbound_clusters(admin: str) -> int:
    with urllib.request.urlopen(f"{admin}/clusters", timeout=10) as r:
        data = json.loads(r.read())
    names = [c["name"] for c in data.get("cluster_statuses", [])]
    return sum(1 for n in names if n.startswith("outbound|"))


def one_client(cluster: Cluster, on_demand: bool, tag: str) -> dict[str, Any]:
    outbound = free_port()
    args = ["--service", "productpage", "--app-port", "9", "--outbound-port", str(outbound),
            "--instance", f"productpage-{tag}", "--dataplane", "envoy", *DRAIN,
            "--envoy-on-demand" if on_demand else "--no-envoy-on-demand"]  # fmt: skip
    token = cluster.token("productpage")
    admin_port = free_port()
    t0 = time.perf_counter()  # the agent's start, not the token's creation
    proc = start(
        f"productpage-{tag}",
        [PY, "-m", "meshctl.main", *cluster.common, "sidecar", *args,
         "--admin-port", str(admin_port), "--token", token],
        cluster.work,
    )  # fmt: skip
    cluster.procs.append(proc)
    admin = f"http://127.0.0.1:{admin_port}"
    wait_until(lambda: http_ok(f"{admin}/ready"), "the client sidecar ready", 180)
    start_s = time.perf_counter() - t0
    wait_until(lambda: envoy_of(proc.pid) is not None, "the client's Envoy")
    envoy = envoy_of(proc.pid)
    assert envoy is not None
    time.sleep(1.0)  # what follows the first push (endpoint events) settles
    rss_started = rss_mib([envoy])
    status, first_ms = call_ms(outbound, "reviews")
    warm = []
    for _ in range(WARM_CALLS):
        s, ms = call_ms(outbound, "reviews")
        status = status if status != 200 else s
        warm.append(ms)
    rss_after = rss_mib([envoy])
    clusters = outbound_clusters(admin)
    proc.stop(timeout=20)
    cluster.procs.remove(proc)
    return {
        "mode": "on demand (VHDS)" if on_demand else "every service (SotW)",
        "start_s": round(start_s, 2),
        "envoy_rss_mib_started": round(rss_started, 1),
        "envoy_rss_mib_after_call": round(rss_after, 1),
        "outbound_clusters": clusters,
        "first_call_ms": round(first_ms, 2),
        "warm_call_ms_median": round(median(warm), 2),
        "first_over_warm": round(first_ms / median(warm), 1) if warm else 0.0,
        "status": status,
    }


def run() -> dict[str, Any]:
    cluster = Cluster(temp_dir(), ("registry", "config", "ca"))
    rows: list[dict[str, Any]] = []
    try:
        _kind, app_port, upstream = start_upstream(cluster.work)
        cluster.procs.append(upstream)
        start_sidecar(cluster, "reviews", ["--version", "v1", "--app-port", str(app_port)])
        registered = 1  # reviews
        for n in SIZES:
            asyncio.run(register_idle(cluster.nats.url, registered - 1, n - 1))
            registered = max(registered, n)
            time.sleep(2.0)  # the registry publishes the new services
            # on demand first: the every-service client's start loads the control plane
            for on_demand in (True, False):
                row = one_client(cluster, on_demand, f"{n}-{int(on_demand)}")
                rows.append({"services": n, **row})
    finally:
        cluster.stop()
    return {"client_calls": "reviews", "warm_calls": WARM_CALLS, "rows": rows}


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    result = run()
    path = write_result("envoy_on_demand", result)
    print_rows(
        f"Envoy on demand vs every service ({path})",
        [
            (
                f"{r['services']:>5} services, {r['mode']}",
                f"start {r['start_s']} s, Envoy RSS {r['envoy_rss_mib_started']} -> "
                f"{r['envoy_rss_mib_after_call']} MiB, {r['outbound_clusters']} outbound "
                f"clusters, first call {r['first_call_ms']} ms = {r['first_over_warm']}x "
                f"warm ({r['warm_call_ms_median']} ms), status {r['status']}",
            )
            for r in result["rows"]
        ],
    )


if __name__ == "__main__":
    main()
