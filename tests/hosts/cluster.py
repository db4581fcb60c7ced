"""The mesh spread over five hosts, placed as deploy/ documents it:

- cp1, cp2, cp3: a nats-server each (one NATS cluster, routes between the hosts), an
  etcd member each (one etcd cluster), one replica of every control-plane service
  each, started with the environment of deploy/systemd (`MESH_NATS` and `MESH_ETCD`
  naming every server, `MESH_HTTP_HOST=0.0.0.0`, ports 9101-9104, replica id
  `<host>-<service>`);
- app1, app2: sidecars (`meshctl sidecar --bind <host address>`) with their apps.

Servers listen on their host's address with the standard ports (4222/6222/8222,
2379/2380): every host is a network namespace of its own, so nothing collides.
`cluster.json` (what meshctl reads) names those addresses, so `meshctl status` and
`proxy-status` work from any host."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.servers import EtcdServer, ManagedProcess, NatsServer, ServerError, http_ok
from meshctl.devcluster import DevCluster, ReplicaInfo
from tests.chaos.harness import ECHO_APP, MESHCTL, Load, Sidecar
from tests.hosts.network import HostNetwork
from tests.support import wait_for

CONTROL_HOSTS = ("cp1", "cp2", "cp3")
APP_HOSTS = ("app1", "app2")
ALL_HOSTS = CONTROL_HOSTS + APP_HOSTS
# deploy/systemd/{registry,ca,config,telemetry}.env
SERVICE_PORTS = {"registry": 9101, "ca": 9102, "config": 9103, "telemetry": 9104}
NATS_PORT, NATS_CLUSTER_PORT, NATS_MONITOR_PORT = 4222, 6222, 8222
ETCD_CLIENT_PORT, ETCD_PEER_PORT = 2379, 2380
CLONE_NEWNET = 0x40000000


@dataclass
class HostsDevCluster(DevCluster):
    """`DevCluster` (what `meshctl up --replicas 3` runs) with every server and replica
    on its own host instead of one loopback."""

    net: HostNetwork | None = None
    election_ttl: int = 5
    replica_host: dict[str, str] = field(default_factory=dict)

    def _net(self) -> HostNetwork:
        assert self.net is not None
        return self.net

    def _start_server_clusters(self, data: Path, auth: Path) -> None:
        net = self._net()
        hosts = [net.plan.host(h) for h in CONTROL_HOSTS]
        nats_nodes = [
            NatsServer(
                data / f"nats-{i}",
                host=h.address,
                name=f"nats-{i}",
                config_file=auth,
                port=NATS_PORT,
                monitor_port=NATS_MONITOR_PORT,
                cluster_port=NATS_CLUSTER_PORT,
                routes=[f"nats://{o.address}:{NATS_CLUSTER_PORT}" for o in hosts if o != h],
                launcher=net.exec_args(h.name, []),
            )
            for i, h in enumerate(hosts)
        ]
        etcd_nodes = [
            EtcdServer(
                data / "etcd",
                host=h.address,
                name=f"etcd-{i}",
                client_port=ETCD_CLIENT_PORT,
                peer_port=ETCD_PEER_PORT,
                launcher=net.exec_args(h.name, []),
            )
            for i, h in enumerate(hosts)
        ]
        initial = ",".join(f"{e.name}={e.peer_url}" for e in etcd_nodes)
        for e in etcd_nodes:
            e.initial_cluster = initial
        self.nats.extend(nats_nodes)
        self.etcd.extend(etcd_nodes)
        for node in [*nats_nodes, *etcd_nodes]:
            node.start(wait=False)
        for node in [*nats_nodes, *etcd_nodes]:
            node.wait_ready(30.0)
        self.report("3-node NATS cluster and 3-member etcd cluster on cp1-cp3")

    def deploy_env(self, host: str, service: str) -> dict[str, str]:
        """deploy/systemd/meshwork.env + <service>.env + the unit's MESH_REPLICA=%H-%i."""
        env = self.service_env()
        env.update(
            MESH_NATS=",".join(self.nats_urls),
            MESH_ETCD=",".join(self.etcd_urls),
            MESH_HTTP_HOST="0.0.0.0",
            MESH_HTTP_PORT=str(SERVICE_PORTS[service]),
            MESH_REPLICA=f"{host}-{service}",
            MESH_LOG_FORMAT="json",
            PYTHONPATH=os.environ.get("PYTHONPATH", str(Path(__file__).resolve().parents[2])),
        )
        return env

    def _start_services(self) -> None:
        net = self._net()
        pending: list[tuple[ReplicaInfo, ManagedProcess]] = []
        for host in CONTROL_HOSTS:
            for service in self.services:
                replica = f"{host}-{service}"
                args = [
                    sys.executable, "-m", "meshctl.main", "serve", service,
                    "--election-ttl", str(self.election_ttl),
                    *self.service_args(service),
                ]  # fmt: skip
                proc = ManagedProcess(
                    replica,
                    net.exec_args(host, args),
                    self.state_dir / "logs" / f"{replica}.log",
                    env=self.deploy_env(host, service),
                )
                self.processes.append(proc)
                proc.start()
                url = f"http://{net.address(host)}:{SERVICE_PORTS[service]}"
                info = ReplicaInfo(service, replica, proc.pid, url, str(proc.log_path))
                self.replica_info.append(info)
                self.replica_host[replica] = host
                pending.append((info, proc))
        deadline = time.monotonic() + 90
        waiting = list(pending)
        while waiting:
            for info, proc in list(waiting):
                if not proc.alive():
                    raise ServerError(f"{info.replica} exited during start-up:\n{proc.log_tail()}")
                if http_ok(info.http + "/readyz"):
                    waiting.remove((info, proc))
            if time.monotonic() > deadline:
                raise ServerError(f"not ready after 90s: {[i.replica for i, _ in waiting]}")
            time.sleep(0.1)
        self.report(f"{len(pending)} control-plane replicas ready on cp1-cp3")


def enter_netns(netns: str) -> None:
    """Move the calling thread (only it) into `netns`: a thread that sends load from an
    app host reaches that host's 127.0.0.1 (the sidecar's outbound port)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class HostLoad(Load):
    """`Load` sent from inside an app host (every worker thread enters its netns)."""

    netns: str = ""

    def _run(self, worker: int) -> None:
        enter_netns(self.netns)
        super()._run(worker)

    def counts(self) -> tuple[int, int]:
        """(sent, failed) now."""
        with self._lock:
            return self.sent, self.failed

    def last_failure_at(self) -> float | None:
        """Wall-clock time of the latest failed request (None: none failed)."""
        with self._lock:
            return self.failures[-1][0] if self.failures else None


@dataclass
class HostsMesh:
    net: HostNetwork
    dev: HostsDevCluster
    state: Path
    sidecars: dict[str, Sidecar] = field(default_factory=dict)
    sidecar_host: dict[str, str] = field(default_factory=dict)

    @classmethod
    @contextlib.contextmanager
    def running(cls, tmp: Path, election_ttl: int = 5) -> Iterator[HostsMesh]:
        with HostNetwork.built(ALL_HOSTS) as net:
            state = tmp / "mesh"
            dev = HostsDevCluster(
                state, replicas=3, etcd_auth=True, net=net, election_ttl=election_ttl
            )
            mesh = cls(net, dev, state)
            try:
                dev.start()
                yield mesh
            finally:
                # all at once: each drains for up to its --drain-timeout
                with ThreadPoolExecutor(max(1, len(mesh.sidecars))) as pool:
                    for sc in mesh.sidecars.values():
                        pool.submit(sc.proc.stop, 15)
                for proc in dev.processes:
                    if proc.alive():
                        proc.resume()
                dev.stop()

    # ------------------------------------------------------------ placement

    def host_of_replica(self, replica: str) -> str:
        return self.dev.replica_host[replica]

    def sidecar(
        self,
        host: str,
        name: str,
        service: str,
        *,
        version: str = "v1",
        app: bool = True,
        wait: bool = True,
    ) -> Sidecar:
        """`meshctl sidecar --bind <host address>` on `host`; ports per slot on the host.
        With `wait=False` it returns once started (`wait_ready` waits for several)."""
        slot = sum(1 for h in self.sidecar_host.values() if h == host)
        base = 15000 + 10 * slot
        admin, inbound, outbound, app_port = base, base + 1, base + 2, base + 3
        address = self.net.address(host)
        args = [
            *MESHCTL, "--state-dir", str(self.state), "sidecar",
            "--service", service, "--version", version, "--instance", name,
            "--bind", address,
            "--admin-port", str(admin), "--inbound-port", str(inbound),
            "--outbound-port", str(outbound), "--app-port", str(app_port),
            "--drain-timeout", "5",
        ]  # fmt: skip
        if app:
            args += ["--", sys.executable, str(ECHO_APP)]
        proc = ManagedProcess(
            name, self.net.exec_args(host, args), self.state / "logs" / f"sidecar-{name}.log"
        )
        proc.start()
        sc = Sidecar(name, service, proc, f"http://{address}:{admin}", inbound, outbound)
        self.sidecars[name] = sc
        self.sidecar_host[name] = host
        if wait:
            wait_for(sc.ready, timeout=45)
        return sc

    def wait_ready(self, timeout: float = 60) -> None:
        """Until every sidecar is ready (started with `wait=False`, side by side)."""
        wait_for(lambda: all(sc.ready() for sc in self.sidecars.values()), timeout=timeout)

    def load(self, client: str, host_header: str, rate: float = 40.0) -> HostLoad:
        sc = self.sidecars[client]
        netns = self.net.plan.host(self.sidecar_host[client]).netns
        return HostLoad(sc.outbound, host_header, rate=rate, workers=4, netns=netns)

    # ------------------------------------------------------------ meshctl on a host

    def meshctl(self, host: str, *args: str, timeout: float = 60) -> Any:
        env = dict(os.environ)
        for name in ("MESH_NATS", "MESH_NATS_USER", "MESH_NATS_PASSWORD", "MESH_ETCD"):
            env.pop(name, None)
        return self.net.run(
            host, [*MESHCTL, "--state-dir", str(self.state), *args], env=env, timeout=timeout
        )

    def meshctl_json(self, host: str, *args: str) -> Any:
        done = self.meshctl(host, *args, "-o", "json")
        if done.returncode not in (0, 1) or not done.stdout.strip():
            raise AssertionError(f"meshctl {' '.join(args)} on {host}: {done.stderr}")
        return json.loads(done.stdout)

    def apply(self, host: str, text: str, name: str) -> Any:
        path = self.state / name
        path.write_text(text)
        return self.meshctl(host, "apply", "-f", str(path))

    def health(self, replica: str) -> dict[str, Any] | None:
        import urllib.request

        info = next(i for i in self.dev.replica_info if i.replica == replica)
        try:
            with urllib.request.urlopen(info.http + "/healthz", timeout=1) as r:
                return dict(json.loads(r.read()))
        except Exception:
            return None

    def leaders(self, service: str) -> list[str]:
        return [
            i.replica
            for i in self.dev.replica_info
            if i.service == service and (self.health(i.replica) or {}).get("leader")
        ]

    def requests_counted(self, source_app: str = "client", replica: str = "cp3-telemetry") -> int:
        """istio_requests_total the `source_app` proxies reported, read from one
        telemetry replica (any: the counts are shared through JetStream)."""
        import urllib.request

        info = next(i for i in self.dev.replica_info if i.replica == replica)
        with urllib.request.urlopen(info.http + "/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if (
                line.startswith("istio_requests_total{")
                and 'reporter="source"' in line
                and f'source_app="{source_app}"' in line
            ):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)
