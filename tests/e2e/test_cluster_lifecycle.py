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

from mesh.servers import free_port, pid_alive

MESHCTL = [sys.executable, "-m", "meshctl.main"]

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


# ------------------------------------------------- proxies started against a cluster

APP = (
    "import sys\n"
    "from http.server import BaseHTTPRequestHandler, HTTPServer\n"
    "class H(BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200); self.send_header('content-length', '2')\n"
    "        self.end_headers(); self.wfile.write(b'ok')\n"
    "HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
)


@pytest.fixture
def detached_cluster(tmp_path: Path) -> Any:
    state = tmp_path / "mesh"
    done = subprocess.run(
        [*MESHCTL, "--state-dir", str(state), "up", "--detach"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads((state / "cluster.json").read_text())
    yield state
    subprocess.run([*MESHCTL, "--state-dir", str(state), "down"], capture_output=True, timeout=120)
    kill_leftovers(recorded_pids(doc))


def start_proxy(tmp_path: Path, state: Path, instance: str, *extra: str) -> subprocess.Popen[bytes]:
    """`meshctl sidecar` with an app, as a user starts one next to `meshctl up`."""
    app_port = free_port()
    app = tmp_path / "app.py"
    app.write_text(APP)
    log = open(tmp_path / f"{instance}.log", "wb")
    return subprocess.Popen(
        [*MESHCTL, "sidecar", "--state-dir", str(state), "--service", "web",
         "--instance", instance, "--app-port", str(app_port), *extra,
         "--", sys.executable, str(app), str(app_port)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def wait_record(state: Path, instance: str, roles: set[str], timeout: float = 60.0) -> Any:
    path = state / "proxies" / f"{instance}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record = json.loads(path.read_text())
            if roles <= {p["role"] for p in record["processes"]}:
                return record
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{path} never recorded {roles}")


def down(state: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*MESHCTL, "--state-dir", str(state), "down"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done


def test_down_stops_sidecars_started_against_the_cluster(
    detached_cluster: Path, tmp_path: Path
) -> None:
    state = detached_cluster
    sidecar = start_proxy(tmp_path, state, "web-a")
    try:
        record = wait_record(state, "web-a", {"sidecar", "app"})
        pids = [p["pid"] for p in record["processes"]]
        assert sidecar.pid in pids
        out = down(state)
        assert "stopped 1 proxies started with meshctl sidecar/gateway" in out.stderr
        assert sidecar.wait(30) == 0  # it stopped in order (drained, deregistered)
        assert wait_gone(pids, timeout=10) == []
        assert list((state / "proxies").glob("*.json")) == []
    finally:
        if sidecar.poll() is None:
            sidecar.kill()


def test_a_sidecar_removes_its_record_when_it_exits(detached_cluster: Path, tmp_path: Path) -> None:
    state = detached_cluster
    sidecar = start_proxy(tmp_path, state, "web-b")
    try:
        wait_record(state, "web-b", {"sidecar", "app"})
        sidecar.send_signal(signal.SIGTERM)
        assert sidecar.wait(30) == 0
        assert not (state / "proxies" / "web-b.json").exists()
    finally:
        if sidecar.poll() is None:
            sidecar.kill()


def test_down_stops_the_envoy_a_killed_sidecar_left_behind(
    detached_cluster: Path, tmp_path: Path
) -> None:
    """Envoy runs in its own session and outlives its sidecar by design (a new sidecar
    adopts it); `meshctl down` still stops it, and the orphaned app."""
    state = detached_cluster
    sidecar = start_proxy(tmp_path, state, "web-envoy", "--dataplane", "envoy")
    others: list[int] = []
    try:
        record = wait_record(state, "web-envoy", {"sidecar", "envoy", "app"}, timeout=90)
        others = [p["pid"] for p in record["processes"] if p["role"] != "sidecar"]
        sidecar.kill()
        sidecar.wait(10)
        time.sleep(0.5)
        assert all(pid_alive(p) for p in others)  # left running by the killed sidecar
        out = down(state)
        assert "sidecar web-envoy" in out.stderr
        assert wait_gone(others, timeout=10) == []
        assert list((state / "proxies").glob("*.json")) == []
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
        for pid in others:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------ state is visible

ROUTE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
"""


def meshctl(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*MESHCTL, "--state-dir", str(state), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode in (0, 1), done.stderr
    return done


def test_up_says_what_it_resumed_and_fresh_and_purge_start_clean(tmp_path: Path) -> None:
    state = tmp_path / "mesh"
    route = tmp_path / "route.yaml"
    route.write_text(ROUTE)
    try:
        first = meshctl(state, "up", "--detach")
        assert "resource(s) from before" not in first.stderr  # nothing kept on a first start
        assert meshctl(state, "apply", "-f", str(route)).returncode == 0
        meshctl(state, "down")

        again = meshctl(state, "up", "--detach")
        assert "1 resource(s) from before (1 VirtualService)" in again.stderr, again.stderr
        assert "meshctl up --fresh" in again.stderr and "meshctl down --purge" in again.stderr
        doc = json.loads((state / "cluster.json").read_text())
        assert doc["kept_resources"] == {"VirtualService": 1}
        meshctl(state, "down")

        fresh = meshctl(state, "up", "--fresh", "--detach")
        assert "resource(s) from before" not in fresh.stderr
        assert meshctl(state, "get", "vs", "reviews").returncode == 1  # gone
        assert meshctl(state, "apply", "-f", str(route)).returncode == 0
        purged = meshctl(state, "down", "--purge")
        assert "purged" in purged.stderr
        assert not (state / "data").exists()

        clean = meshctl(state, "up", "--detach")
        assert "resource(s) from before" not in clean.stderr
        assert meshctl(state, "get", "vs", "reviews").returncode == 1
    finally:
        meshctl(state, "down")
