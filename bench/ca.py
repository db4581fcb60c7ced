"""Certificate authority: how fast one replica signs, and how long a root rotation
takes to reach every sidecar.

- signing: token-authenticated `mesh.ca.sign` requests with fresh CSRs (keys and CSRs
  are made before the clock starts), one at a time and 16 in flight; then renewals
  (authenticated by the current certificate and a proof) the same two ways. The CPU
  used by the CA, the client, nats-server and etcd is reported beside each rate, so
  it shows who the bottleneck was.
- rotation: N `WorkloadIdentity` instances (simulated sidecars, this process, each
  with its own bootstrap token and NATS connection) hold certificates; `rotate_root`
  is requested as `meshctl ca rotate-root` does; the figure is the time from the
  request to every sidecar holding a certificate whose chain verifies against the
  new root. Run once with the CA's default `rotate-settle` / `rotate-spread` and once
  with `rotate-spread=0s`, so the deliberate spread can be told from the work.

The CA replica, nats-server and etcd run as their own processes, on the same
machine as this client.

    python -m bench.ca [--sidecars 100] [--sign-seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import secrets
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families

from bench.common import median, percentile, print_rows, temp_dir, write_result
from mesh import errors, identity, logs
from mesh.bus import Bus
from mesh.ca_messages import (
    BundleGetRequest,
    CAStatusReply,
    CAStatusRequest,
    CASubjects,
    RotateRootReply,
    RotateRootRequest,
    SignReply,
    SignRequest,
    TokenCreateReply,
    TokenCreateRequest,
    TrustBundle,
)
from mesh.servers import EtcdServer, ManagedProcess, NatsServer, free_port, http_ok
from proxy import identity_client
from proxy.identity_client import WorkloadIdentity
from services.ca.settings import load_settings

IN_FLIGHT = 16
POLL_S = 0.005
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def machine_busy_seconds() -> float:
    """CPU time spent by every core on anything but idle and iowait, so far."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK


@dataclass
class CPUMeter:
    """CPU used by each process over a window, as % of one core; `other` is what the
    rest of the machine used meanwhile (other work disturbs the figures)."""

    pids: dict[str, int]
    started: float = 0.0
    before: dict[str, float] = field(default_factory=dict)
    busy_before: float = 0.0

    def start(self) -> None:
        self.started = time.perf_counter()
        self.before = {name: self._cpu(pid) for name, pid in self.pids.items()}
        self.busy_before = machine_busy_seconds()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.started
        used = {name: self._cpu(pid) - self.before[name] for name, pid in self.pids.items()}
        other = machine_busy_seconds() - self.busy_before - sum(used.values())
        return {
            **{name: round(100 * cpu / wall, 1) for name, cpu in used.items()},
            "other": round(max(0.0, 100 * other / wall), 1),
        }

    @staticmethod
    def _cpu(pid: int) -> float:
        return time.process_time() if pid == os.getpid() else cpu_seconds(pid)


@dataclass
class CAReplica:
    """One `meshctl serve ca` process on its own subject/etcd prefix."""

    work: Path
    nats_url: str
    etcd_url: str
    prefix: str
    options: dict[str, str]
    http_port: int = 0
    process: ManagedProcess | None = None

    def start(self) -> None:
        self.http_port = free_port()
        sets = [a for k, v in self.options.items() for a in ("--set", f"{k}={v}")]
        self.process = ManagedProcess(
            f"ca-{self.prefix}",
            [
                sys.executable, "-m", "meshctl.main", "serve", "ca",
                "--nats", self.nats_url,
                "--etcd", self.etcd_url,
                "--prefix", self.prefix,
                "--http-port", str(self.http_port),
                *sets,
            ],
            self.work / f"ca-{self.prefix}.log",
        )  # fmt: skip
        self.process.start()

    async def wait_ready(self, bus: Bus, timeout: float = 30.0) -> None:
        """Ready, elected, and holding a root."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise SystemExit(f"the CA exited:\n{self.process.log_tail()}")
            if http_ok(f"http://127.0.0.1:{self.http_port}/readyz"):
                try:
                    status = await bus.request(
                        CASubjects.of(bus.subjects).status, CAStatusRequest(), CAStatusReply
                    )
                    if status.roots:
                        return
                except errors.MeshError:
                    pass
            await asyncio.sleep(0.1)
        raise SystemExit(f"the CA was not ready after {timeout:g}s:\n{self.process.log_tail()}")

    def counters(self) -> dict[str, float]:
        """The CA's sign counters from /metrics: signed by kind, refused, unavailable."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        out = {"bootstrap": 0.0, "renewal": 0.0, "refused": 0.0, "unavailable": 0.0}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "mesh_ca_certificates_signed_total":
                    out[s.labels["kind"]] = s.value
                elif s.name == "mesh_ca_sign_refused_total":
                    out["refused"] += s.value
                elif (
                    s.name == "mesh_service_requests_total"
                    and s.labels.get("subject") == "sign"
                    and s.labels.get("outcome") == "unavailable"
                ):
                    out["unavailable"] += s.value
        return out

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)


async def create_token(bus: Bus, sa: str) -> str:
    reply = await bus.request(
        CASubjects.of(bus.subjects).token_create,
        TokenCreateRequest(namespace="default", service_account=sa, ttl_s=3600),
        TokenCreateReply,
    )
    return reply.token


def fresh_csr(uri: str) -> tuple[str, ec.EllipticCurvePrivateKey]:
    key = identity.generate_key()
    return identity.csr_pem(identity.create_csr(key, uri)).decode(), key


# ---------------------------------------------------------------- signing rate


async def sign_for(
    bus: Bus, requests: Iterator[SignRequest], in_flight: int, seconds: float
) -> tuple[int, float]:
    """Send prepared requests, `in_flight` at a time, until `seconds` pass or they run
    out; (replies, elapsed seconds). Any error is a failure of the benchmark."""
    done = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def worker() -> None:
        nonlocal done
        for req in requests:  # one shared iterator: each request is sent once
            await bus.request(bus.subjects.ca_sign, req, SignReply, timeout=10)
            done += 1
            if time.perf_counter() >= deadline:
                return

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return done, time.perf_counter() - started


async def signing(bus: Bus, seconds: float, meter: CPUMeter) -> dict[str, dict[str, Any]]:
    uri = identity.spiffe_id(identity.DEFAULT_TRUST_DOMAIN, "default", "bench-signer")
    token = await create_token(bus, "bench-signer")

    def bootstrap_requests(n: int) -> list[SignRequest]:
        return [SignRequest(csr=fresh_csr(uri)[0], token=token) for _ in range(n)]

    # warm up, and learn how many fresh CSRs a phase may need
    warm, warm_s = await sign_for(bus, iter(bootstrap_requests(300)), IN_FLIGHT, 1.0)
    fastest = warm / warm_s

    csr, key = fresh_csr(uri)
    current = await bus.request(
        bus.subjects.ca_sign, SignRequest(csr=csr, token=token), SignReply, timeout=10
    )

    def renewal_requests(n: int) -> list[SignRequest]:
        out = []
        for _ in range(n):
            csr = fresh_csr(uri)[0]
            proof = identity.renewal_proof(key, csr.encode())
            out.append(SignRequest(csr=csr, chain=current.chain, proof=proof))
        return out

    results: dict[str, dict[str, Any]] = {}
    for kind, make in (("bootstrap", bootstrap_requests), ("renewal", renewal_requests)):
        for in_flight in (1, IN_FLIGHT):
            prepared = make(int(fastest * seconds * 2) + 200)  # before the clock starts
            meter.start()
            done, elapsed = await sign_for(bus, iter(prepared), in_flight, seconds)
            cpu = meter.stop()
            fastest = max(fastest, done / elapsed)
            name = f"{kind}_{'sequential' if in_flight == 1 else f'{in_flight}_in_flight'}"
            results[name] = {
                "per_s": round(done / elapsed, 1),
                "signed": done,
                "seconds": round(elapsed, 2),
                "cpu_pct_of_one_core": cpu,
                # the prepared CSRs ran out before `seconds`: the window was shorter
                "ran_out": done == len(prepared),
            }
    return results


# ---------------------------------------------------------------- root rotation


def signed_by(snap_chain: bytes, root: x509.Certificate) -> bool:
    certs = identity.load_certs(snap_chain)
    try:
        identity.verify_chain(certs[0], certs[1:], [root], dt.datetime.now(dt.UTC))
    except identity.VerificationError:
        return False
    return True


async def rotation(
    ca: CAReplica, bus: Bus, n: int, meter: CPUMeter, timeout: float
) -> dict[str, Any]:
    tokens = [await create_token(bus, f"sidecar-{i}") for i in range(n)]
    buses: list[Bus] = []
    idents: list[WorkloadIdentity] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(n):
            b = await Bus.connect([ca.nats_url], name=f"bench-sidecar-{i}", prefix=ca.prefix)
            buses.append(b)
            idents.append(
                WorkloadIdentity(
                    b, namespace="default", service_account=f"sidecar-{i}", token=tokens[i]
                )
            )
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def start(ident: WorkloadIdentity) -> None:
            async with gate:
                await asyncio.wait_for(ident.start(), 30)

        await asyncio.gather(*(start(i) for i in idents))
        tasks = [
            asyncio.create_task(ident.run(), name=f"identity:renew:{k}")
            for k, ident in enumerate(idents)
        ]
        old = await bus.request(bus.subjects.ca_bundle_get, BundleGetRequest(), TrustBundle)
        await asyncio.sleep(0.5)  # every sidecar has settled on its first certificate
        old_serials = [ident.current().serial for ident in idents]
        before = ca.counters()

        meter.start()
        t0 = time.perf_counter()
        rotate = asyncio.create_task(
            bus.request(
                CASubjects.of(bus.subjects).rotate_root,
                RotateRootRequest(),
                RotateRootReply,
                timeout=60,
            ),
            name="rotate-root",
        )
        active_at: float | None = None
        moved_at: list[float | None] = [None] * n
        checked: dict[str, bool] = {}  # serial -> signed by the new root
        failures: dict[int, str] = {}
        while True:
            now = time.perf_counter()
            if active_at is None and rotate.done():
                active_at = now
                rotate.result()  # a refusal ends the benchmark here
            for k, ident in enumerate(idents):
                if ident.failures or ident.last_error:
                    failures.setdefault(k, ident.last_error)
                if moved_at[k] is not None:
                    continue
                snap = ident.current()
                if snap.serial == old_serials[k]:
                    continue
                if snap.serial not in checked:
                    new_roots = [
                        c
                        for pem in snap.bundle.roots
                        for c in identity.load_certs(pem)
                        if identity.fingerprint(c) == snap.bundle.signing_root
                        and snap.bundle.signing_root != old.signing_root
                    ]
                    checked[snap.serial] = bool(new_roots) and signed_by(
                        snap.chain_pem, new_roots[0]
                    )
                if checked[snap.serial]:
                    moved_at[k] = now
            if all(m is not None for m in moved_at) and active_at is not None:
                break
            if now - t0 > timeout:
                left = sum(m is None for m in moved_at)
                raise SystemExit(f"root rotation: {left} of {n} sidecars not moved in {timeout}s")
            await asyncio.sleep(POLL_S)
        cpu = meter.stop()
        reply = rotate.result()
        after = ca.counters()
        moved = [m - t0 for m in moved_at if m is not None]
        last_moved = max(moved)
        since_active = [m - (active_at - t0) for m in moved]
        moved_before_reply = sum(s < 0 for s in since_active)
        for ident in idents:
            if ident.current().bundle.signing_root != reply.active.fingerprint:
                raise SystemExit("root rotation: a sidecar moved to a root the CA did not name")
        return {
            "sidecars": n,
            "request_to_new_root_signing_s": round(active_at - t0, 3),
            "new_root_signing_to_all_moved_s": round(last_moved - (active_at - t0), 3),
            "request_to_all_moved_s": round(last_moved, 3),
            "moved_after_request_p50_s": round(median(moved), 3),
            "moved_after_request_p99_s": round(percentile(moved, 99), 3),
            "moved_before_rotate_reply": moved_before_reply,
            "renewals_served": int(after["renewal"] - before["renewal"]),
            "bootstraps_served": int(after["bootstrap"] - before["bootstrap"]),
            "ca_refused": int(after["refused"] - before["refused"]),
            "ca_unavailable": int(after["unavailable"] - before["unavailable"]),
            "sidecar_failures": len(failures),
            "failure_errors": sorted(set(failures.values()))[:5],
            "cpu_pct_of_one_core": cpu,
        }
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ident in idents:
            await ident.close()
        await asyncio.gather(*(b.close() for b in buses), return_exceptions=True)


# ---------------------------------------------------------------- driver


async def with_ca(
    work: Path,
    nats: NatsServer,
    etcd: EtcdServer,
    prefix: str,
    options: dict[str, str],
) -> tuple[CAReplica, Bus]:
    ca = CAReplica(work, nats.url, etcd.url, prefix, options)
    ca.start()
    bus = await Bus.connect([nats.url], name="bench-ca", prefix=prefix)
    try:
        await ca.wait_ready(bus)
    except BaseException:
        await bus.close()
        ca.stop()
        raise
    return ca, bus


async def run(sidecars: int, sign_seconds: float, work: Path, only: str = "") -> dict[str, Any]:
    kek = work / "ca-kek"
    kek.write_text(secrets.token_hex(32))
    kek.chmod(0o600)
    runs = [
        ("default", {"kek-file": str(kek)}),
        ("spread_0s", {"kek-file": str(kek), "rotate-spread": "0s"}),
    ]
    runs = [r for r in runs if not only or r[0] == only]
    nats, etcd = NatsServer(work / "nats"), EtcdServer(work / "etcd")
    ca: CAReplica | None = None
    bus: Bus | None = None
    try:
        nats.start()
        etcd.start()
        result: dict[str, Any] = {"cpus": os.cpu_count(), "signing": {}, "rotation": []}
        for k, (label, options) in enumerate(runs):
            # a fresh prefix: a fresh CA (own root, own state in etcd) for each setting
            ca, bus = await with_ca(work, nats, etcd, f"benchca{k}", options)
            assert ca.process is not None and nats.process and etcd.process
            meter = CPUMeter(
                {
                    "ca": ca.process.pid,
                    "client": os.getpid(),
                    "nats": nats.process.pid,
                    "etcd": etcd.process.pid,
                }
            )
            if k == 0:
                result["signing"] = await signing(bus, sign_seconds, meter)
            settings = load_settings(options, {})
            timeout = settings.rotate_settle_s + settings.rotate_spread_s + 60
            figures = await rotation(ca, bus, sidecars, meter, timeout)
            result["rotation"].append(
                {
                    "run": label,
                    "rotate_settle_s": settings.rotate_settle_s,
                    "rotate_spread_s": settings.rotate_spread_s,
                    **figures,
                }
            )
            await bus.close()
            bus = None
            ca.stop()
            ca = None
        return result
    finally:
        if bus is not None:
            await bus.close()
        if ca is not None:
            ca.stop()
        etcd.stop()
        nats.stop()


def rows_of(result: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for name, s in result["signing"].items():
        cpu = s["cpu_pct_of_one_core"]
        rows.append(
            (
                f"signs/s, {name.replace('_', ' ')}",
                f"{s['per_s']:.0f}  (CPU % of a core: CA {cpu['ca']:.0f}, client "
                f"{cpu['client']:.0f}, nats {cpu['nats']:.0f}, etcd {cpu['etcd']:.0f}, "
                f"other {cpu['other']:.0f})",
            )
        )
    for r in result["rotation"]:
        head = (
            f"rotate-root, {r['sidecars']} sidecars, settle {r['rotate_settle_s']:g}s "
            f"spread {r['rotate_spread_s']:g}s"
        )
        rows.append(
            (
                f"{head}: request -> all on new root",
                f"{r['request_to_all_moved_s']:.2f} s  (new root signing after "
                f"{r['request_to_new_root_signing_s']:.2f} s, then "
                f"{r['new_root_signing_to_all_moved_s']:.2f} s)",
            )
        )
        rows.append(
            (
                f"{head}: renewals served / failures",
                f"{r['renewals_served']} / sidecar {r['sidecar_failures']}, CA refused "
                f"{r['ca_refused']}, unavailable {r['ca_unavailable']}, "
                f"bootstraps {r['bootstraps_served']}",
            )
        )
    rows.append(
        (
            "machine",
            f"{result['cpus']} cores shared by the CA, the client (and all sidecars), "
            "nats-server and etcd",
        )
    )
    return rows


def quiet_sidecar_logs() -> None:
    """Warnings only: 100 sidecars' info events would drown the table (and cost the
    client CPU). The identity module binds its logger at import, before any
    `logs.configure`, so it keeps the default level unless it is bound again."""
    logs.configure("warning")
    identity_client.log = logs.get_logger("proxy.identity")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sidecars", type=int, default=100)
    ap.add_argument("--sign-seconds", type=float, default=5.0)
    ap.add_argument("--only", choices=("default", "spread_0s"), default="", help="one rotation run")
    args = ap.parse_args(argv)
    quiet_sidecar_logs()
    work = temp_dir()
    try:
        result = asyncio.run(run(args.sidecars, args.sign_seconds, work, args.only))
    except KeyboardInterrupt:
        shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException:
        print(f"bench.ca failed; the processes' logs are kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    write_result("ca", result)
    print_rows("certificate authority (bench/results/ca.json)", rows_of(result))
    failed = [
        r["run"]
        for r in result["rotation"]
        if r["sidecar_failures"] or r["ca_refused"] or r["ca_unavailable"]
    ]
    if failed:
        raise SystemExit(f"bench.ca: renewal failures during the root rotation ({failed})")
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
