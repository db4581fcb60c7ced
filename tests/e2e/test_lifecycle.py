"""A cluster that never leaks: a foreground `meshctl up` whose output goes to a pipe
that is closed (`make demo 2>&1 | tee demo.log`, then Ctrl-C kills tee as well), or
whose terminal goes away (SIGHUP), stops every process it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mesh.servers import pid_alive

MESHCTL = [sys.executable, "-m", "mesh.cli.main"]

pytestmark = pytest.mark.timeout(180)


def recorded_pids(doc: dict[str, Any]) -> list[int]:
    pids = [r["pid"] for rs in doc["services"].values() for r in rs]
    pids += [s["pid"] for kind in ("nats", "etcd") for s in doc["servers"][kind]]
    pids += [s["pid"] for s in doc.get("sidecars", {}).values()]
    pids += [g["pid"] for g in doc.get("gateways", {}).values()]
    return pids


def wait_gone(pids: list[int], timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def up_in_foreground_then_close_its_output(
    state: Path,
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """`meshctl up` with stdout and stderr on one pipe (as `2>&1 | tee`), read until it
    runs in the foreground, then the pipe's reader goes away."""
    up = subprocess.Popen(
        [*MESHCTL, "--state-dir", str(state), "up"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert up.stdout is not None
    seen = b""
    deadline = time.monotonic() + 120
    while b"running in the foreground" not in seen:
        line = up.stdout.readline()
        assert line and time.monotonic() < deadline, f"meshctl up did not come up:\n{seen!r}"
        seen += line
    doc = json.loads((state / "cluster.json").read_text())
    up.stdout.close()  # tee is gone: the next write meshctl makes fails with EPIPE
    return up, doc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM])
def test_foreground_up_stops_everything_when_its_output_is_gone(
    tmp_path: Path, sig: signal.Signals
) -> None:
    state = tmp_path / "mesh"
    up, doc = up_in_foreground_then_close_its_output(state)
    pids = recorded_pids(doc)
    assert len(pids) >= 6  # nats, etcd and the control plane
    try:
        up.send_signal(sig)
        up.wait(60)
        assert wait_gone(pids) == [], f"left running after {sig.name}"
        assert processes_naming(state) == []
        assert not (state / "cluster.json").exists()
    finally:
        if up.poll() is None:
            up.kill()
        kill_leftovers(pids)


def processes_naming(path: Path) -> list[int]:
    """Processes whose command line names `path` (every server and service of a
    cluster is given its state dir or a directory below it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(path).encode() in cmdline and pid_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def test_a_stop_signal_during_start_up_stops_what_had_started(tmp_path: Path) -> None:
    state = tmp_path / "mesh"
    up = subprocess.Popen(
        [*MESHCTL, "--state-dir", str(state), "up"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert up.stdout is not None
    try:
        seen = b""
        while b"control-plane replicas" not in seen:  # servers up, services starting
            line = up.stdout.readline()
            assert line, seen
            seen += line
        assert processes_naming(state)
        up.stdout.close()
        up.send_signal(signal.SIGHUP)
        assert up.wait(60) == 128 + signal.SIGHUP
        assert wait_gone(processes_naming(state)) == []
        assert not (state / "cluster.json").exists()
    finally:
        if up.poll() is None:
            up.kill()
        kill_leftovers(processes_naming(state))
