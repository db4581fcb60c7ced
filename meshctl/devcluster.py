"""`meshctl up`: a whole local cluster — nats-server, etcd, every control-plane service
(N replicas each) and, with `--demo`, the bookinfo application behind sidecars and an
ingress gateway — started from the binaries in this environment, described in
`<state-dir>/cluster.json` (docs/architecture.md §2), and stopped again by `meshctl down`.

Security: nats-server runs with one user per role (`mesh.bus_permissions`: admin for
`meshctl`, control for the services, sidecar for proxies), new random passwords at
every `up`, kept in `cluster.json` (mode 0600) under `credentials.<role>`. With
`etcd_auth` (`--replicas` above 1, or `--secure`) etcd has authentication on: a root
user and a `mesh` user that may read and write `/<prefix>/` only, whose credentials
only the control-plane services get (`etcd_credentials` in cluster.json); they are
generated once and kept in `<state-dir>/etcd-auth.json` (0600), since etcd's data, and
its users, survive `down`/`up`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.bus_permissions import ROLES, authorization_conf
from mesh.port_owner import port_in_use
from mesh.proxy_records import stop_recorded_proxies
from mesh.servers import (
    EtcdServer,
    ManagedProcess,
    NatsServer,
    ServerError,
    enable_etcd_auth,
    free_port,
    http_ok,
    kill_group,
    pid_alive,
    port_free,
    stop_pid,
    stop_together,
    wait_tcp,
    write_private,
)
from meshctl import cluster_state

CLUSTER_FILE = "cluster.json"
ETCD_AUTH_FILE = "etcd-auth.json"
# start order; `down` stops in reverse
SERVICE_ORDER = ["registry", "ca", "config", "telemetry"]

# the demo: examples/bookinfo in a source checkout (not part of the installed packages)
BOOKINFO_DIR = Path(__file__).resolve().parents[1] / "examples" / "bookinfo"
BOOKINFO_WORKLOADS = [
    ("productpage", "v1"),
    ("details", "v1"),
    ("reviews", "v1"),
    ("reviews", "v2"),
    ("reviews", "v3"),
    ("ratings", "v1"),
]
BOOKINFO_RESOURCES = ["destination-rule-all.yaml", "bookinfo-gateway.yaml"]
DEFAULT_INGRESS_PORT = 8080
DEMO_READY_TIMEOUT = 60.0


@dataclass
class ReplicaInfo:
    service: str
    replica: str
    pid: int
    http: str
    log: str


@dataclass
class DemoSettings:
    """`meshctl up --demo`: requests/s of background load (0: none), the share of traces
    the demo's proxies sample (percent), the ingress port (0: 8080 if free, else any)."""

    load_rps: float = 3.0
    trace_sampling: float = 100.0
    ingress_port: int = 0
    apps_dir: Path = BOOKINFO_DIR
    # the data plane of every demo sidecar and the gateway (`--dataplane`)
    dataplane: str = "python"
    # `--intercept`: every app in its own network namespace, its traffic captured (no
    # HTTP_PROXY; docs/architecture.md §5.4)
    intercept: bool = False


@dataclass
class DemoProcess:
    """A process the demo runs, and its entry in cluster.json."""

    name: str
    kind: str  # "sidecar" | "gateway" | "load"
    proc: ManagedProcess
    record: dict[str, Any]


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
    demo: DemoSettings | None = None
    demo_processes: list[DemoProcess] = field(default_factory=list)
    ingress: str = ""
    # etcd authentication (cluster mode); also on if an earlier `up` turned it on
    etcd_auth: bool = False
    # NATS users: role -> {"user", "password"} (new at every start)
    credentials: dict[str, dict[str, str]] = field(default_factory=dict)
    # the control plane's etcd user, when etcd authentication is on
    etcd_credentials: dict[str, str] = field(default_factory=dict)
    # `up --fresh`: wipe what an earlier cluster kept here before starting
    fresh: bool = False
    # resources found in etcd at start (by kind): what an earlier cluster left
    kept_resources: dict[str, int] = field(default_factory=dict)

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
        if self.fresh:
            removed = cluster_state.purge(self.state_dir)
            if removed:
                self.report(f"--fresh: removed {', '.join(removed)} from {self.state_dir}/")
            self.state_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            self._start_servers()
            self._start_services()
            self.report(f"control plane ready in {time.monotonic() - t0:.1f}s")
            self._say_what_was_kept()
            self.write_cluster_file()
            if self.demo is not None:
                t1 = time.monotonic()
                # the demo's sidecars find the cluster (NATS, the CA) through cluster.json
                self._start_demo(self.demo)
                self.write_cluster_file()
                self.report(f"demo ready in {time.monotonic() - t1:.1f}s")
        except BaseException:
            self.stop()
            (self.state_dir / CLUSTER_FILE).unlink(missing_ok=True)
            raise

    def _say_what_was_kept(self) -> None:
        """Resources an earlier cluster left in etcd (before the demo applies its own)."""
        try:
            kinds = cluster_state.count_resources(
                self.etcd_urls,
                self.prefix,
                self.etcd_credentials.get("user"),
                self.etcd_credentials.get("password"),
            )
        except Exception as e:  # informative only: never fails the start
            self.report(f"  (could not count the resources kept in etcd: {e})")
            return
        self.kept_resources = dict(kinds)
        if kinds:
            self.report(cluster_state.describe_kept(kinds, self.state_dir))

    def _step(self, label: str, fn: Callable[[], object]) -> None:
        t = time.monotonic()
        self.report(f"  starting {label} ...")
        fn()
        self.report(f"  {label} ready ({time.monotonic() - t:.2f}s)")

    @property
    def server_nodes(self) -> int:
        """nats-server and etcd nodes: three (a quorum survives losing one) once the
        control plane is replicated three times or more, else one."""
        return 3 if self.replicas >= 3 else 1

    def _start_servers(self) -> None:
        data = self.state_dir / "data"
        auth = self.nats_auth_file(data / "nats")
        if self.server_nodes == 1:
            # recorded before they start: a stop signal during start-up stops them too
            nats = NatsServer(data / "nats", name="nats-0", config_file=auth)
            self.nats.append(nats)
            self._step("nats-server (JetStream, per-role permissions)", lambda: nats.start())
            etcd = EtcdServer(data / "etcd", name="etcd-0")
            self.etcd.append(etcd)
            self._step("etcd", lambda: etcd.start())
        else:
            self._start_server_clusters(data, auth)
        if self.etcd_auth or (self.state_dir / ETCD_AUTH_FILE).exists():
            self._step("etcd authentication", self._secure_etcd)

    def _start_server_clusters(self, data: Path, auth: Path) -> None:
        """A NATS cluster (JetStream replicated across its nodes) and an etcd cluster,
        `server_nodes` each. Their ports are kept in `data/ports.json`: etcd members know
        each other by peer URL, so a cluster restarted by a later `up` needs the same ones."""
        n = self.server_nodes
        ports = _load_ports(data / "ports.json", n)
        nats_nodes = [
            NatsServer(
                data / f"nats-{i}",
                name=f"nats-{i}",
                config_file=auth,
                port=ports["nats"][i]["port"],
                monitor_port=ports["nats"][i]["monitor_port"],
                cluster_port=ports["nats"][i]["cluster_port"],
                routes=[
                    f"nats://127.0.0.1:{ports['nats'][j]['cluster_port']}"
                    for j in range(n)
                    if j != i
                ],
            )
            for i in range(n)
        ]
        etcd_nodes = [
            EtcdServer(
                data / "etcd",
                name=f"etcd-{i}",
                client_port=ports["etcd"][i]["client_port"],
                peer_port=ports["etcd"][i]["peer_port"],
            )
            for i in range(n)
        ]
        initial = ",".join(f"{e.name}={e.peer_url}" for e in etcd_nodes)
        for e in etcd_nodes:
            e.initial_cluster = initial
        for port in [p for node in ports["nats"] + ports["etcd"] for p in node.values()]:
            if not port_free(port):
                raise ServerError(
                    f"port {port}, which this cluster's servers had before "
                    f"({data / 'ports.json'}), is in use; free it or remove that file "
                    "and the data directory to start afresh"
                )

        def start_all(nodes: list[NatsServer] | list[EtcdServer]) -> None:
            for node in nodes:
                node.start(wait=False)
            for node in nodes:
                node.wait_ready(30.0)

        self.nats.extend(nats_nodes)
        self._step(
            f"{n}-node NATS cluster (JetStream, per-role permissions)",
            lambda: start_all(nats_nodes),
        )
        self.etcd.extend(etcd_nodes)
        self._step(f"{n}-member etcd cluster", lambda: start_all(etcd_nodes))
        write_private(data / "ports.json", json.dumps(ports, indent=2) + "\n")

    def nats_auth_file(self, where: Path) -> Path:
        """nats-server's authorization config: a user per role, fresh random passwords."""
        self.credentials = {
            role: {"user": role, "password": secrets.token_urlsafe(24)} for role in ROLES
        }
        users = {role: (c["user"], c["password"]) for role, c in self.credentials.items()}
        return write_private(where / "auth.conf", authorization_conf(self.prefix, users))

    def _secure_etcd(self) -> None:
        path = self.state_dir / ETCD_AUTH_FILE
        if path.exists():
            saved = json.loads(path.read_text())
        else:
            saved = {
                "root": {"user": "root", "password": secrets.token_urlsafe(24)},
                "mesh": {"user": "mesh", "password": secrets.token_urlsafe(24)},
            }
            write_private(path, json.dumps(saved, indent=2) + "\n")
        enable_etcd_auth(
            self.etcd_urls[0],
            key_prefix=f"/{self.prefix}/",
            root_password=saved["root"]["password"],
            user=saved["mesh"]["user"],
            password=saved["mesh"]["password"],
        )
        self.etcd_credentials = dict(saved["mesh"])

    def service_env(self) -> dict[str, str]:
        """What every control-plane replica gets: the control role's NATS user and, with
        etcd authentication, the etcd user (nobody else gets that one)."""
        env = dict(os.environ, MESH_LOG_FORMAT="json")
        for name in (
            "MESH_NATS_USER",
            "MESH_NATS_PASSWORD",
            "MESH_ETCD_USER",
            "MESH_ETCD_PASSWORD",
        ):
            env.pop(name, None)
        control = self.credentials.get("control")
        if control:
            env.update(MESH_NATS_USER=control["user"], MESH_NATS_PASSWORD=control["password"])
        if self.etcd_credentials:
            env.update(
                MESH_ETCD_USER=self.etcd_credentials["user"],
                MESH_ETCD_PASSWORD=self.etcd_credentials["password"],
            )
        return env

    def _start_services(self) -> None:
        logs_dir = self.state_dir / "logs"
        pending: list[tuple[ReplicaInfo, ManagedProcess]] = []
        for service in self.services:
            for i in range(self.replicas):
                replica = f"{service}-{i}"
                port = free_port()
                args = [
                    sys.executable, "-m", "meshctl.main", "serve", service,
                    "--nats", ",".join(self.nats_urls),
                    "--etcd", ",".join(self.etcd_urls),
                    "--prefix", self.prefix,
                    "--http-port", str(port),
                    "--replica", replica,
                    *self.service_args(service),
                ]  # fmt: skip
                proc = ManagedProcess(
                    replica, args, logs_dir / f"{replica}.log", env=self.service_env()
                )
                self.processes.append(proc)
                proc.start()
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

    # ---------------------------------------------------------------- the demo

    def _start_demo(self, demo: DemoSettings) -> None:
        if not (demo.apps_dir / "productpage.py").exists():
            raise ServerError(
                f"the demo application is not in this installation ({demo.apps_dir} is "
                "missing); run `meshctl up --demo` from a source checkout"
            )
        taken = port_in_use("--ingress-port", demo.ingress_port)
        if taken:
            raise ServerError(taken)
        port = demo.ingress_port or (
            DEFAULT_INGRESS_PORT if port_free(DEFAULT_INGRESS_PORT) else free_port()
        )
        self._apply([demo.apps_dir / name for name in BOOKINFO_RESOURCES])
        self.ingress = f"http://127.0.0.1:{port}"
        names = ", ".join(f"{s}-{v}" for s, v in BOOKINFO_WORKLOADS)
        self.report(f"  starting bookinfo under sidecars: {names}; ingress gateway ...")
        for service, version in BOOKINFO_WORKLOADS:
            self._launch(self._sidecar_process(demo, service, version))
        self._launch(self._gateway_process(demo, port))
        self._wait_demo_ready()
        self._wait_productpage(self.ingress + "/productpage")
        if demo.load_rps > 0:
            load = ManagedProcess(
                "demo-load",
                [sys.executable, str(demo.apps_dir / "loadgen.py"),
                 self.ingress + "/productpage", "--rps", str(demo.load_rps)],
                self.state_dir / "logs" / "demo-load.log",
            )  # fmt: skip
            self._launch(DemoProcess("demo-load", "load", load, {"name": "demo-load"}))
            self.report(f"  background load: {demo.load_rps:g} requests/s on /productpage")

    def _meshctl(self) -> list[str]:
        return [sys.executable, "-m", "meshctl.main", "--state-dir", str(self.state_dir.resolve())]

    def _apply(self, files: list[Path]) -> None:
        args = [*self._meshctl(), "apply"]
        for f in files:
            args += ["-f", str(f)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise ServerError(f"applying the demo's resources failed:\n{done.stderr}")
        self.report(f"  applied {', '.join(f.name for f in files)}")

    def _launch(self, process: DemoProcess) -> None:
        """Start a demo process, recorded first: a stop signal arriving during start-up
        stops it too."""
        self.demo_processes.append(process)
        process.proc.start()
        process.record["pid"] = process.proc.pid

    def _sidecar_process(self, demo: DemoSettings, service: str, version: str) -> DemoProcess:
        name = f"{service}-{version}"
        app_port, admin, inbound, outbound = (free_port() for _ in range(4))
        args = [
            *self._meshctl(), "sidecar",
            "--service", service, "--version", version,
            # Istio's bookinfo service accounts, so its AuthorizationPolicies apply as written
            "--service-account", f"bookinfo-{service}",
            "--instance", f"{name}-0",
            "--app-port", str(app_port),
            "--admin-port", str(admin),
            "--inbound-port", str(inbound),
            "--outbound-port", str(outbound),
            "--trace-sampling", f"{demo.trace_sampling:g}",
            "--dataplane", demo.dataplane,
            *(["--intercept"] if demo.intercept else []),
            "--", sys.executable, str(demo.apps_dir / f"{service}.py"),
        ]  # fmt: skip
        proc = ManagedProcess(name, args, self.state_dir / "logs" / f"{name}.log")
        record: dict[str, Any] = {
            "service": service,
            "version": version,
            "dataplane": demo.dataplane,
            "admin": f"http://127.0.0.1:{admin}",
            "inbound": f"127.0.0.1:{inbound}",
            "outbound": f"127.0.0.1:{outbound}",
            "app": f"127.0.0.1:{app_port}",
            "log": str(proc.log_path),
        }
        if demo.intercept:
            # the app listens in its namespace: its address there is known once the
            # sidecar has made it (`_app_listening`)
            record["intercept"] = True
        return DemoProcess(f"{name}-0", "sidecar", proc, record)

    def _gateway_process(self, demo: DemoSettings, port: int) -> DemoProcess:
        admin = free_port()
        args = [
            *self._meshctl(), "gateway",
            "--port", str(port),
            "--admin-port", str(admin),
            "--instance", "ingressgateway-0",
            "--trace-sampling", f"{demo.trace_sampling:g}",
            "--dataplane", demo.dataplane,
        ]  # fmt: skip
        proc = ManagedProcess(
            "ingressgateway", args, self.state_dir / "logs" / "ingressgateway.log"
        )
        record = {
            "dataplane": demo.dataplane,
            "admin": f"http://127.0.0.1:{admin}",
            "http": f"http://127.0.0.1:{port}",
            "log": str(proc.log_path),
        }
        return DemoProcess("ingressgateway", "gateway", proc, record)

    def _wait_demo_ready(self) -> None:
        deadline = time.monotonic() + DEMO_READY_TIMEOUT
        waiting = list(self.demo_processes)
        while waiting:
            for d in list(waiting):
                if not d.proc.alive():
                    raise ServerError(f"{d.name} exited during start-up:\n{d.proc.log_tail()}")
                if http_ok(d.record["admin"] + "/ready") and _app_listening(d.record):
                    waiting.remove(d)
                    where = d.record.get("inbound") or d.record.get("http")
                    self.report(f"  {d.name} ready ({where})")
            if time.monotonic() > deadline:
                names = ", ".join(d.name for d in waiting)
                tails = "\n".join(f"--- {d.name} ---\n{d.proc.log_tail(15)}" for d in waiting)
                raise ServerError(f"not ready after {DEMO_READY_TIMEOUT:g}s: {names}\n{tails}")
            time.sleep(0.05)

    def _wait_productpage(self, url: str) -> None:
        """Until a page comes back whole (details and reviews answered) through the
        ingress: the gateway and productpage's sidecar learn their routes on demand."""
        deadline = time.monotonic() + DEMO_READY_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    page = json.loads(r.read())
                if not any("error" in page.get(part, {}) for part in ("details", "reviews")):
                    self.report(f"  ingress serves {url}")
                    return
                last = f"incomplete page: {page}"
            except Exception as e:
                last = str(e)
            time.sleep(0.25)
        raise ServerError(
            f"{url} did not serve the product page in {DEMO_READY_TIMEOUT:g}s: {last}"
        )

    def service_args(self, service: str) -> list[str]:
        args = list(self.extra.get("service_args", {}).get(service, []))
        if service == "ca":
            args += ["--set", f"kek-file={self.ca_kek_file()}"]
        if service == "telemetry" and self.server_nodes > 1:
            # the telemetry stream and its ledgers on every NATS node: losing one loses none
            args += ["--set", f"stream-replicas={self.server_nodes}"]
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
            "sidecars": {d.name: d.record for d in self.demo_processes if d.kind == "sidecar"},
            "supervisor_pid": os.getpid(),
            "kept_resources": self.kept_resources,
        }
        if self.credentials:
            # NATS users by role (mesh.bus_permissions): meshctl uses admin, sidecars sidecar
            doc["credentials"] = self.credentials
        if self.etcd_credentials:
            doc["etcd_credentials"] = self.etcd_credentials
        gateways = {d.name: d.record for d in self.demo_processes if d.kind == "gateway"}
        if gateways:
            doc["gateways"] = gateways
        if self.ingress:
            doc["ingress"] = self.ingress
        load = [d.record for d in self.demo_processes if d.kind == "load"]
        if load:
            doc["processes"] = load
        if "telemetry" in services:
            first = services["telemetry"][0]["http"]
            doc["telemetry"] = {"metrics": f"{first}/metrics", "dashboard": f"{first}/"}
        doc.update(self.extra.get("cluster", {}))
        return doc

    def write_cluster_file(self) -> Path:
        # 0600: it holds the NATS passwords
        return write_private(
            self.state_dir / CLUSTER_FILE, json.dumps(self.cluster_document(), indent=2) + "\n"
        )

    def exited(self) -> list[str]:
        """Names of the processes that have exited since the last call (and forget them)."""
        dead = [p.name for p in self.processes if not p.alive()]
        dead += [d.name for d in self.demo_processes if not d.proc.alive()]
        self.processes = [p for p in self.processes if p.alive()]
        self.demo_processes = [d for d in self.demo_processes if d.proc.alive()]
        return dead

    def stop(self) -> None:
        """Stop everything: the proxies others started against this cluster (`meshctl
        sidecar/gateway`, recorded in the state dir), the demo (all at once: load,
        gateway, sidecars, which stop their apps), then services, servers last."""
        demo_pids = frozenset(d.proc.pid for d in self.demo_processes if d.proc.proc)
        others = stop_recorded_proxies(self.state_dir, self.report, skip_pids=demo_pids)
        if others:
            self.report(f"  stopped {others} proxies started with meshctl sidecar/gateway")
        stop_together([d.proc for d in self.demo_processes], timeout=15)
        # what a killed demo sidecar left behind (its Envoy runs in its own session)
        stop_recorded_proxies(self.state_dir, self.report, timeout=5)
        # as `down` does (`_stages`): services in the reverse of their start order, the
        # replicas of one service together (their drains overlap instead of adding up)
        for service in reversed(self.services):
            replicas = {i.replica for i in self.replica_info if i.service == service}
            stop_together([p for p in self.processes if p.name in replicas], timeout=10)
        for etcd in self.etcd:
            etcd.stop()
        for nats in self.nats:
            nats.stop()


def _app_listening(record: dict[str, Any]) -> bool:
    """The sidecar starts its app once it is ready; the app then takes a moment."""
    if "app" not in record:
        return True
    host, _, port = record["app"].rpartition(":")
    if record.get("intercept") and host == "127.0.0.1":
        # in the app's own namespace, reached at its address there (the sidecar's
        # /config_dump names it); recorded so cluster.json says where the app is
        app_ip = _intercepted_app_ip(record["admin"])
        if not app_ip:
            return False
        record["app"] = f"{app_ip}:{port}"
        host = app_ip
    return wait_tcp(host, int(port), 0.05)


def _intercepted_app_ip(admin: str) -> str:
    try:
        with urllib.request.urlopen(admin + "/config_dump", timeout=2) as r:
            dump = json.loads(r.read())
    except (OSError, ValueError):
        return ""
    # the agent's view (Python data plane), or Envoy's dump with its data plane's
    intercept = dump.get("intercept") or {}
    dataplane = dump.get("dataplane") or {}
    return str(intercept.get("app_ip") or dataplane.get("app_host", ""))


def _load_ports(path: Path, n: int) -> dict[str, list[dict[str, int]]]:
    """The server ports an earlier `up` used (same node count), else new free ones."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        saved = json.loads(path.read_text())
        if len(saved["nats"]) == n and len(saved["etcd"]) == n:
            return {"nats": list(saved["nats"]), "etcd": list(saved["etcd"])}
    return {
        "nats": [
            {"port": free_port(), "monitor_port": free_port(), "cluster_port": free_port()}
            for _ in range(n)
        ],
        "etcd": [{"client_port": free_port(), "peer_port": free_port()} for _ in range(n)],
    }


def _stages(doc: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Every process a cluster.json names, in the order `down` stops them: the demo
    (load, gateways, sidecars) together, then each service, then etcd and nats."""
    demo: list[dict[str, Any]] = []
    for extra in doc.get("processes", []):
        demo.append({**extra, "group": True})
    for name, gw in doc.get("gateways", {}).items():
        if gw.get("pid"):
            demo.append({"name": name, "pid": gw["pid"], "group": True})
    for name, sc in doc.get("sidecars", {}).items():
        if sc.get("pid"):
            demo.append({"name": name, "pid": sc["pid"], "group": True})
    stages = [demo]
    for service in reversed(SERVICE_ORDER):
        stages.append(
            [
                {"name": r.get("replica", service), "pid": r["pid"]}
                for r in doc.get("services", {}).get(service, [])
            ]
        )
    for kind in ("etcd", "nats"):
        stages.append(
            [
                {"name": s["name"], "pid": s["pid"]}
                for s in doc.get("servers", {}).get(kind, [])
                if s.get("pid")
            ]
        )
    return [stage for stage in stages if stage]


def _all_pids(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry for stage in _stages(doc) for entry in stage]


def down(state_dir: Path, report: Callable[[str], None]) -> int:
    """Stop every process recorded in cluster.json; returns how many were still running."""
    path = state_dir / CLUSTER_FILE
    if not path.exists():
        report(f"no cluster recorded in {path}")
        # proxies recorded against it may still run (the cluster itself was killed)
        return stop_recorded_proxies(state_dir, report, timeout=5)
    doc = json.loads(path.read_text())
    # first the proxies started against the cluster (while it runs, so that they
    # deregister); the demo's own are stopped with the rest of the cluster
    demo_pids = frozenset(e["pid"] for e in _all_pids(doc) if e.get("group"))
    proxies = stop_recorded_proxies(state_dir, report, skip_pids=demo_pids)
    if proxies:
        report(f"  stopped {proxies} proxies started with meshctl sidecar/gateway")
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
    for stage in _stages(doc):
        # a stage stops together: SIGTERM to all, wait for all, SIGKILL what is left
        running = [e for e in stage if pid_alive(e["pid"])]
        for entry in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(entry["pid"], signal.SIGTERM)
        deadline = time.monotonic() + 15
        for entry in running:
            pid = entry["pid"]
            stopped += 1
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            ok = stop_pid(pid, timeout=1) if pid_alive(pid) else True
            if entry.get("group"):
                # it led its own process group (a sidecar and its app): clear the group
                kill_group(pid)
            report(
                f"  stopped {entry['name']} (pid {pid})"
                if ok
                else f"  could not stop {entry['name']} (pid {pid})"
            )
    # what a killed demo sidecar left behind (its Envoy runs in its own session)
    stopped += stop_recorded_proxies(state_dir, report, timeout=5)
    path.unlink(missing_ok=True)
    return stopped + proxies


def _is_meshctl(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    # `mesh.cli`: a cluster started before the CLI moved to meshctl/
    return b"meshctl" in cmdline or b"mesh.cli" in cmdline
