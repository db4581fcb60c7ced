"""Control plane: config convergence and registry event latency.

- convergence: N sidecars follow one destination; time from `apply` returning to
  (a) every proxy having applied the new table and (b) `proxy-status` showing every
  proxy SYNCED — p50/p99 over repeats. Sidecars run in this process (one event loop),
  the registry and config services in their own processes.
- registry: time from a register request to its endpoint event arriving, p50/p99.
- up: time from `meshctl up --detach` to all-healthy.

    python -m bench.convergence [--proxies 2,20] [--repeats 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

from bench.common import median, percentile, print_rows, temp_dir, write_result
from mesh.bus import Bus
from mesh.hosts import ServiceRef
from mesh.messages import (
    ApplyReply,
    ApplyRequest,
    EndpointSet,
    Instance,
    ProxyStatusReply,
    ProxyStatusRequest,
    RegisterReply,
    RegisterRequest,
    ResourceDocument,
)
from mesh.resources import load_yaml
from mesh.servers import EtcdServer, ManagedProcess, NatsServer, free_port, http_ok
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
    # config push does not depend on certificates: no CA here, plaintext sidecars, and
    # no trust bundle to verify config signatures with (the push is signed all the same)
    sidecars = [
        Sidecar(
            SidecarSettings(
                service=f"client{i}",
                app_port=9,
                nats=[nats_url],
                drain_timeout=0.5,
                mtls=False,
                config_signatures=False,
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
                    status = await bus.request(
                        bus.subjects.config_proxy_status, ProxyStatusRequest(), ProxyStatusReply
                    )
                    rows = [
                        e for e in status.entries if e.subject.endswith("route.default.reviews")
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
            "mesh.cli.main",
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
        [sys.executable, "-m", "mesh.cli.main", "--state-dir", str(state), "down"],
        capture_output=True,
    )
    return round(elapsed, 2)


async def run(proxies: list[int], repeats: int, samples: int) -> dict[str, object]:
    work = temp_dir()
    nats = NatsServer(work / "nats").start()
    etcd = EtcdServer(work / "etcd").start()
    procs = []
    try:
        for svc in ("registry", "config"):
            port = free_port()
            p = ManagedProcess(
                svc,
                [
                    sys.executable,
                    "-m",
                    "mesh.cli.main",
                    "serve",
                    svc,
                    "--nats",
                    nats.url,
                    "--etcd",
                    etcd.url,
                    "--http-port",
                    str(port),
                ],
                work / f"{svc}.log",
            )
            p.start()
            procs.append(p)
            while not http_ok(f"http://127.0.0.1:{port}/readyz"):
                await asyncio.sleep(0.05)
        bus = await Bus.connect([nats.url], name="bench")
        await asyncio.sleep(2.5)  # elections settle
        results = [await convergence(bus, nats.url, n, repeats) for n in proxies]
        reg = await registry_latency(bus, samples)
        await bus.close()
        return {"convergence": results, "registry_event": reg}
    finally:
        for p in procs:
            p.stop(timeout=5)
        etcd.stop()
        nats.stop()


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxies", default="2,20")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--up-replicas", type=int, default=3)
    args = ap.parse_args(argv)
    result = asyncio.run(run([int(x) for x in args.proxies.split(",")], args.repeats, args.samples))
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
    reg = result["registry_event"]
    rows.append(("register -> endpoint event p50/p99 ms", f"{reg['p50_ms']} / {reg['p99_ms']}"))  # type: ignore[index]
    for k, v in result["up_to_healthy_s"].items():  # type: ignore[attr-defined]
        rows.append((f"meshctl up to healthy ({k})", f"{v} s"))
    print_rows("control plane", rows)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
