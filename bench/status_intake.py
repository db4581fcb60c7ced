"""The config leader's proxy-status intake on its own: what N status reports (one per
proxy, as after every update) cost the leader, without a simulator competing for the
cores. The config service runs as its own process; this process publishes the reports
as fast as it can, then asks proxy-status until every row is there.

    python -m bench.status_intake [--proxies 1000,10000] [--rounds 3]

Per round: the leader's CPU for N reports (/proc), and the wall time from the first
report sent until its CPU stops moving (50 ms resolution); proxy-status is then read
once and must count every row. SYNCED for N proxies cannot come
sooner than the leader has taken their N reports in: this is that floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from bench.common import median, print_rows, temp_dir, write_result
from bench.procstat import cpu_seconds, rss_mib
from mesh import logs
from mesh.bus import Bus
from mesh.messages import (
    ProxyStatus,
    ProxyStatusReply,
    ProxyStatusRequest,
    SubscriptionStatus,
)
from mesh.servers import EtcdServer, ManagedProcess, NatsServer, free_port, http_ok


def reports(bus: Bus, n: int, revision: int) -> list[ProxyStatus]:
    s = bus.subjects
    subjects = (
        s.route("default", "reviews"),
        s.endpoints("default", "reviews"),
        s.inbound("default", "client"),
    )
    return [
        ProxyStatus(
            proxy=f"client{i % 20}-v1-{i}",
            namespace="default",
            service=f"client{i % 20}",
            subscriptions=[SubscriptionStatus(subject=x, revision=revision) for x in subjects],
            sent_at=time.time(),
        )
        for i in range(n)
    ]


async def rows_at(bus: Bus, subject: str, revision: int) -> int:
    """How many proxies proxy-status shows at `revision` for `subject`."""
    count, offset = 0, 0
    while True:
        page = await bus.request(
            bus.subjects.config_proxy_status,
            ProxyStatusRequest(subject=subject, offset=offset, limit=2000),
            ProxyStatusReply,
            timeout=10,
        )
        count += sum(1 for e in page.entries if e.applied_revision >= revision)
        offset += len(page.entries)
        if not page.entries or offset >= page.total:
            return count


async def run(sizes: list[int], rounds: int) -> dict[str, Any]:
    work = temp_dir()
    nats = NatsServer(work / "nats").start()
    etcd = EtcdServer(work / "etcd").start()
    port = free_port()
    config = ManagedProcess(
        "config",
        [sys.executable, "-m", "meshctl.main", "serve", "config", "--nats", nats.url,
         "--etcd", etcd.url, "--http-port", str(port)],
        work / "config.log",
    )  # fmt: skip
    config.start()
    try:
        while not http_ok(f"http://127.0.0.1:{port}/readyz"):
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # the election settles
        bus = await Bus.connect([nats.url], name="bench-intake")
        subject = bus.subjects.route("default", "reviews")
        out = []
        revision = 0
        for n in sizes:
            cpu_ms, wall_ms = [], []
            for _ in range(rounds):
                revision += 1
                batch = reports(bus, n, revision)
                cpu0 = cpu_seconds([config.pid])
                t0 = time.perf_counter()
                for r in batch:
                    await bus.publish(bus.subjects.proxy_status, r)
                # not polled while it works (a poll of N rows costs the leader what it
                # costs): done when its CPU stops moving, then checked once
                last, done_at = cpu0, time.perf_counter()
                while True:
                    await asyncio.sleep(0.05)
                    now = cpu_seconds([config.pid])
                    if now == last:
                        break
                    last, done_at = now, time.perf_counter()
                wall_ms.append((done_at - t0) * 1000)
                cpu_ms.append((last - cpu0) * 1000)
                got = await rows_at(bus, subject, revision)
                if got != n:
                    raise SystemExit(f"proxy-status shows {got} of {n} reports")
            out.append(
                {
                    "proxies": n,
                    "rounds": rounds,
                    "taken_in_ms": round(median(wall_ms), 1),
                    "leader_cpu_ms": round(median(cpu_ms), 1),
                    "leader_cpu_us_per_report": round(median(cpu_ms) * 1000 / n, 1),
                    "leader_rss_mib": round(rss_mib([config.pid]), 1),
                }
            )
        await bus.close()
        return {"intake": out}
    finally:
        config.stop(timeout=5)
        etcd.stop()
        nats.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxies", default="1000,10000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="status_intake", help="bench/results/<name>.json")
    args = ap.parse_args(argv)
    logs.configure("warning")
    sizes = [int(x) for x in args.proxies.split(",") if x.strip()]
    result = asyncio.run(run(sizes, args.rounds))
    write_result(args.name, result)
    print_rows(
        "config leader: status intake",
        [
            (
                f"{r['proxies']} reports: taken in (ms), leader CPU us/report",
                f"{r['taken_in_ms']}, {r['leader_cpu_us_per_report']}",
            )
            for r in result["intake"]
        ],
    )
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
