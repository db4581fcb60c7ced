"""A port already in use is said in one line naming the flag, the port and who holds
it, with exit code 1 and no traceback; an app port held by another process stops the
sidecar before it registers anything (else that process would be registered, and
marked healthy, as the app)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from mesh.port_owner import holders_from_proc, port_in_use
from mesh.servers import free_port
from proxy.settings import SidecarSettings
from proxy.sidecar import Sidecar

MESHCTL = [sys.executable, "-m", "meshctl.main"]
NO_NATS = "nats://127.0.0.1:1"  # never reached: the ports are checked first


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_the_holder_of_a_port_is_found(held_port: int) -> None:
    assert [pid for pid, _cmd in holders_from_proc(held_port)] == [os.getpid()]
    message = port_in_use("--admin-port", held_port)
    assert message is not None
    assert message.startswith(f"--admin-port {held_port} is in use by pid {os.getpid()} (")
    assert port_in_use("--admin-port", free_port()) is None
    assert port_in_use("--admin-port", 0) is None  # any port


def _meshctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHCTL, *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    "flag, command",
    [
        ("--admin-port", ["sidecar", "--service", "web", "--app-port", "9"]),
        ("--inbound-port", ["sidecar", "--service", "web", "--app-port", "9"]),
        ("--outbound-port", ["sidecar", "--service", "web", "--app-port", "9"]),
        ("--port", ["gateway"]),
        ("--http-port", ["serve", "registry", "--etcd", "http://127.0.0.1:1"]),
    ],
)
def test_a_port_in_use_names_the_flag_and_the_port(
    held_port: int, flag: str, command: list[str]
) -> None:
    proxy_only = [] if command[0] == "serve" else ["--no-mtls"]
    done = _meshctl(*command, "--nats", NO_NATS, *proxy_only, flag, str(held_port))
    assert done.returncode == 1, done.stderr
    assert f"{flag} {held_port} is in use by pid {os.getpid()}" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_app_port_held_by_another_process_refuses_to_start(held_port: int) -> None:
    done = _meshctl(
        "sidecar", "--service", "web", "--nats", NO_NATS, "--no-mtls",
        "--app-port", str(held_port), "--", sys.executable, "-c", "pass",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"--app-port {held_port} is in use by pid {os.getpid()}" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_sidecar_whose_app_port_is_taken_does_not_start(held_port: int) -> None:
    """The same check inside the sidecar (a port taken after meshctl looked, or a
    Sidecar run as a library): it stops before connecting or registering."""
    settings = SidecarSettings(
        service="web", app_port=held_port, nats=[NO_NATS], mtls=False, config_signatures=False
    )
    sidecar = Sidecar(settings, [sys.executable, "-c", "pass"])
    assert asyncio.run(asyncio.wait_for(sidecar.run(), 20)) == 1
    assert not sidecar.ready
