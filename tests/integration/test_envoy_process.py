"""The Envoy supervisor with the real Envoy: bootstrap validation, restart after kill -9
with the full snapshot, readiness errors, drain and stop, leaving Envoy running for a
later sidecar to adopt."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mesh.servers import free_port, pid_alive
from proxy.envoy.ads_protocol import ApplyState
from proxy.envoy.bootstrap import BootstrapOptions, bootstrap_json, build_bootstrap
from proxy.envoy.process import (
    STATE_FILE,
    EnvoyError,
    EnvoyExit,
    EnvoyOptions,
    EnvoyProcess,
    find_running_envoy,
)
from proxy.envoy.resources import LISTENER
from tests.integration.test_envoy_xds import ENVOY, SKIP_REASON, EnvoyRig
from tests.integration.test_envoy_xds import rig as rig  # the fixture
from tests.support import eventually

pytestmark = pytest.mark.skipif(ENVOY is None, reason=SKIP_REASON or "envoy present")


def test_bootstrap_passes_envoys_own_validation(tmp_path: Path):
    bootstrap = build_bootstrap(
        BootstrapOptions(
            node_id="sidecar~reviews-v1-abc",
            cluster="reviews",
            xds_socket=tmp_path / "xds.sock",
            admin_port=15000,
            access_log_cluster="meshwork-access-log",
            access_log_socket=tmp_path / "als.sock",
        )
    )
    path = tmp_path / "bootstrap.json"
    path.write_text(bootstrap_json(bootstrap))
    result = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


async def test_killed_envoy_is_restarted_reported_and_gets_the_full_snapshot(rig: EnvoyRig):
    exits: list[EnvoyExit] = []
    rig.envoy.on_exit = exits.append
    await rig.envoy.start()
    await rig.applied()
    first_pid = rig.envoy.pid
    assert first_pid is not None
    state = json.loads((rig.options.state_dir / STATE_FILE).read_text())
    assert state["pid"] == first_pid and state["admin_port"] == rig.admin_port

    os.kill(first_pid, signal.SIGKILL)
    await eventually(lambda: rig.envoy.restarts == 1 and rig.envoy.ready, timeout=30)
    [report] = exits
    assert report.pid == first_pid and report.returncode == -signal.SIGKILL
    assert report.restarts == 1
    assert rig.envoy.pid != first_pid
    # the new Envoy opened a new stream and was given every resource again
    await eventually(lambda: rig.xds.connected == 1, timeout=10)
    await rig.applied()
    assert await rig.body("/") == "hello v1"
    state = json.loads((rig.options.state_dir / STATE_FILE).read_text())
    assert state["pid"] == rig.envoy.pid


async def test_envoy_that_never_gets_configuration_fails_with_its_log_tail(tmp_path: Path):
    admin_port = free_port()
    socket = Path("/tmp") / f"no-xds-{os.getpid()}-{admin_port}.sock"  # nobody serves it
    options = EnvoyOptions(
        bootstrap=build_bootstrap(
            BootstrapOptions(node_id="n", cluster="c", xds_socket=socket, admin_port=admin_port)
        ),
        admin_port=admin_port,
        state_dir=tmp_path / "envoy",
        concurrency=1,
        log_level="info",
        ready_timeout_s=3,
    )
    envoy = EnvoyProcess(options)
    with pytest.raises(EnvoyError, match=r"not ready \(admin /ready LIVE\) within 3") as raised:
        await envoy.start()
    assert "log tail:" in str(raised.value)
    assert "xds-grpc" in str(raised.value) or "starting main dispatch loop" in str(raised.value)
    # nothing left behind
    await envoy.stop(drain=False)
    assert not (options.state_dir / STATE_FILE).exists()


async def test_a_bad_binary_is_a_clear_error(tmp_path: Path):
    options = EnvoyOptions(
        bootstrap={"node": {"id": "n", "cluster": "c"}},
        admin_port=free_port(),
        state_dir=tmp_path / "envoy",
        binary=tmp_path / "no-such-envoy",
    )
    with pytest.raises(EnvoyError, match=r"cannot start .*no-such-envoy"):
        await EnvoyProcess(options).start()


async def test_drain_tells_clients_to_close_then_stop_ends_envoy(rig: EnvoyRig):
    rig.envoy = EnvoyProcess(replace(rig.options, drain_time_s=3.5, parent_shutdown_time_s=6))
    await rig.envoy.start()
    await rig.applied()
    pid = rig.envoy.pid
    assert pid is not None

    async def connection_header() -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{rig.port}/") as response,
        ):
            await response.read()
            return response.headers.get("connection", "")

    assert await connection_header() != "close"
    draining = asyncio.create_task(rig.envoy.drain(), name="test-drain")
    try:
        # while draining, Envoy still answers and tells every client to close
        assert await eventually(lambda: _equals(connection_header(), "close"), timeout=3)
    finally:
        await draining
    await rig.envoy.stop()  # already drained: SIGTERM right away
    assert not pid_alive(pid)
    assert not (rig.options.state_dir / STATE_FILE).exists()
    assert rig.envoy.pid is None


async def _equals(value: Any, expected: str) -> bool:
    return bool(await value == expected)


async def test_left_running_envoy_serves_alone_and_is_adopted_by_the_next_sidecar(
    rig: EnvoyRig,
):
    await rig.envoy.start()
    await rig.applied()
    pid = rig.envoy.pid
    # the sidecar stops supervising and its xDS server goes: Envoy serves on
    await rig.envoy.stop(leave_running=True)
    await rig.xds.stop()
    assert pid is not None and pid_alive(pid)
    recorded = find_running_envoy(rig.options.state_dir)
    assert recorded is not None and recorded.pid == pid
    assert await rig.body("/") == "hello v1"

    # the next sidecar: a new xDS server on the same socket, the same bootstrap
    from proxy.envoy.xds_server import XdsServer
    from tests.integration.test_envoy_xds import first_snapshot

    rig.xds = XdsServer(rig.socket)
    await rig.xds.start()
    rig.xds.set_resources(first_snapshot(rig, "hello from the new sidecar"))
    rig.envoy = EnvoyProcess(rig.options)
    await rig.envoy.start()
    assert rig.envoy.adopted and rig.envoy.pid == pid
    await rig.applied()
    assert rig.xds.status()[LISTENER].state is ApplyState.APPLIED
    assert await rig.body("/") == "hello from the new sidecar"

    # an adopted Envoy is supervised too: killed, it is restarted (no exit code: not
    # our child)
    exits: list[EnvoyExit] = []
    rig.envoy.on_exit = exits.append
    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: rig.envoy.restarts == 1 and rig.envoy.ready, timeout=30)
    assert exits[0].pid == pid and exits[0].returncode is None
    await rig.applied()
    assert await rig.body("/") == "hello from the new sidecar"


async def test_envoy_with_another_bootstrap_is_replaced_not_adopted(rig: EnvoyRig):
    await rig.envoy.start()
    await rig.applied()
    old_pid = rig.envoy.pid
    await rig.envoy.stop(leave_running=True)
    assert old_pid is not None and pid_alive(old_pid)

    changed = dict(rig.options.bootstrap)
    changed["node"] = {**changed["node"], "id": "sidecar~other"}
    rig.envoy = EnvoyProcess(replace(rig.options, bootstrap=changed))
    await rig.envoy.start()
    assert not rig.envoy.adopted and rig.envoy.pid != old_pid
    await eventually(lambda: not pid_alive(old_pid), timeout=15)
    await rig.applied()
    assert await rig.body("/") == "hello v1"


async def test_restart_backoff_waits_between_failed_starts(rig: EnvoyRig):
    """An Envoy that keeps dying is restarted each time and each exit is counted."""
    await rig.envoy.start()
    await rig.applied()
    for n in (1, 2):
        pid = rig.envoy.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda n=n: rig.envoy.restarts == n and rig.envoy.ready, timeout=30)
    assert [e.restarts for e in rig.envoy.exits] == [1, 2]
    assert all(e.restart_in_s > 0 for e in rig.envoy.exits)
    await asyncio.sleep(0)
