"""An intercepted sidecar run by `meshctl sidecar --intercept` (a real process, real
namespace and nftables): killed with SIGKILL it cannot clean up, so the next
intercepted sidecar to start removes its namespace, veth, rules, resolv.conf and the
app it left running; a clean stop removes them itself (test_intercept_http.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.proxy_records import start_ticks
from tests.intercept_support import (
    app_server_command,
    gone,
    host_state,
    intercept_state_dir,
    intercepted_client,
    skip_without_interception,
)
from tests.support import MeshHarness, eventually, free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    skip_without_interception()
    return intercept_state_dir(tmp_path)


async def killed_sidecar(mesh: MeshHarness, state: Path) -> tuple[str, int]:
    """`meshctl sidecar --intercept` started, then SIGKILLed once its namespace is up:
    (the namespace it left, the pid of the app still running in it)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MESH_INTERCEPT_STATE_DIR": str(state)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshctl.main", "sidecar",
        "--service", "web", "--app-port", str(port),
        "--nats", mesh.nats_url, "--prefix", mesh.prefix,
        "--token", await mesh.token("web"), "--intercept",
        "--", *app_server_command(port),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def recorded() -> str:
            records = list(state.glob("mwi-*.json"))
            if len(records) != 1:
                return ""
            namespace = records[0].stem
            return namespace if all(host_state(namespace).values()) else ""

        namespace = await eventually(recorded, timeout=30)
        record = json.loads((state / f"{namespace}.json").read_text())
        assert record["owner"]["pid"] == proc.pid

        def app_pid() -> int:
            pids = subprocess.run(
                ["ip", "netns", "pids", namespace], capture_output=True, text=True
            ).stdout.split()
            return int(pids[0]) if pids else 0

        app = await eventually(app_pid, timeout=20)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # nothing cleaned up: the namespace, its rules and the app are still there
    assert all(host_state(namespace).values())
    assert start_ticks(app) is not None
    return namespace, app


async def test_namespace_of_a_killed_sidecar_is_removed_by_the_next(
    nats_server, etcd_server, prefix, state: Path
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        namespace, app = await killed_sidecar(mesh, state)
        await intercepted_client(mesh, "next")
        assert gone(namespace)
        assert not (state / f"{namespace}.json").exists()
        await eventually(lambda: start_ticks(app) is None, timeout=10)


async def test_meshctl_down_removes_what_killed_sidecars_left(
    nats_server, etcd_server, prefix, state: Path, tmp_path: Path
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh:
        namespace, app = await killed_sidecar(mesh, state)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MESH_INTERCEPT_STATE_DIR": str(state)}
        down = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshctl.main", "--state-dir", str(tmp_path / "none"), "down",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await down.communicate()
        assert down.returncode == 0, out.decode()
        assert f"removed the namespaces of killed intercepted sidecars: {namespace}" in out.decode()
        assert gone(namespace)
        await eventually(lambda: start_ticks(app) is None, timeout=10)
