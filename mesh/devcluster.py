"""`meshctl up`: a whole local cluster — nats-server, etcd, every control-plane service
(N replicas each) — started from the binaries in this environment, described in
`<state-dir>/cluster.json` (DESIGN §9), and stopped again by `meshctl down`.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.servers import (
    EtcdServer,
    ManagedProcess,
    NatsServer,
    ServerError,
    free_port,
    http_ok,
    pid_alive,
    stop_pid,
)

CLUSTER_FILE = "cluster.json"
# start order; `down` stops in reverse
SERVICE_ORDER = ["registry", "ca", "config", "telemetry"]


@dataclass
class ReplicaInfo:
    service: str
    replica: str
    pid: int
    http: str
    log: str


@dataclass
class DevCluster:
    state_dir: Path
    replicas: int = 1
    prefix: str = "mesh"
    services: list[str] = field(default_factory=lambda: list(SERVICE_ORDER))
    report: Callable[[str], None] = lambda _m: None
    nats: list[NatsServer] = field(default_factory=list)
    etcd: list[EtcdServer] = field(default_factory=list)
    processes: list[ManagedProcess] = field(default_factory=list)
    replica_info: list[ReplicaInfo] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nats_urls(self) -> list[str]:
        return [s.url for s in self.nats]

    @property
    def etcd_urls(self) -> list[str]:
        return [s.url for s in self.etcd]

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        existing = self.state_dir / CLUSTER_FILE
        if existing.exists() and any(
            pid_alive(p["pid"]) for p in _all_pids(json.loads(existing.read_text()))
        ):
            raise ServerError(
                f"a cluster is already running from {self.state_dir} (stop it with `meshctl down`)"
            )
        t0 = time.monotonic()
        try:
            self._start_servers()
            self._start_services()
            self.write_cluster_file()
        except BaseException:
            self.stop()
            raise
        self.report(f"control plane ready in {time.monotonic() - t0:.1f}s")

    def _step(self, label: str, fn: Callable[[], object]) -> None:
        t = time.monotonic()
        self.report(f"  starting {label} ...")
        fn()
        self.report(f"  {label} ready ({time.monotonic() - t:.2f}s)")

    def _start_servers(self) -> None:
        data = self.state_dir / "data"
        nats = NatsServer(data / "nats", name="nats-0")
        self._step("nats-server (JetStream)", lambda: nats.start())
        self.nats.append(nats)
        etcd = EtcdServer(data / "etcd", name="etcd-0")
        self._step("etcd", lambda: etcd.start())
        self.etcd.append(etcd)

    def _start_services(self) -> None:
        logs_dir = self.state_dir / "logs"
        pending: list[tuple[ReplicaInfo, ManagedProcess]] = []
        for service in self.services:
            for i in range(self.replicas):
                replica = f"{service}-{i}"
                port = free_port()
                args = [
                    sys.executable, "-m", "mesh.cli.main", "serve", service,
                    "--nats", ",".join(self.nats_urls),
                    "--etcd", ",".join(self.etcd_urls),
                    "--prefix", self.prefix,
                    "--http-port", str(port),
                    "--replica", replica,
                    *self.service_args(service),
                ]  # fmt: skip
                env = dict(os.environ, MESH_LOG_FORMAT="json")
                proc = ManagedProcess(replica, args, logs_dir / f"{replica}.log", env=env)
                proc.start()
                self.processes.append(proc)
                info = ReplicaInfo(
                    service, replica, proc.pid, f"http://127.0.0.1:{port}", str(proc.log_path)
                )
                self.replica_info.append(info)
                pending.append((info, proc))
        self.report(
            f"  starting {len(pending)} control-plane replicas: {', '.join(self.services)} ..."
        )
        deadline = time.monotonic() + 60
        waiting = list(pending)
        while waiting:
            for info, proc in list(waiting):
                if not proc.alive():
                    raise ServerError(f"{info.replica} exited during start-up:\n{proc.log_tail()}")
                if http_ok(info.http + "/readyz"):
                    waiting.remove((info, proc))
                    self.report(f"  {info.replica} ready ({info.http})")
            if time.monotonic() > deadline:
                names = ", ".join(i.replica for i, _ in waiting)
                raise ServerError(f"not ready after 60s: {names}")
            time.sleep(0.05)

    def service_args(self, service: str) -> list[str]:
        args = list(self.extra.get("service_args", {}).get(service, []))
        if service == "ca":
            args += ["--set", f"kek-file={self.ca_kek_file()}"]
        return args

    def ca_kek_file(self) -> Path:
        """The CA's key-encryption key for this local cluster: generated once, kept
        (0600) in the state dir so the root CA survives `down`/`up`."""
        path = self.state_dir / "ca-kek"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
        return path

    def cluster_document(self) -> dict[str, Any]:
        services: dict[str, list[dict[str, Any]]] = {}
        for info in self.replica_info:
            services.setdefault(info.service, []).append(
                {"replica": info.replica, "pid": info.pid, "http": info.http, "log": info.log}
            )
        doc: dict[str, Any] = {
            "nats": self.nats_urls,
            "etcd": self.etcd_urls,
            "prefix": self.prefix,
            "services": services,
            "servers": {
                "nats": [
                    {
                        "name": s.name,
                        "pid": s.process.pid if s.process else 0,
                        "monitor": f"http://{s.host}:{s.monitor_port}",
                    }
                    for s in self.nats
                ],
                "etcd": [
                    {"name": s.name, "pid": s.process.pid if s.process else 0} for s in self.etcd
                ],
            },
            "sidecars": {},
            "supervisor_pid": os.getpid(),
        }
        if "telemetry" in services:
            first = services["telemetry"][0]["http"]
            doc["telemetry"] = {"metrics": f"{first}/metrics", "dashboard": f"{first}/"}
        doc.update(self.extra.get("cluster", {}))
        return doc

    def write_cluster_file(self) -> Path:
        path = self.state_dir / CLUSTER_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cluster_document(), indent=2) + "\n")
        tmp.replace(path)
        return path

    def stop(self) -> None:
        """Stop everything this object started, services first, servers last."""
        for proc in reversed(self.processes):
            proc.stop(timeout=10)
        for etcd in self.etcd:
            etcd.stop()
        for nats in self.nats:
            nats.stop()


def _all_pids(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process a cluster.json names, in the order `down` stops them."""
    out: list[dict[str, Any]] = []
    for name, sc in doc.get("sidecars", {}).items():
        if sc.get("pid"):
            out.append({"name": name, "pid": sc["pid"]})
    for extra in doc.get("processes", []):
        out.append(extra)
    for service in reversed(SERVICE_ORDER):
        for r in doc.get("services", {}).get(service, []):
            out.append({"name": r.get("replica", service), "pid": r["pid"]})
    for kind in ("etcd", "nats"):
        for s in doc.get("servers", {}).get(kind, []):
            if s.get("pid"):
                out.append({"name": s["name"], "pid": s["pid"]})
    return out


def down(state_dir: Path, report: Callable[[str], None]) -> int:
    """Stop every process recorded in cluster.json; returns how many were still running."""
    path = state_dir / CLUSTER_FILE
    if not path.exists():
        report(f"no cluster recorded in {path}")
        return 0
    doc = json.loads(path.read_text())
    supervisor = doc.get("supervisor_pid")
    if (
        supervisor
        and supervisor != os.getpid()
        and pid_alive(supervisor)
        and _is_meshctl(supervisor)
    ):
        # a foreground `meshctl up` owns the processes: ask it to stop them in order
        stop_pid(supervisor, timeout=30)
    stopped = 0
    for entry in _all_pids(doc):
        pid = entry["pid"]
        if pid_alive(pid):
            stopped += 1
            ok = stop_pid(pid, timeout=10)
            report(
                f"  stopped {entry['name']} (pid {pid})"
                if ok
                else f"  could not stop {entry['name']} (pid {pid})"
            )
    path.unlink(missing_ok=True)
    return stopped


def _is_meshctl(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"meshctl" in cmdline or b"mesh.cli" in cmdline
