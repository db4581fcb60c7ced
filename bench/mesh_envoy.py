"""Meshwork on Envoy: a sidecar pair started with `--dataplane envoy` (each agent runs
and configures its own Envoy over xDS), for `bench.vs_envoy`.

The agents (Python) and their Envoys are told apart so that what the agent costs can
be set against what its Envoy does: the Envoy of an agent is its child process
(found in /proc). Every process of the pair is pinned like the other pairs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bench.dataplane import Cluster, routed, wait_until
from bench.procstat import pin
from mesh.servers import free_port, http_ok

# a stopping agent drains its Envoy this long (the default, 10 s, would slow every run)
DRAIN = ["--drain-timeout", "1"]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc/<pid>/stat)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # ppid (field 4)
            found.append(int(entry))
    return sorted(found)


def envoy_of(agent: int) -> int | None:
    """The Envoy the agent `agent` started (its child running the envoy binary)."""
    for pid in children(agent):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip().startswith("envoy"):
                    return pid
        except OSError:
            continue
    return None


@dataclass(frozen=True)
class MeshEnvoyPair:
    """Two agents and their two Envoys; `outbound` is the client side's listener."""

    outbound: int
    host: str
    agent_pids: list[int]
    envoy_pids: list[int]

    @property
    def pids(self) -> list[int]:
        return [*self.agent_pids, *self.envoy_pids]

    def pin(self, core: int) -> None:
        for pid in self.pids:
            pin(pid, core)

    def stop_envoys(self) -> None:
        """Envoys left behind by an agent that had to be killed (a stopped agent stops
        its own; one killed leaves it running for its successor to adopt)."""
        for pid in self.envoy_pids:
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass


def start_sidecar(cluster: Cluster, service: str, args: list[str]) -> tuple[int, int]:
    """One `--dataplane envoy` sidecar for `service`, ready: (agent pid, Envoy pid)."""
    admin, proc = cluster.sidecar(f"{service}-sidecar", [
        "--service", service, *args, "--dataplane", "envoy", *DRAIN], True)  # fmt: skip
    wait_until(lambda: http_ok(f"{admin}/ready"), f"the Envoy sidecar of {service} ready", 60)
    wait_until(lambda: envoy_of(proc.pid) is not None, f"the Envoy of {service}'s agent")
    return proc.pid, envoy_of(proc.pid)  # type: ignore[return-value]


def start_pair(
    cluster: Cluster, app_port: int, *, service: str, client: str, extra: tuple[str, ...] = ()
) -> MeshEnvoyPair:
    """`service`'s sidecar in front of the (HTTP/1.1) app on `app_port`, `client`'s
    with an outbound listener, both `--dataplane envoy` (and `extra` flags); ready and
    routed."""
    outbound = free_port()
    started = [
        start_sidecar(cluster, service, ["--version", "v1", "--app-port", str(app_port), *extra]),
        start_sidecar(
            cluster, client, ["--app-port", "9", "--outbound-port", str(outbound), *extra]
        ),
    ]
    pair = MeshEnvoyPair(outbound, service, [a for a, _ in started], [e for _, e in started])
    wait_until(lambda: routed(outbound, service), "route through the Envoy sidecars", 60)
    return pair
