"""The chaos suite's cluster: `meshctl up --replicas 3` as a user gets it (three
nats-server nodes, three etcd members, three replicas of every control-plane service,
per-role NATS users, etcd authentication), started in this process through
`DevCluster` so a test can kill, pause and restart any one process; sidecars run as
`meshctl sidecar` processes in front of `echo_app.py`; `Load` sends steady traffic
through a client sidecar and counts every request that did not get a 200."""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.servers import (
    EtcdServer,
    ManagedProcess,
    NatsServer,
    free_port,
    http_ok,
    stop_together,
)
from meshctl.devcluster import DevCluster
from meshctl.serverstatus import etcd_member, nats_node
from tests.support import wait_for

MESHCTL = [sys.executable, "-m", "meshctl.main"]
ECHO_APP = Path(__file__).with_name("echo_app.py")


@dataclass
class Sidecar:
    name: str
    service: str
    proc: ManagedProcess
    admin: str
    inbound: int
    outbound: int

    def ready(self) -> bool:
        return http_ok(self.admin + "/ready")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.admin + "/config_dump", timeout=2) as r:
            return dict(json.loads(r.read()))


@dataclass
class ChaosCluster:
    state: Path
    dev: DevCluster
    sidecars: list[Sidecar] = field(default_factory=list)

    @classmethod
    @contextlib.contextmanager
    def running(cls, tmp_path: Path) -> Iterator[ChaosCluster]:
        state = tmp_path / "mesh"
        dev = DevCluster(state, replicas=3, etcd_auth=True)
        dev.start()
        cluster = cls(state, dev)
        try:
            yield cluster
        finally:
            # together: their drains overlap instead of adding up (6.5 s -> 2.2 s)
            stop_together([sc.proc for sc in cluster.sidecars], timeout=15)
            for proc in dev.processes:
                if proc.alive():
                    proc.resume()
            dev.stop()

    # ------------------------------------------------------------ the control plane

    def replicas(self, service: str) -> list[ManagedProcess]:
        return [p for p in self.dev.processes if p.name.startswith(f"{service}-")]

    def health(self, replica: str) -> dict[str, Any] | None:
        info = next(i for i in self.dev.replica_info if i.replica == replica)
        try:
            with urllib.request.urlopen(info.http + "/healthz", timeout=1) as r:
                return dict(json.loads(r.read()))
        except Exception:
            return None

    def leader(self, service: str) -> str | None:
        """The replica of `service` that says it leads (None: none does now)."""
        leaders = [
            p.name for p in self.replicas(service) if (self.health(p.name) or {}).get("leader")
        ]
        return leaders[0] if len(leaders) == 1 else None

    def process(self, name: str) -> ManagedProcess:
        return next(p for p in self.dev.processes if p.name == name)

    def wait_replica_ready(self, name: str, timeout: float = 30.0) -> None:
        info = next(i for i in self.dev.replica_info if i.replica == name)
        wait_for(lambda: http_ok(info.http + "/readyz"), timeout=timeout)

    @property
    def nats(self) -> list[NatsServer]:
        return self.dev.nats

    @property
    def etcd(self) -> list[EtcdServer]:
        return self.dev.etcd

    def etcd_leader(self) -> EtcdServer | None:
        return next((n for n in self.etcd if etcd_member(n.name, n.url)["leader"]), None)

    def nats_connections(self, node: NatsServer) -> int:
        return int(
            nats_node(node.name, node.url, f"http://{node.host}:{node.monitor_port}")["connections"]
            or 0
        )

    # ------------------------------------------------------------ meshctl

    def meshctl(self, *args: str, check: bool = True, timeout: float = 60) -> Any:
        done = subprocess.run(
            [*MESHCTL, "--state-dir", str(self.state), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"meshctl {' '.join(args)} failed:\n{done.stderr}")
        return done

    def apply(self, text: str, name: str = "chaos.yaml") -> None:
        path = self.state / name
        path.write_text(text)
        self.meshctl("apply", "-f", str(path))

    def proxy_status(self) -> list[dict[str, Any]]:
        return list(json.loads(self.meshctl("proxy-status", "-o", "json").stdout))

    def all_synced(self, expect: int) -> bool:
        """Every one of `expect` proxies reports, and all it follows is SYNCED."""
        rows = self.proxy_status()
        if len({r["proxy"] for r in rows}) >= expect and all(
            r.get("state") == "SYNCED" for r in rows
        ):
            return True
        raise AssertionError(f"proxy-status: {rows}")

    @contextlib.contextmanager
    def watch_status_reports(self, into: list[tuple[float, str]]) -> Iterator[None]:
        """Append (arrival time, proxy) for every proxy status report on the bus, from a
        thread of its own, until the block ends."""
        import asyncio

        from mesh.messages import ProxyStatus
        from tests.support import connect_cluster_bus

        doc = json.loads((self.state / "cluster.json").read_text())
        stop = threading.Event()
        subscribed = threading.Event()

        async def watch() -> None:
            bus = await connect_cluster_bus(doc, role="control", name="chaos-watch")

            async def on_report(report: ProxyStatus, _subject: str) -> None:
                if report.sent_at >= 0:
                    into.append((time.monotonic(), report.proxy))

            await bus.subscribe(bus.subjects.proxy_status, ProxyStatus, on_report)
            subscribed.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            await bus.close()

        thread = threading.Thread(target=asyncio.run, args=(watch(),), daemon=True)
        thread.start()
        subscribed.wait(15)
        try:
            yield
        finally:
            stop.set()
            thread.join(10)

    # ------------------------------------------------------------ sidecars

    def sidecar(
        self, name: str, service: str, *, app: bool = True, wait: bool = True, version: str = "v1"
    ) -> Sidecar:
        admin, inbound, outbound, app_port = (free_port() for _ in range(4))
        args = [
            *MESHCTL, "--state-dir", str(self.state), "sidecar",
            "--service", service, "--version", version, "--instance", name,
            "--admin-port", str(admin), "--inbound-port", str(inbound),
            "--outbound-port", str(outbound), "--app-port", str(app_port),
            "--drain-timeout", "5",
        ]  # fmt: skip
        if app:
            args += ["--", sys.executable, str(ECHO_APP)]
        proc = ManagedProcess(name, args, self.state / "logs" / f"sidecar-{name}.log")
        proc.start()
        sc = Sidecar(name, service, proc, f"http://127.0.0.1:{admin}", inbound, outbound)
        self.sidecars.append(sc)
        if wait:
            wait_for(sc.ready, timeout=30)
        return sc


@dataclass
class Load:
    """Steady requests (`rate` per second over `workers` keep-alive connections) to
    `host` through a sidecar's outbound listener. Every answer that is not a 200, and
    every connection error, is a failure (with its time and what it was)."""

    port: int
    host: str
    rate: float = 100.0
    workers: int = 4
    sent: int = 0
    failed: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)
    served_by: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        for i in range(self.workers):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def _run(self, worker: int) -> None:
        period = self.workers / self.rate
        conn: http.client.HTTPConnection | None = None
        n = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at += period
            n += 1
            outcome = ""
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", f"/w{worker}/{n}", headers={"Host": self.host})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    outcome = f"{resp.status} {resp.getheader('x-mesh-flags', '')} {body[:80]!r}"
                else:
                    served = json.loads(body).get("instance", "")
                    with self._lock:
                        self.served_by[served] = self.served_by.get(served, 0) + 1
                if resp.will_close:
                    conn.close()
                    conn = None
            except Exception as e:
                outcome = f"{type(e).__name__}: {e}"
                if conn is not None:
                    conn.close()
                conn = None
            with self._lock:
                self.sent += 1
                if outcome:
                    self.failed += 1
                    self.failures.append((time.time(), outcome))
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()

    def wait_sent(self, more: int, timeout: float = 30.0) -> None:
        target = self.sent + more
        wait_for(lambda: self.sent >= target, timeout=timeout)

    def report(self, fault: str, recovery_s: float | None = None) -> str:
        """One line for the closing note's table, printed (pytest -s, or the log)."""
        rec = f", recovered in {recovery_s:.2f}s" if recovery_s is not None else ""
        line = f"CHAOS {fault}: {self.sent} requests sent, {self.failed} failed{rec}"
        print(line)
        return line
