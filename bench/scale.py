"""Control plane at scale: simulated proxies spread over several processes.

N proxies (`bench.proxysim`: the sidecar's own destination cache and status reporter,
signatures verified) follow one destination, spread over `--processes` worker
processes. Registry, config and CA run as their own processes (one replica each, so
the config replica is the leader). Figures per N:

- apply -> every proxy applied, and -> proxy-status shows every proxy SYNCED (p50/p99
  over repeats), from the apply reply;
- endpoint change (an instance registered) -> every proxy holds it;
- the config leader's CPU per update and resident memory per proxy (/proc);
- NATS (messages and bytes out per update, from /varz) and etcd (CPU) load.

Then churn: `--churn-rate` instance changes/s (registrations of new instances and
deregistrations of earlier ones, alternating) for `--churn-seconds` across
`--churn-proxies` proxies: lag from each change's request to each proxy holding it
(p50/p99/max over every proxy x change), changes never seen, and how many proxies end
with exactly the registry's set.

    python -m bench.scale [--sizes 100,1000,5000,10000] [--processes 4] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from typing import Any

from bench.common import percentile, print_rows, serve, temp_dir, until_leading, write_result
from bench.convergence import all_synced, vs_docs
from bench.procstat import cpu_seconds, rss_mib
from bench.simproxy import SERVICES
from mesh import logs
from mesh.bus import Bus
from mesh.messages import (
    ApplyReply,
    ApplyRequest,
    DeregisterReply,
    DeregisterRequest,
    EndpointsGetReply,
    EndpointsGetRequest,
    Instance,
    ProxyStatus,
    RegisterReply,
    RegisterRequest,
)
from mesh.servers import EtcdServer, ManagedProcess, NatsServer

DEST = ("default", "reviews")


class Workers:
    """The worker processes of one fleet, spoken to with JSON lines."""

    def __init__(self, procs: list[asyncio.subprocess.Process]):
        self.procs = procs

    @classmethod
    async def start(cls, nats_url: str, n: int, processes: int, connections: int) -> Workers:
        k = max(1, min(processes, n))
        counts = [n // k + (1 if i < n % k else 0) for i in range(k)]
        procs, offset = [], 0
        for count in counts:
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.proxysim.worker", "--nats", nats_url,
                    "--count", str(count), "--offset", str(offset),
                    "--connections", str(connections),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    limit=64 * 1024 * 1024,
                )
            )  # fmt: skip
            offset += count
        workers = cls(procs)
        await workers.replies()  # {"ready": ...} from each
        return workers

    async def replies(self) -> list[dict[str, Any]]:
        async def one(p: asyncio.subprocess.Process) -> dict[str, Any]:
            assert p.stdout is not None
            line = await p.stdout.readline()
            if not line:
                raise RuntimeError(f"proxy simulator process {p.pid} exited ({p.returncode})")
            reply: dict[str, Any] = json.loads(line)
            if "error" in reply:
                raise RuntimeError(f"proxy simulator process {p.pid}: {reply['error']}")
            return reply

        return list(await asyncio.gather(*(one(p) for p in self.procs)))

    async def ask(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write((json.dumps(cmd) + "\n").encode())
            await p.stdin.drain()
        return await self.replies()

    async def stop(self) -> None:
        for p in self.procs:
            if p.returncode is None and p.stdin is not None:
                p.stdin.write(b'{"cmd": "stop"}\n')
                p.stdin.close()
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 30)
            except TimeoutError:
                p.kill()
                await p.wait()


def nats_varz(monitor_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/varz", timeout=5) as r:
        varz: dict[str, Any] = json.loads(r.read())
    return varz


class Reports:
    """Every proxy's status report naming the revision expected, seen on proxy.status."""

    def __init__(self, names: set[str]):
        self.names = names
        self.subject = ""
        self.revision = 1 << 62
        self.seen: set[str] = set()
        self.done = asyncio.Event()
        self.at = 0.0

    def expect(self, revision: int) -> None:
        self.revision, self.seen, self.done = revision, set(), asyncio.Event()

    async def on_status(self, report: ProxyStatus, _s: str) -> None:
        if report.proxy not in self.names or report.proxy in self.seen:
            return
        if any(
            s.subject == self.subject and s.revision >= self.revision for s in report.subscriptions
        ):
            self.seen.add(report.proxy)
            if len(self.seen) == len(self.names):
                self.at = time.perf_counter()
                self.done.set()


def metric(http_port: int, name: str) -> float:
    """One unlabelled sample from a service's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def push_metrics(http_port: int) -> dict[str, float]:
    """The config leader's push latency histogram totals, from its /metrics."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for key in out:
            if line.startswith(f"mesh_config_push_latency_seconds_{key} "):
                out[key] = float(line.split()[1])
    return out


def instance(name: str, port: int) -> Instance:
    ns, svc = DEST
    return Instance(
        namespace=ns, service=svc, instance=name, address=f"127.0.0.1:{port}", version="v1"
    )


async def register(bus: Bus, name: str, port: int) -> RegisterReply:
    return await bus.request(
        bus.subjects.registry_register,
        RegisterRequest(instance=instance(name, port), ttl=120),
        RegisterReply,
    )


def p(values: list[float], pct: float) -> float:
    return round(percentile(values, pct), 2) if values else 0.0


async def one_size(
    bus: Bus, cp: dict[str, Any], n: int, args: argparse.Namespace, serial: int
) -> dict[str, Any]:
    config_pid, etcd_pid, nats = cp["config_pid"], cp["etcd_pid"], cp["nats"]
    rss_before = rss_mib([config_pid])
    t0 = time.perf_counter()
    workers = await Workers.start(nats.url, n, args.processes, args.connections)
    start_s = time.perf_counter() - t0
    await asyncio.sleep(1.0)  # the proxies' first status reports settle
    rss_after = rss_mib([config_pid])
    names = {f"client{i % SERVICES}-v1-{i}" for i in range(n)}  # as bench.proxysim names them
    subject = bus.subjects.route(*DEST)
    applied, synced, cpu_ms, nats_msgs, nats_mb, etcd_cpu_ms = [], [], [], [], [], []
    reported, sim_cpu_us = [], []
    want = Reports(names)
    want.subject = subject
    on_status = want.on_status
    sub = await bus.subscribe(bus.subjects.proxy_status, ProxyStatus, on_status)
    push0 = push_metrics(cp["config_http"])
    try:
        for r in range(args.repeats):
            sim0 = sum(w["cpu_s"] for w in await workers.ask({"cmd": "cpu"}))
            cpu0, ecpu0, varz0 = (
                cpu_seconds([config_pid]),
                cpu_seconds([etcd_pid]),
                nats_varz(nats.monitor_port),
            )
            reply = await bus.request(
                bus.subjects.config_apply,
                ApplyRequest(documents=vs_docs(3000 + serial * 100 + r)),
                ApplyReply,
            )
            t_reply = time.perf_counter()
            want.expect(reply.revision)
            ask = asyncio.create_task(workers.ask({"cmd": "route", "revision": reply.revision}))
            # every proxy's report of the new revision seen on proxy.status, then the
            # config service's proxy-status confirms all SYNCED (polled only from then:
            # a poll lists every proxy, and costs the leader what it costs)
            async with asyncio.timeout(args.timeout):
                await want.done.wait()
                while not await all_synced(bus, names, subject, reply.revision):
                    await asyncio.sleep(0.02)
            t_synced = time.perf_counter()
            replies = await ask
            times = [t for w in replies for t in w["times"]]
            applied.append((max(times) - t_reply) * 1000)
            reported.append((want.at - t_reply) * 1000)
            synced.append((t_synced - t_reply) * 1000)
            await asyncio.sleep(0.2)  # the coalesced status reports settle
            sim1 = sum(w["cpu_s"] for w in await workers.ask({"cmd": "cpu"}))
            sim_cpu_us.append((sim1 - sim0) * 1e6 / n)
            cpu_ms.append((cpu_seconds([config_pid]) - cpu0) * 1000)
            etcd_cpu_ms.append((cpu_seconds([etcd_pid]) - ecpu0) * 1000)
            varz1 = nats_varz(nats.monitor_port)
            nats_msgs.append(varz1["out_msgs"] - varz0["out_msgs"])
            nats_mb.append((varz1["out_bytes"] - varz0["out_bytes"]) / 1e6)
        endpoints = []
        for r in range(args.repeats):
            name = f"reviews-new-{serial}-{r}"
            t0 = time.perf_counter()
            await register(bus, name, 20000 + r)
            times = [
                t for w in await workers.ask({"cmd": "instance", "name": name}) for t in w["times"]
            ]
            endpoints.append((max(times) - t0) * 1000)
    finally:
        await bus.unsubscribe(sub)
        await workers.stop()
    push1 = push_metrics(cp["config_http"])
    pushes = push1["count"] - push0["count"]
    return {
        "proxies": n,
        "processes": len(workers.procs),
        "connections_per_process": args.connections,
        "repeats": args.repeats,
        "fleet_start_s": round(start_s, 2),
        "applied_p50_ms": p(applied, 50),
        "applied_p99_ms": p(applied, 99),
        "reported_p50_ms": p(reported, 50),
        "reported_p99_ms": p(reported, 99),
        "synced_p50_ms": p(synced, 50),
        "synced_p99_ms": p(synced, 99),
        "endpoints_p50_ms": p(endpoints, 50),
        "endpoints_p99_ms": p(endpoints, 99),
        # the leader's own push latency (oldest change -> last publish), from its /metrics
        "config_push_mean_ms": round((push1["sum"] - push0["sum"]) * 1000 / pushes, 2)
        if pushes
        else 0.0,
        "config_pushes": int(pushes),
        # what one update costs the simulator processes, per proxy (the data the
        # curve's shape comes from: here every proxy shares 2 cores)
        "sim_cpu_us_per_proxy_update": p(sim_cpu_us, 50),
        # per route update, including its N status reports and our proxy-status polls
        "config_cpu_ms_per_update": p(cpu_ms, 50),
        "config_rss_mib": round(rss_after, 1),
        "config_kib_per_proxy": round((rss_after - rss_before) * 1024 / n, 2),
        "nats_out_msgs_per_update": int(p(nats_msgs, 50)),
        "nats_out_mb_per_update": p(nats_mb, 50),
        "etcd_cpu_ms_per_update": p(etcd_cpu_ms, 50),
    }


async def churn(bus: Bus, cp: dict[str, Any], args: argparse.Namespace, n: int) -> dict[str, Any]:
    workers = await Workers.start(cp["nats"].url, n, args.processes, args.connections)
    try:
        await asyncio.sleep(1.0)
        sim0 = sum(w["cpu_s"] for w in await workers.ask({"cmd": "track"}))
        reg0 = cpu_seconds([cp["registry_pid"]])
        sets0 = metric(cp["registry_http"], "mesh_registry_endpoint_sets_published_total")
        wall0 = time.perf_counter()
        live: list[tuple[str, int]] = []
        changes: list[list[float]] = []
        total = int(args.churn_rate * args.churn_seconds)
        started = time.perf_counter()
        for i in range(total):
            await asyncio.sleep(max(0.0, started + i / args.churn_rate - time.perf_counter()))
            sent = time.perf_counter()
            if i % 2 == 0 or not live:
                name = f"churn-{i}"
                reply = await register(bus, name, 30000 + i)
                live.append((name, reply.lease_id))
                revision = reply.revision
            else:
                name, lease = live.pop(0)
                dreply = await bus.request(
                    bus.subjects.registry_deregister,
                    DeregisterRequest(*DEST, instance=name, lease_id=lease),
                    DeregisterReply,
                )
                revision = dreply.revision
            changes.append([revision, sent])
        ended = time.perf_counter()
        achieved = total / (ended - started)
        last = int(max(r for r, _ in changes)) if changes else 0
        # until every proxy holds the last change (bounded): what is then still missing
        # is lost, not late
        behind = sum(
            int(w["behind"]) for w in await workers.ask({"cmd": "endpoints", "revision": last})
        )
        settled_s = time.perf_counter() - ended
        wall = time.perf_counter() - wall0
        sim_cpu = sum(w["cpu_s"] for w in await workers.ask({"cmd": "cpu"})) - sim0
        reg_cpu = cpu_seconds([cp["registry_pid"]]) - reg0
        sets = metric(cp["registry_http"], "mesh_registry_endpoint_sets_published_total") - sets0
        got = await bus.request(
            bus.subjects.registry_get, EndpointsGetRequest(*DEST), EndpointsGetReply
        )
        final = sorted(e.instance for s in got.sets for e in s.endpoints)
        reports = await workers.ask({"cmd": "churn", "changes": changes, "final": final})
    finally:
        await workers.stop()
    hist: dict[int, int] = {}
    for w in reports:
        for ms, count in w["hist"].items():
            hist[int(ms)] = hist.get(int(ms), 0) + count
    samples = sorted(hist.items())
    seen = sum(c for _, c in samples)

    def pct(q: float) -> float:
        want, acc = q / 100 * seen, 0
        for ms, c in samples:
            acc += c
            if acc >= want:
                return float(ms)
        return float(samples[-1][0]) if samples else 0.0

    return {
        "proxies": n,
        "changes": total,
        "rate_per_s": round(achieved, 1),
        "lag_p50_ms": pct(50),
        "lag_p99_ms": pct(99),
        "lag_max_ms": float(samples[-1][0]) if samples else 0.0,
        "settle_after_last_change_s": round(settled_s, 2),
        # the registry published this many sets for the churned service (coalesced)
        "endpoint_sets_published": int(sets),
        # CPU during the churn, as cores busy: the simulator's share says whether the
        # lag is the control plane's or the simulator's backlog
        "sim_cores_busy": round(sim_cpu / wall, 2),
        "registry_cores_busy": round(reg_cpu / wall, 2),
        "proxies_behind_at_timeout": behind,
        "never_seen": sum(w["missing"] for w in reports),
        "proxies_with_registry_set": sum(w["exact"] for w in reports),
        "final_instances": len(final),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = temp_dir()
    nats = NatsServer(work / "nats").start()
    etcd = EtcdServer(work / "etcd").start()
    procs: dict[str, ManagedProcess] = {}
    ports: dict[str, int] = {}
    try:
        for svc in ("ca", "registry", "config"):  # started together
            procs[svc], ports[svc] = serve(work, svc, nats.url, etcd.url)
        await until_leading(ports.values())
        assert etcd.process is not None
        cp = {
            "config_pid": procs["config"].pid,
            "config_http": ports["config"],
            "registry_pid": procs["registry"].pid,
            "registry_http": ports["registry"],
            "etcd_pid": etcd.process.pid,
            "nats": nats,
        }
        bus = await Bus.connect([nats.url], name="bench-scale")
        await register(bus, "reviews-base", 19999)
        sizes: list[dict[str, Any]] = []
        for serial, n in enumerate(args.sizes):
            try:
                sizes.append(await one_size(bus, cp, n, args, serial))
            except (TimeoutError, RuntimeError, OSError) as e:
                # the machine's limit: say where, keep what was measured
                sizes.append({"proxies": n, "failed": f"{type(e).__name__}: {e}"})
                break
            print(json.dumps(sizes[-1]), file=sys.stderr)
        churned = [await churn(bus, cp, args, n) for n in args.churn_proxies]
        await bus.close()
        return {
            "sizes": sizes,
            "churn": churned,
            "cores": len(__import__("os").sched_getaffinity(0)),
        }
    finally:
        for proc in procs.values():
            proc.stop(timeout=5)
        etcd.stop()
        nats.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000,5000,10000", help="proxies (comma list)")
    ap.add_argument("--processes", type=int, default=4, help="simulator processes")
    ap.add_argument("--connections", type=int, default=2, help="NATS connections per process")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--churn-proxies", default="1000", help="proxies (comma list; '' none)")
    ap.add_argument("--churn-rate", type=float, default=100.0, help="instance changes/s")
    ap.add_argument("--churn-seconds", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=120.0, help="per update, seconds")
    ap.add_argument("--name", default="scale", help="bench/results/<name>.json")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check that it works")
    args = ap.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    args.churn_proxies = [int(x) for x in args.churn_proxies.split(",") if x.strip()]
    if args.smoke:
        args.sizes, args.processes, args.repeats = [6], 2, 2
        args.churn_proxies, args.churn_rate, args.churn_seconds = [4], 20.0, 0.5
    logs.configure("warning")
    result = asyncio.run(run(args))
    result["smoke"] = args.smoke
    write_result(args.name, result)
    rows = []
    for s in result["sizes"]:
        head = f"{s['proxies']} proxies"
        if "failed" in s:
            rows.append((head, s["failed"]))
            continue
        rows.append(
            (f"{head}: applied p50/p99 ms", f"{s['applied_p50_ms']} / {s['applied_p99_ms']}")
        )
        rows.append((f"{head}: SYNCED p50/p99 ms", f"{s['synced_p50_ms']} / {s['synced_p99_ms']}"))
        rows.append(
            (
                f"{head}: endpoint held p50/p99 ms",
                f"{s['endpoints_p50_ms']} / {s['endpoints_p99_ms']}",
            )
        )
        rows.append(
            (
                f"{head}: config KiB/proxy, CPU ms/update",
                f"{s['config_kib_per_proxy']}, {s['config_cpu_ms_per_update']}",
            )
        )
    for c in result["churn"]:
        rows.append(
            (
                f"churn {c['rate_per_s']}/s x {c['proxies']} proxies: lag p50/p99/max ms",
                f"{c['lag_p50_ms']} / {c['lag_p99_ms']} / {c['lag_max_ms']}",
            )
        )
        rows.append(
            ("churn: never seen, proxies with the registry's set",
             f"{c['never_seen']}, {c['proxies_with_registry_set']}/{c['proxies']}")
        )  # fmt: skip
    print_rows("control plane at scale", rows)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
