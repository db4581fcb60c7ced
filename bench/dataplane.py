"""Data plane: requests/s and latency, measured with wrk in one run, rotating between

- direct: client -> app (the baseline);
- sidecar pair: client -> client sidecar -> server sidecar -> app, as deployed (mTLS
  between the sidecars, telemetry on, 1 % of traces sampled), with the telemetry
  service consuming what the sidecars publish;
- the same pair with `--no-telemetry`: what telemetry costs the sidecars.

Both pairs front the same app, so the two pair figures differ only by telemetry. On a
small machine shared with the load generator (and with the telemetry service and
nats-server storing the stream), requests/s also move with everything else running,
so the comparison is made twice:

- one after the other (rotating), like the direct figures;
- side by side (A/B): both pairs loaded at once by two wrk processes, so whatever
  else runs on the machine weighs on both alike. Their requests/s ratio is the
  headline figure, and the CPU time each pair's two sidecars spent per request
  (/proc/<pid>/stat) says what telemetry costs them: the median, over the A/B rounds,
  of each round's difference (a round on a busier machine costs both pairs more).

    python -m bench.dataplane [--seconds 5] [--connections 16] [--repeats 3] [--no-mtls]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

from bench.common import median, print_rows, run_wrk, serve, temp_dir, write_result
from mesh.bus import Bus
from mesh.ca_messages import CASubjects, TokenCreateReply, TokenCreateRequest
from mesh.servers import (
    EtcdServer,
    ManagedProcess,
    NatsServer,
    free_port,
    http_ok,
    stop_together,
)

PY = sys.executable


def start(name: str, args: list[str], logs: Path) -> ManagedProcess:
    proc = ManagedProcess(name, args, logs / f"{name}.log")
    proc.start()
    return proc


def wait_until(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not happen within {timeout}s")
        time.sleep(0.05)


class Cluster:
    """nats-server, etcd and the control-plane services, as separate processes."""

    def __init__(self, work: Path, services: tuple[str, ...]):
        self.work = work
        self.nats = NatsServer(work / "nats").start()
        self.etcd = EtcdServer(work / "etcd").start()
        self.procs: list[ManagedProcess] = []
        self.services: list[ManagedProcess] = []
        self.http: dict[str, str] = {}
        try:
            # started together, then waited for: their start-ups overlap
            for svc in services:
                self.serve(svc, wait=False)
            for svc in services:
                self.wait_ready(svc)
        except BaseException:
            self.stop()
            raise

    @property
    def common(self) -> list[str]:
        return ["--nats", self.nats.url]

    def serve(self, svc: str, *, wait: bool = True) -> None:
        proc, port = serve(self.work, svc, self.nats.url, self.etcd.url)
        self.procs.append(proc)
        self.services.append(self.procs[-1])
        self.http[svc] = f"http://127.0.0.1:{port}"
        if wait:
            self.wait_ready(svc)

    def wait_ready(self, svc: str) -> None:
        wait_until(lambda: http_ok(f"{self.http[svc]}/readyz"), f"{svc} ready")

    def token(self, service_account: str) -> str:
        """A bootstrap token for `service_account`, asked of the CA as `meshctl token
        create` asks (from here: no CLI process to start for every sidecar)."""

        async def create() -> str:
            bus = await Bus.connect([self.nats.url], name="bench-token")
            try:
                reply = await bus.request(
                    CASubjects.of(bus.subjects).token_create,
                    TokenCreateRequest(namespace="default", service_account=service_account),
                    TokenCreateReply,
                    timeout=5,
                )
            finally:
                await bus.close()
            return str(reply.token)

        return asyncio.run(create())

    def sidecar(self, name: str, args: list[str], mtls: bool) -> tuple[str, ManagedProcess]:
        """Start a sidecar; returns its admin URL and process."""
        admin = free_port()
        service = args[args.index("--service") + 1]
        auth = ["--token", self.token(service)] if mtls else ["--no-mtls"]
        self.procs.append(
            start(
                name,
                [PY, "-m", "meshctl.main", *self.common, "sidecar", *args,
                 "--admin-port", str(admin), *auth],
                self.work,
            )
        )  # fmt: skip
        return f"http://127.0.0.1:{admin}", self.procs[-1]

    def process(self, name: str) -> ManagedProcess:
        return next(p for p in self.procs if p.name == name)

    def stop(self) -> None:
        """Sidecars and apps first (a sidecar deregisters while the control plane is
        up), then the control plane, then etcd and nats-server; the processes of each
        group stop at once, so their drains overlap instead of adding up."""
        stop_together([p for p in self.procs if p not in self.services], timeout=5)
        stop_together(self.services, timeout=5)
        self.etcd.stop()
        self.nats.stop()


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(procs: list[ManagedProcess]) -> float:
    """User + system CPU time the processes have used so far."""
    total = 0
    for p in procs:
        with open(f"/proc/{p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / _TICK


def routed(outbound: int, host: str) -> bool:
    req = urllib.request.Request(f"http://127.0.0.1:{outbound}/", headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def applied_requests(telemetry: str) -> float:
    """Requests the telemetry service has counted so far (both reporters)."""
    with urllib.request.urlopen(f"{telemetry}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("meshwork_telemetry_requests_applied_total")
    )


def telemetry_lag(outbound: int, host: str, telemetry: str, samples: int) -> list[float]:
    """Seconds from one request through the pair to the telemetry service's /metrics
    counting it (both reporters): the sidecars' flush interval plus the pipeline."""
    lags = []
    for _ in range(samples):
        before = applied_requests(telemetry)
        t0 = time.monotonic()
        if not routed(outbound, host):
            continue
        while applied_requests(telemetry) < before + 2 and time.monotonic() - t0 < 30:
            time.sleep(0.02)
        lags.append(time.monotonic() - t0)
    return lags


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-mtls", action="store_true", help="plaintext between the sidecars")
    ap.add_argument("--lag-samples", type=int, default=5, help="request -> /metrics samples")
    args = ap.parse_args(argv)
    mtls = not args.no_mtls
    services = ("registry", "config", "telemetry") + (("ca",) if mtls else ())
    cluster = Cluster(temp_dir(), services)
    try:
        work = cluster.work
        app_port = free_port()
        cluster.procs.append(start("upstream", [PY, "-m", "bench.upstream", str(app_port)], work))
        # (label, server service, client service, extra sidecar flags)
        pairs = [("telemetry", "app", "client", []), ("no_telemetry", "app-nt", "client-nt",
                 ["--no-telemetry"])]  # fmt: skip
        outbound: dict[str, int] = {}
        admins: list[str] = []
        sidecars: dict[str, list[ManagedProcess]] = {}
        for label, server, client, extra in pairs:
            outbound[label] = free_port()
            started = [
                cluster.sidecar(
                    f"{server}-sidecar",
                    ["--service", server, "--version", "v1", "--app-port", str(app_port), *extra],
                    mtls,
                ),
                cluster.sidecar(
                    f"{client}-sidecar",
                    ["--service", client, "--app-port", "9", "--outbound-port",
                     str(outbound[label]), *extra],
                    mtls,
                ),
            ]  # fmt: skip
            admins += [a for a, _ in started]
            sidecars[label] = [p for _, p in started]
        pipeline = [cluster.process("telemetry")]  # the consumer; nats-server is not ours
        wait_until(lambda: all(http_ok(f"{a}/ready") for a in admins), "sidecars ready")
        # first requests: the client sidecars learn their destination
        for label, server, _, _ in pairs:
            wait_until(lambda o=outbound[label], s=server: routed(o, s), f"route via {label}")

        direct: list[dict[str, float]] = []
        meshed: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in pairs}
        # CPU microseconds per request: the pair's two sidecars, and the telemetry service
        cpu_us: dict[str, list[float]] = {label: [] for label, *_ in pairs}
        pipeline_us: list[float] = []
        wrk = {"seconds": args.seconds, "connections": args.connections}
        counted_before = applied_requests(cluster.http["telemetry"])
        for i in range(args.repeats):
            direct.append(run_wrk(f"http://127.0.0.1:{app_port}/", **wrk))
            # alternate which pair goes first, so neither always runs on a warmer machine
            for label, server, _, _ in pairs if i % 2 == 0 else reversed(pairs):
                before = cpu_seconds(sidecars[label]), cpu_seconds(pipeline)
                row = run_wrk(f"http://127.0.0.1:{outbound[label]}/", host=server, **wrk)
                after = cpu_seconds(sidecars[label]), cpu_seconds(pipeline)
                meshed[label].append(row)
                per_request = 1e6 / max(row["requests"], 1.0)
                cpu_us[label].append((after[0] - before[0]) * per_request)
                if label == "telemetry":
                    pipeline_us.append((after[1] - before[1]) * per_request)
        # A/B: both pairs under load at the same time
        ab: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in pairs}
        ab_cpu_us: dict[str, list[float]] = {label: [] for label, *_ in pairs}
        with concurrent.futures.ThreadPoolExecutor(len(pairs)) as pool:
            for _ in range(args.repeats):
                before_ab = {label: cpu_seconds(sidecars[label]) for label, *_ in pairs}
                futures = {
                    label: pool.submit(
                        run_wrk, f"http://127.0.0.1:{outbound[label]}/", host=server, **wrk
                    )
                    for label, server, _, _ in pairs
                }
                rows = {label: f.result() for label, f in futures.items()}
                for label, row in rows.items():
                    ab[label].append(row)
                    spent = cpu_seconds(sidecars[label]) - before_ab[label]
                    ab_cpu_us[label].append(spent * 1e6 / max(row["requests"], 1.0))
        # the telemetry service keeps up: everything the pair did is counted, both reporters
        sent = 2 * sum(r["requests"] for r in meshed["telemetry"] + ab["telemetry"])
        deadline = time.monotonic() + 30
        while (counted := applied_requests(cluster.http["telemetry"]) - counted_before) < sent:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)

        lags = telemetry_lag(
            outbound["telemetry"], "app", cluster.http["telemetry"], args.lag_samples
        )

        def med(rows: list[dict[str, float]], key: str) -> float:
            return median([r.get(key, 0.0) for r in rows])

        keys = ("rps", "p50_ms", "p90_ms", "p99_ms", "non_2xx")
        result: dict[str, object] = {
            "connections": args.connections,
            "seconds": args.seconds,
            "repeats": args.repeats,
            "mtls": mtls,
            "direct": {k: med(direct, k) for k in keys[:4]},
            "sidecar_pair": {k: med(meshed["telemetry"], k) for k in keys},
            "sidecar_pair_no_telemetry": {k: med(meshed["no_telemetry"], k) for k in keys},
            "sidecar_pair_cpu_us_per_request": round(median(cpu_us["telemetry"]), 1),
            "sidecar_pair_no_telemetry_cpu_us_per_request": round(
                median(cpu_us["no_telemetry"]), 1
            ),
            "ab": {
                label: {
                    "rps": med(ab[label], "rps"),
                    "p50_ms": med(ab[label], "p50_ms"),
                    "p99_ms": med(ab[label], "p99_ms"),
                    "cpu_us_per_request": round(median(ab_cpu_us[label]), 1),
                }
                for label, *_ in pairs
            },
            # while the pair ran: the telemetry service's own CPU (the stream is consumed
            # as it fills, so this is its cost per request, both reporters)
            "telemetry_service_cpu_us_per_request": round(median(pipeline_us), 1),
            # both reporters; wrk's count misses requests in flight when it stops
            "telemetry_requests_counted": counted,
            "telemetry_requests_sent_x2": sent,
            # one request through the pair -> counted on the telemetry service's /metrics
            "telemetry_lag_p50_s": round(median(lags), 3),
            "telemetry_lag_max_s": round(max(lags, default=0.0), 3),
        }
        ab_result: dict[str, dict[str, float]] = result["ab"]  # type: ignore[assignment]
        pair: dict[str, float] = result["sidecar_pair"]  # type: ignore[assignment]
        bare: dict[str, float] = result["sidecar_pair_no_telemetry"]  # type: ignore[assignment]
        base: dict[str, float] = result["direct"]  # type: ignore[assignment]
        result["rps_ratio_sidecar_over_direct"] = round(pair["rps"] / base["rps"], 3)
        result["rps_ratio_telemetry_on_over_off"] = round(pair["rps"] / bare["rps"], 3)
        ab_on, ab_off = ab_result["telemetry"], ab_result["no_telemetry"]
        result["ab_rps_ratio_telemetry_on_over_off"] = round(ab_on["rps"] / ab_off["rps"], 3)
        on_cpu, off_cpu = ab_on["cpu_us_per_request"], ab_off["cpu_us_per_request"]
        paired = [
            a - b for a, b in zip(ab_cpu_us["telemetry"], ab_cpu_us["no_telemetry"], strict=True)
        ]
        result["telemetry_sidecar_cpu_us_per_request"] = round(median(paired), 1)
        for p in ("p50_ms", "p99_ms"):
            result[f"added_{p}"] = round(pair[p] - base[p], 3)
            result[f"telemetry_added_{p}"] = round(pair[p] - bare[p], 3)
        write_result("dataplane", result)
        print_rows(
            f"data plane: wrk, {args.connections} connections, {args.seconds}s x "
            f"{args.repeats} (medians), {'mTLS' if mtls else 'plaintext'} between sidecars",
            [
                ("direct requests/s", f"{base['rps']:.0f}"),
                ("sidecar pair requests/s (telemetry on)", f"{pair['rps']:.0f}"),
                ("sidecar pair requests/s (--no-telemetry)", f"{bare['rps']:.0f}"),
                ("ratio sidecar/direct", f"{result['rps_ratio_sidecar_over_direct']}"),
                (
                    "ratio telemetry on/off, one after the other",
                    f"{result['rps_ratio_telemetry_on_over_off']}",
                ),
                (
                    "A/B requests/s telemetry on / off",
                    f"{ab_on['rps']:.0f} / {ab_off['rps']:.0f} "
                    f"(ratio {result['ab_rps_ratio_telemetry_on_over_off']})",
                ),
                ("added p50 / p99 ms", f"{result['added_p50_ms']} / {result['added_p99_ms']}"),
                (
                    "telemetry added p50 / p99 ms",
                    f"{result['telemetry_added_p50_ms']} / {result['telemetry_added_p99_ms']}",
                ),
                (
                    "A/B sidecar pair CPU us/request on / off",
                    f"{on_cpu} / {off_cpu} (telemetry: "
                    f"{result['telemetry_sidecar_cpu_us_per_request']} us for both sidecars)",
                ),
                (
                    "telemetry service CPU us/request",
                    str(result["telemetry_service_cpu_us_per_request"]),
                ),
                ("requests counted by telemetry / sent x2", f"{counted:.0f} / {sent:.0f}"),
                (
                    "request -> counted on telemetry /metrics, p50 / max s",
                    f"{result['telemetry_lag_p50_s']} / {result['telemetry_lag_max_s']}",
                ),
            ],
        )
        return result
    finally:
        cluster.stop()


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
