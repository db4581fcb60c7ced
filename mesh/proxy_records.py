"""Proxies running against a local cluster, recorded in its state dir so that
`meshctl down` (and a foreground `meshctl up` stopping) stops them too
(docs/architecture.md §2).

A sidecar or gateway started with `meshctl sidecar`/`meshctl gateway` next to a cluster
started by `meshctl up` writes `<state-dir>/proxies/<instance>.json` itself as it
starts, adds the processes it then starts (its app; its Envoy, which runs in its own
session and outlives a sidecar that is killed), and removes the file when it exits.
Each process is recorded with its start time (clock ticks since boot, from
/proc/<pid>/stat), so a pid reused by an unrelated process is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.servers import pid_alive, write_private

PROXIES_DIR = "proxies"
# an Envoy data plane's state file in its private directory (proxy.envoy.process)
ENVOY_STATE_FILE = "envoy.json"


def start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), or None if it does not run."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # field 22 of stat; fields[0] here is field 3 (the state)
    return int(fields[19])


@dataclass(frozen=True)
class RecordedProcess:
    role: str  # "sidecar" | "gateway" | "app" | "envoy"
    pid: int
    started: int

    def running(self) -> bool:
        """Still that process (not a reused pid) and not a zombie."""
        return start_ticks(self.pid) == self.started and pid_alive(self.pid)

    @staticmethod
    def of(role: str, pid: int) -> RecordedProcess | None:
        started = start_ticks(pid)
        return None if started is None else RecordedProcess(role, pid, started)


def _file_name(instance: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", instance) + ".json"


class ProxyRecord:
    """The record a running proxy keeps of itself in the cluster's state dir."""

    def __init__(self, state_dir: Path, instance: str, kind: str, service: str, dataplane: str):
        self.path = state_dir / PROXIES_DIR / _file_name(instance)
        self.doc: dict[str, Any] = {
            "instance": instance,
            "kind": kind,
            "service": service,
            "dataplane": dataplane,
            "processes": [],
        }

    def add(self, role: str, pid: int | None) -> None:
        process = RecordedProcess.of(role, pid) if pid else None
        if process is not None:
            self.doc["processes"].append(process.__dict__)
            self.write()

    def set(self, **fields: Any) -> None:
        self.doc.update(fields)
        self.write()

    def write(self) -> None:
        write_private(self.path, json.dumps(self.doc, indent=2) + "\n")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class RecordedProxy:
    path: Path
    instance: str
    kind: str
    processes: tuple[RecordedProcess, ...]
    envoy_dir: str

    def running(self) -> list[RecordedProcess]:
        """Its processes still running, the current Envoy included (it may have been
        restarted under a new pid since the record was written)."""
        found = [p for p in self.processes if p.running()]
        current = _current_envoy(self.envoy_dir)
        if current is not None and all(p.pid != current.pid for p in found):
            found.append(current)
        return found

    @property
    def leaders(self) -> list[RecordedProcess]:
        """The proxy processes themselves: told to stop, they stop the rest in order."""
        return [p for p in self.processes if p.role in ("sidecar", "gateway")]


def _current_envoy(envoy_dir: str) -> RecordedProcess | None:
    if not envoy_dir:
        return None
    try:
        state = json.loads((Path(envoy_dir) / ENVOY_STATE_FILE).read_text())
        pid = int(state["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (cmdline and cmdline[0].endswith(b"envoy")):
        return None  # a reused pid
    return RecordedProcess.of("envoy", pid)


def recorded_proxies(state_dir: Path) -> list[RecordedProxy]:
    found = []
    for path in sorted((state_dir / PROXIES_DIR).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            processes = tuple(
                RecordedProcess(str(p["role"]), int(p["pid"]), int(p["started"]))
                for p in doc.get("processes", [])
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append(
            RecordedProxy(
                path,
                str(doc.get("instance", path.stem)),
                str(doc.get("kind", "sidecar")),
                processes,
                str(doc.get("envoy_dir", "")),
            )
        )
    return found


def stop_recorded_proxies(
    state_dir: Path,
    report: Callable[[str], None],
    *,
    timeout: float = 20.0,
    skip_pids: frozenset[int] = frozenset(),
) -> int:
    """Stop every recorded proxy: SIGTERM to each at once (each drains, stops its app
    and its Envoy), then SIGKILL to what is left of any of their processes after
    `timeout`. Proxies whose own pid is in `skip_pids` (the demo's, which `meshctl up`
    stops itself) are left alone. Returns how many proxies were running."""
    proxies = [
        p
        for p in recorded_proxies(state_dir)
        if not any(leader.pid in skip_pids for leader in p.leaders)
    ]
    running = [(p, p.running()) for p in proxies]
    running = [(p, procs) for p, procs in running if procs]
    for _proxy, procs in running:
        for process in procs:
            if process.role in ("sidecar", "gateway"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proxy, _procs in running:
        while any(p.running() for p in proxy.leaders) and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = [p for p in proxy.running() if _kill(p)]
        how = f", killed {', '.join(p.role for p in killed)}" if killed else ""
        report(f"  stopped {proxy.kind} {proxy.instance}{how}")
    for proxy in proxies:
        if not proxy.running():
            proxy.path.unlink(missing_ok=True)
    return len(running)


def _kill(process: RecordedProcess) -> bool:
    if not process.running():
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGKILL)
    return True
