"""The I/O half of the multi-host harness: builds the namespaces `plan.py` describes,
starts processes on a host, changes a host's firewall, and removes everything,
including what an earlier, killed run left (`clean_stale`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from mesh.servers import ManagedProcess, pid_alive
from tests.hosts.plan import (
    Direction,
    HostFirewall,
    NetworkPlan,
    PlanError,
    delay_commands,
    link_namespace,
    link_rules,
    plan_network,
    run_of,
    stale_namespaces,
    teardown_commands,
    undelay_commands,
)
from tests.hosts.plan import build_commands as _build_commands


class NetworkError(RuntimeError):
    pass


def _run(cmd: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetworkError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def unavailable_reason() -> str | None:
    """Why host networks cannot be built here (None: they can)."""
    if os.geteuid() != 0:
        return "multi-host tests need root (network namespaces, veth, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"multi-host tests need `{tool}` (make nettools installs iproute2/nftables)"
    probe = f"mwh-probe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot create a network namespace: {done.stderr.strip()}"
    try:
        nft = subprocess.run(
            ["ip", "netns", "exec", probe, "nft", "list", "tables"], capture_output=True, text=True
        )
        if nft.returncode != 0:
            return f"nftables does not work in a network namespace: {nft.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()]


def kill_namespace_processes(netns: str) -> None:
    """SIGKILL whatever still runs in `netns` (a killed run's servers and sidecars)."""
    out = _run(["ip", "netns", "pids", netns], check=False)
    for pid in (int(p) for p in out.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def clean_stale() -> list[str]:
    """Remove the namespaces (and their processes) of runs whose process is gone."""
    existing = list_namespaces()
    alive = {r for n in existing if (r := run_of(n)) is not None and pid_alive(int(r))}
    stale = stale_namespaces(existing, alive)
    for netns in stale:
        kill_namespace_processes(netns)
    for run in sorted({run_of(n) for n in stale if run_of(n)}):
        assert run is not None
        for cmd in teardown_commands(run, [n for n in stale if run_of(n) == run]):
            _run(cmd, check=False)
    return stale


class HostNetwork:
    """Hosts as network namespaces on one bridge; see tests/hosts/plan.py for the layout."""

    def __init__(self, host_names: Sequence[str], run: str | None = None):
        self.plan: NetworkPlan = plan_network(run or str(os.getpid()), host_names)
        self.firewalls: dict[str, HostFirewall] = {h.name: HostFirewall() for h in self.plan.hosts}
        self.processes: list[ManagedProcess] = []
        self.delayers: dict[str, ManagedProcess] = {}

    @classmethod
    @contextlib.contextmanager
    def built(cls, host_names: Sequence[str]) -> Iterator[HostNetwork]:
        clean_stale()
        net = cls(host_names)
        try:
            net.build()
            yield net
        finally:
            net.teardown()

    def build(self) -> None:
        self.teardown()  # what this very pid left (a re-run in the same process)
        for cmd in _build_commands(self.plan):
            _run(cmd)
        for h in self.plan.hosts:
            self.apply_firewall(h.name)

    def teardown(self) -> None:
        for p in reversed(self.processes):
            with contextlib.suppress(Exception):
                p.stop(timeout=5)
        self.processes.clear()
        self.delayers.clear()
        present = set(list_namespaces())
        links = [link_namespace(self.plan.run, h.name) for h in self.plan.hosts]
        mine = [n for n in [*links, *self.plan.namespaces()] if n in present]
        for netns in mine:
            kill_namespace_processes(netns)
        for cmd in teardown_commands(self.plan.run, mine):
            _run(cmd, check=False)

    # ------------------------------------------------------------ hosts

    def address(self, host: str) -> str:
        return self.plan.host(host).address

    def exec_args(self, host: str, args: Sequence[str]) -> list[str]:
        """`args` run on `host` (ip netns exec replaces itself with the command, so the
        pid is the command's)."""
        return ["ip", "netns", "exec", self.plan.host(host).netns, *args]

    def spawn(
        self,
        host: str,
        name: str,
        args: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        proc = ManagedProcess(name, self.exec_args(host, args), log, env=env)
        self.processes.append(proc)
        proc.start()
        return proc

    def run(
        self,
        host: str,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.exec_args(host, args), capture_output=True, text=True, env=env, timeout=timeout
        )

    # ------------------------------------------------------------ links

    def _peers(self, host: str, peers: Iterable[str] | None) -> list[str]:
        names = [h.name for h in self.plan.hosts if h.name != host] if peers is None else peers
        out = []
        for p in names:
            if p == host:
                raise PlanError(f"a host has no link to itself ({host})")
            out.append(self.address(p))
        return out

    def cut(
        self, host: str, peers: Iterable[str] | None = None, direction: Direction = "both"
    ) -> None:
        """Drop every packet between `host` and `peers` (default: every other host;
        the operator's address stays reachable, so the test can watch)."""
        rules = link_rules(self._peers(host, peers), direction)
        self.firewalls[host] = self.firewalls[host].with_rules(rules)
        self.apply_firewall(host)

    def lossy(
        self,
        host: str,
        percent: int,
        peers: Iterable[str] | None = None,
        direction: Direction = "both",
    ) -> None:
        rules = link_rules(self._peers(host, peers), direction, percent)
        self.firewalls[host] = self.firewalls[host].with_rules(rules)
        self.apply_firewall(host)

    def heal(
        self, host: str, peers: Iterable[str] | None = None, direction: Direction = "both"
    ) -> None:
        self.firewalls[host] = self.firewalls[host].without(self._peers(host, peers), direction)
        self.apply_firewall(host)

    def heal_all(self) -> None:
        for h in self.plan.hosts:
            self.firewalls[h.name] = HostFirewall()
            self.apply_firewall(h.name)

    def delay(self, host: str, ms: float, direction: Direction = "both") -> None:
        """Delay every frame to and/or from `host` by `ms` (tests/hosts/delayer.py: a
        user-space relay in a link namespace; this kernel has no netem)."""
        if ms < 0 or direction not in ("egress", "ingress", "both"):
            raise PlanError(f"delay needs ms >= 0 and a direction, got {ms}, {direction!r}")
        self.undelay(host)
        for cmd in delay_commands(self.plan, host):
            _run(cmd)
        egress = ms if direction in ("egress", "both") else 0
        ingress = ms if direction in ("ingress", "both") else 0
        link = link_namespace(self.plan.run, host)
        log = Path(f"/tmp/mwh-{self.plan.run}-delayer-{host}.log")
        log.unlink(missing_ok=True)
        proc = ManagedProcess(
            f"delayer-{host}",
            ["ip", "netns", "exec", link, sys.executable, str(Path(__file__).with_name("delayer.py")),
             f"v-{host}", "uplink", "--a-to-b-ms", str(egress), "--b-to-a-ms", str(ingress)],
            log,
        )  # fmt: skip
        proc.start()
        self.delayers[host] = proc
        deadline = time.monotonic() + 10
        while "delayer.ready" not in (log.read_text() if log.exists() else ""):
            if not proc.alive() or time.monotonic() > deadline:
                raise NetworkError(f"the delayer for {host} did not start:\n{proc.log_tail()}")
            time.sleep(0.05)

    def undelay(self, host: str) -> None:
        proc = self.delayers.pop(host, None)
        if proc is None:
            return
        proc.stop(timeout=5)
        for cmd in undelay_commands(self.plan, host):
            _run(cmd)

    def apply_firewall(self, host: str) -> None:
        _run(
            ["ip", "netns", "exec", self.plan.host(host).netns, "nft", "-f", "-"],
            stdin=self.firewalls[host].ruleset(),
        )


def wait_until(check: object, timeout: float, every: float = 0.1) -> float:
    """Seconds until `check()` is true (raises TimeoutError after `timeout`)."""
    assert callable(check)
    t0 = time.monotonic()
    while True:
        if check():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"not true after {timeout:g}s")
        time.sleep(every)
