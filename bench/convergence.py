"""Control plane: config convergence and registry event latency.

- convergence, real sidecars: N `Sidecar`s (this process, one event loop, one NATS
  connection each) follow one destination; time from `apply` returning to (a) every
  proxy having applied the new table and (b) `proxy-status` showing every proxy
  SYNCED, p50/p99 over repeats.
- convergence, simulated proxies (`bench.simproxy`, N = 10, 100, 1,000): the sidecar's
  own destination cache and status reporter over a few connections; the same two
  figures, plus (c) the last proxy's SYNCED report seen on `proxy.status`, and the
  time from a registry endpoint change (a new instance registered) to every proxy
  holding it. The simulator's own CPU per proxy per update is reported beside them:
  here N proxies share one core, in a mesh each has its own.
- registry: time from a register request to its endpoint event arriving, p50/p99.
- up: time from `meshctl up --detach` to all-healthy.

Registry, config and CA run as their own processes; config is signed and every proxy
verifies it against the CA's trust bundle, as deployed.

    python -m bench.convergence [--proxies 10] [--simulated 10,100,1000] [--repeats 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

from bench.common import (
    median,
    percentile,
    print_rows,
    serve,
    temp_dir,
    until_leading,
    write_result,
)
from bench.simproxy import Fleet, Target
from mesh import logs
from mesh.bus import Bus
from mesh.hosts import ServiceRef
from mesh.messages import (
    ApplyReply,
    ApplyRequest,
    EndpointSet,
    Instance,
    ProxyStatus,
    ProxyStatusEntry,
    ProxyStatusReply,
    ProxyStatusRequest,
    RegisterReply,
    RegisterRequest,
    ResourceDocument,
)
from mesh.resources import load_yaml
from mesh.servers import EtcdServer, NatsServer
from mesh.status_pages import read_proxy_status
from proxy.settings import SidecarSettings
from proxy.sidecar import Sidecar

VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews}}
    timeout: {ms}ms
"""


async def convergence(bus: Bus, nats_url: str, n: int, repeats: int) -> dict[str, float]:
    # config push does not depend on certificates: plaintext sidecars, which verify the
    # config's signatures against the CA's trust bundle all the same
    sidecars = [
        Sidecar(
            SidecarSettings(
                service=f"client{i}",
                app_port=9,
                nats=[nats_url],
                drain_timeout=0.5,
                mtls=False,
            )
        )
        for i in range(n)
    ]
    tasks = [asyncio.create_task(s.run()) for s in sidecars]
    try:
        while not all(s.ready for s in sidecars):
            await asyncio.sleep(0.01)
        ref = ServiceRef("default", "reviews")
        await asyncio.gather(*(s.cache.get(ref) for s in sidecars))
        applied_ms: list[float] = []
        synced_ms: list[float] = []
        for r in range(repeats):
            docs = [
                ResourceDocument(
                    source="bench", index=0, body=load_yaml(VS.format(ms=1000 + r), "bench")[0]
                )
            ]
            t0 = time.perf_counter()
            reply = await bus.request(
                bus.subjects.config_apply, ApplyRequest(documents=docs), ApplyReply
            )
            t_reply = time.perf_counter()
            local_done = False
            while True:
                if not local_done and all(
                    (d := s.cache.destinations.get(ref))
                    and d.table
                    and d.table.revision >= reply.revision
                    for s in sidecars
                ):
                    applied_ms.append((time.perf_counter() - t_reply) * 1000)
                    local_done = True
                if local_done:
                    rows = [
                        e
                        for e in await read_proxy_status(bus)
                        if e.subject.endswith("route.default.reviews")
                    ]
                    if len(rows) == n and all(
                        e.state == "SYNCED" and e.applied_revision >= reply.revision for e in rows
                    ):
                        synced_ms.append((time.perf_counter() - t_reply) * 1000)
                        break
                await asyncio.sleep(0.001)
                if time.perf_counter() - t0 > 20:
                    raise SystemExit(f"proxies did not converge (n={n})")
        return {
            "proxies": n,
            "applied_p50_ms": round(median(applied_ms), 2),
            "applied_p99_ms": round(percentile(applied_ms, 99), 2),
            "synced_p50_ms": round(median(synced_ms), 2),
            "synced_p99_ms": round(percentile(synced_ms, 99), 2),
        }
    finally:
        for s in sidecars:
            s.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


def vs_docs(ms: int) -> list[ResourceDocument]:
    return [ResourceDocument(source="bench", index=0, body=load_yaml(VS.format(ms=ms), "bench")[0])]


# proxy-status rows per request: a whole fleet's table does not fit one NATS message
STATUS_PAGE = 2000


async def all_synced(bus: Bus, names: set[str], subject: str, revision: int) -> bool:
    rows: list[ProxyStatusEntry] = []
    while True:
        page = await bus.request(
            bus.subjects.config_proxy_status,
            ProxyStatusRequest(subject=subject, offset=len(rows), limit=STATUS_PAGE),
            ProxyStatusReply,
            timeout=10,
        )
        rows += page.entries
        if not page.entries or len(rows) >= page.total:
            break
    rows = [e for e in rows if e.proxy in names]
    return len(rows) == len(names) and all(
        e.state == "SYNCED" and e.applied_revision >= revision for e in rows
    )


async def simulated(
    bus: Bus, nats_url: str, n: int, repeats: int, connections: int, timeout: float = 60.0
) -> dict[str, object]:
    ref = ServiceRef("default", "reviews")
    subject = bus.subjects.route(ref.namespace, ref.name)
    fleet = Fleet(nats_url, n, ref, connections=connections)
    t_start = time.perf_counter()
    await fleet.start()
    started_s = time.perf_counter() - t_start
    names = {p.name for p in fleet.proxies}
    reported = Target()

    async def on_status(report: ProxyStatus, _s: str) -> None:
        if report.proxy in names and any(
            s.subject == subject and s.revision >= reported.route_revision
            for s in report.subscriptions
        ):
            reported.mark(report.proxy)

    sub = await bus.subscribe(bus.subjects.proxy_status, ProxyStatus, on_status)
    fig: dict[str, list[float]] = {k: [] for k in ("applied", "reported", "synced", "cpu")}
    endpoints_ms: list[float] = []
    endpoints_cpu: list[float] = []
    try:
        for r in range(repeats):
            # anything newer than the table every proxy holds is this repeat's
            current = max(
                (d.table.revision for p in fleet.proxies
                 if (d := p.cache.destinations.get(ref)) and d.table), default=0,
            )  # fmt: skip
            fleet.target.reset(n, route_revision=current + 1)
            reported.reset(n, route_revision=current + 1)
            cpu0 = time.process_time()
            reply = await bus.request(
                bus.subjects.config_apply, ApplyRequest(documents=vs_docs(2000 + r)), ApplyReply
            )
            t_reply = time.perf_counter()
            async with asyncio.timeout(timeout):
                await fleet.target.done.wait()
                await reported.done.wait()
                # a proxy-status answer lists every proxy: polled gently, so the config
                # service spends its time on the reports, not on our questions
                while not await all_synced(bus, names, subject, reply.revision):
                    await asyncio.sleep(max(0.002, n / 100_000))
            t_synced = time.perf_counter()
            fig["applied"].append((max(fleet.target.seen.values()) - t_reply) * 1000)
            fig["reported"].append((max(reported.seen.values()) - t_reply) * 1000)
            fig["synced"].append((t_synced - t_reply) * 1000)
            fig["cpu"].append((time.process_time() - cpu0) * 1e6 / n)
            await asyncio.sleep(0.05)  # let the coalesced reports settle
        for r in range(repeats):
            name = f"reviews-new-{n}-{r}"
            fleet.target.reset(n, instance=name)
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            await bus.request(
                bus.subjects.registry_register,
                RegisterRequest(
                    instance=Instance(
                        namespace="default", service="reviews", instance=name,
                        address=f"127.0.0.1:{20000 + r}", version="v1",
                    ),
                    ttl=60,
                ),
                RegisterReply,
            )  # fmt: skip
            async with asyncio.timeout(timeout):
                await fleet.target.done.wait()
            endpoints_ms.append((max(fleet.target.seen.values()) - t0) * 1000)
            endpoints_cpu.append((time.process_time() - cpu0) * 1e6 / n)
            await asyncio.sleep(0.05)
    finally:
        await bus.unsubscribe(sub)
        await fleet.stop()

    def p(values: list[float], pct: float) -> float:
        return round(percentile(values, pct), 2)

    return {
        "proxies": n,
        "connections": len(fleet.buses),
        "repeats": repeats,
        "fleet_start_s": round(started_s, 2),
        "applied_p50_ms": p(fig["applied"], 50),
        "applied_p99_ms": p(fig["applied"], 99),
        "reported_p50_ms": p(fig["reported"], 50),
        "reported_p99_ms": p(fig["reported"], 99),
        "synced_p50_ms": p(fig["synced"], 50),
        "synced_p99_ms": p(fig["synced"], 99),
        "endpoints_p50_ms": p(endpoints_ms, 50),
        "endpoints_p99_ms": p(endpoints_ms, 99),
        # this process's CPU per proxy per update: what N proxies cost one core here
        "sim_cpu_us_per_proxy_route": round(median(fig["cpu"]), 1),
        "sim_cpu_us_per_proxy_endpoints": round(median(endpoints_cpu), 1),
    }


async def registry_latency(bus: Bus, samples: int) -> dict[str, float]:
    arrived: dict[str, float] = {}

    async def on_set(msg: EndpointSet, _s: str) -> None:
        for e in msg.endpoints:
            arrived.setdefault(e.instance, time.perf_counter())

    await bus.subscribe(bus.subjects.endpoints("default", "latency"), EndpointSet, on_set)
    lat: list[float] = []
    for i in range(samples):
        name = f"latency-{i}"
        t0 = time.perf_counter()
        await bus.request(
            bus.subjects.registry_register,
            RegisterRequest(
                instance=Instance(
                    namespace="default",
                    service="latency",
                    instance=name,
                    address=f"127.0.0.1:{10000 + i}",
                ),
                ttl=30,
            ),
            RegisterReply,
        )
        while name not in arrived:
            await asyncio.sleep(0.0005)
        lat.append((arrived[name] - t0) * 1000)
    return {
        "samples": samples,
        "p50_ms": round(median(lat), 2),
        "p99_ms": round(percentile(lat, 99), 2),
    }


def up_time(replicas: int) -> float:
    state = temp_dir() / "mesh"
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "meshctl.main",
            "--state-dir",
            str(state),
            "up",
            "--detach",
            "--replicas",
            str(replicas),
        ],
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - t0
    subprocess.run(
        [sys.executable, "-m", "meshctl.main", "--state-dir", str(state), "down"],
        capture_output=True,
    )
    return round(elapsed, 2)


async def run(
    proxies: list[int], sims: list[int], repeats: int, samples: int, connections: int
) -> dict[str, object]:
    work = temp_dir()
    nats = NatsServer(work / "nats").start()
    etcd = EtcdServer(work / "etcd").start()
    procs = []
    try:
        ports = []
        for svc in ("ca", "registry", "config"):  # started together
            p, port = serve(work, svc, nats.url, etcd.url)
            procs.append(p)
            ports.append(port)
        await until_leading(ports)
        bus = await Bus.connect([nats.url], name="bench")
        results = [await convergence(bus, nats.url, n, repeats) for n in proxies]
        simulated_results = [await simulated(bus, nats.url, n, repeats, connections) for n in sims]
        reg = await registry_latency(bus, samples)
        await bus.close()
        return {
            "convergence": results,
            "simulated": simulated_results,
            "registry_event": reg,
        }
    finally:
        for p in procs:
            p.stop(timeout=5)
        etcd.stop()
        nats.stop()


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxies", default="10", help="real sidecars (comma list; '' none)")
    ap.add_argument("--simulated", default="10,100,1000", help="simulated proxies (comma list)")
    ap.add_argument("--connections", type=int, default=4, help="NATS connections of the sims")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--up-replicas", type=int, default=3, help="0: skip the meshctl up timing")
    args = ap.parse_args(argv)
    logs.configure("warning")  # 1,000 proxies' info events would drown the table

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    result = asyncio.run(
        run(ints(args.proxies), ints(args.simulated), args.repeats, args.samples, args.connections)
    )
    if args.up_replicas:
        result["up_to_healthy_s"] = {
            "replicas_1": up_time(1),
            f"replicas_{args.up_replicas}": up_time(args.up_replicas),
        }
    write_result("convergence", result)
    rows = []
    for c in result["convergence"]:  # type: ignore[attr-defined]
        rows.append(
            (
                f"{c['proxies']} proxies: applied p50/p99 ms",
                f"{c['applied_p50_ms']} / {c['applied_p99_ms']}",
            )
        )
        rows.append(
            (
                f"{c['proxies']} proxies: SYNCED p50/p99 ms",
                f"{c['synced_p50_ms']} / {c['synced_p99_ms']}",
            )
        )
    for c in result["simulated"]:  # type: ignore[attr-defined]
        head = f"{c['proxies']} simulated proxies"
        rows.append(
            (f"{head}: applied p50/p99 ms", f"{c['applied_p50_ms']} / {c['applied_p99_ms']}")
        )
        rows.append(
            (
                f"{head}: last SYNCED report p50/p99 ms",
                f"{c['reported_p50_ms']} / {c['reported_p99_ms']}",
            )
        )
        rows.append(
            (
                f"{head}: proxy-status SYNCED p50/p99 ms",
                f"{c['synced_p50_ms']} / {c['synced_p99_ms']}",
            )
        )
        rows.append(
            (
                f"{head}: endpoint change seen p50/p99 ms",
                f"{c['endpoints_p50_ms']} / {c['endpoints_p99_ms']}",
            )
        )
        rows.append(
            (
                f"{head}: simulator CPU us/proxy/update",
                f"{c['sim_cpu_us_per_proxy_route']} (route), "
                f"{c['sim_cpu_us_per_proxy_endpoints']} (endpoints)",
            )
        )
    reg = result["registry_event"]
    rows.append(("register -> endpoint event p50/p99 ms", f"{reg['p50_ms']} / {reg['p99_ms']}"))  # type: ignore[index]
    for k, v in result.get("up_to_healthy_s", {}).items():  # type: ignore[attr-defined]
        rows.append((f"meshctl up to healthy ({k})", f"{v} s"))
    print_rows("control plane", rows)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
