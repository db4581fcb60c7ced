"""Telemetry service ingest: how fast one replica takes in what proxies publish.

Proxies (real `TelemetryRecorder`s and `TelemetryPublisher`s, in this process) fill the
`MESH_TELEMETRY` stream while the service is down: each one-second round of each proxy
is a metric batch (its edges, one counter and three histograms per label set) and an
access batch (one record per request). Then one replica (`meshctl serve telemetry`)
starts and catches up; the rates are from its readiness to the last record applied.
Metric batches take the exactly-once path (ledger write in JetStream KV per
reporter), access records the views path.

    python -m bench.telemetry [--proxies 50] [--rounds 20] [--requests 100] [--edges 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request

from bench.common import print_rows, temp_dir, write_result
from mesh.bus import Bus
from mesh.servers import EtcdServer, ManagedProcess, NatsServer, free_port, http_ok
from mesh.telemetry import new_reporter_id, stream_name
from proxy.telemetry import RequestRecord, TelemetryPublisher, TelemetryRecorder, Workload

PREFIX = "mesh"


def workload(service: str, version: str = "v1") -> Workload:
    return Workload(
        f"{service}-{version}", "default", f"spiffe://cluster.local/ns/default/sa/{service}",
        service, version,
    )  # fmt: skip


async def fill_stream(nats_url: str, proxies: int, rounds: int, requests: int, edges: int) -> dict:
    bus = await Bus.connect([nats_url], name="bench-telemetry", prefix=PREFIX)
    await bus.ensure_stream(stream_name(PREFIX), [bus.subjects.telemetry_all])
    rng = random.Random(1)
    fleet = []
    for i in range(proxies):
        rec = TelemetryRecorder(
            reporter_id=new_reporter_id(f"svc{i}-v1-0", rng.getrandbits(32)),
            namespace="default",
            service=f"svc{i}",
            instance=f"svc{i}-v1-0",
            max_buffered=10**6,
        )
        fleet.append((rec, TelemetryPublisher(rec, bus), workload(f"svc{i}")))
    batches = {"metrics": 0, "access": 0}
    started = time.perf_counter()
    for _ in range(rounds):
        for rec, pub, me in fleet:
            for r in range(requests):
                dest = workload(f"dst{r % edges}")
                rec.record_request(
                    RequestRecord(
                        "source", me, dest, f"dst{r % edges}.default.svc.cluster.local", "GET",
                        "dst:80", "/api", 200 if r % 50 else 503, rng.uniform(0.5, 40.0),
                        0, 1024, "-", "10.0.0.1:80", f"req-{r}",
                    )
                )  # fmt: skip
            for out in rec.outgoing():
                if out.kind in batches:
                    batches[out.kind] += 1
            stored = await pub.flush()
            assert stored >= 2 and rec.outgoing() == [], "the stream must store every batch"
    publish_s = time.perf_counter() - started
    await bus.close()
    return {
        "metric_batches": batches["metrics"],
        "access_records": proxies * rounds * requests,
        "requests": proxies * rounds * requests,
        "publish_s": round(publish_s, 2),
    }


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxies", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=20, help="one-second flushes per proxy")
    ap.add_argument(
        "--requests",
        dest="requests_per_round",
        type=int,
        default=100,
        help="requests per proxy per round",
    )
    ap.add_argument("--edges", type=int, default=4, help="destinations per proxy")
    args = ap.parse_args(argv)
    work = temp_dir()
    nats = NatsServer(work / "nats").start()
    etcd = EtcdServer(work / "etcd").start()
    proc: ManagedProcess | None = None
    try:
        filled = asyncio.run(
            fill_stream(nats.url, args.proxies, args.rounds, args.requests_per_round, args.edges)
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = ManagedProcess(
            "telemetry",
            [sys.executable, "-m", "meshctl.main", "serve", "telemetry", "--nats", nats.url,
             "--etcd", etcd.url, "--http-port", str(port)],
            work / "telemetry.log",
        )  # fmt: skip
        proc.start()
        deadline = time.monotonic() + 60
        while not http_ok(f"{url}/readyz"):
            if time.monotonic() > deadline:
                raise SystemExit(f"telemetry did not start:\n{proc.log_tail()}")
            time.sleep(0.02)
        t0 = time.monotonic()
        done: dict[str, float] = {}
        deadline = t0 + 300
        while len(done) < 2 and time.monotonic() < deadline:
            m = metrics(url)
            applied = m.get('meshwork_telemetry_batches_total{outcome="applied"}', 0.0)
            if "metrics" not in done and applied >= filled["metric_batches"]:
                done["metrics"] = time.monotonic() - t0
            if (
                "access" not in done
                and m.get('meshwork_telemetry_records_total{kind="access"}', 0.0)
                >= filled["access_records"]
            ):
                done["access"] = time.monotonic() - t0
            time.sleep(0.05)
        if len(done) < 2:
            raise SystemExit(f"telemetry did not catch up: {done}")
        m = metrics(url)
        series = m.get("meshwork_telemetry_series", 0.0)
        result: dict[str, object] = {
            **vars(args),
            **filled,
            "metric_batches_per_s": round(filled["metric_batches"] / done["metrics"]),
            "requests_counted_per_s": round(filled["requests"] / done["metrics"]),
            "access_records_per_s": round(filled["access_records"] / done["access"]),
            "catch_up_s": {k: round(v, 2) for k, v in done.items()},
            "series_in_totals": series,
        }
        write_result("telemetry", result)
        print_rows(
            f"telemetry ingest: 1 replica catching up on {args.proxies} proxies x "
            f"{args.rounds} rounds x {args.requests_per_round} requests",
            [
                ("metric batches/s (one per proxy-second)", str(result["metric_batches_per_s"])),
                ("requests counted/s", str(result["requests_counted_per_s"])),
                ("access records/s", str(result["access_records_per_s"])),
            ],
        )
        return result
    finally:
        if proc is not None:
            proc.stop(timeout=10)
        etcd.stop()
        nats.stop()


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
