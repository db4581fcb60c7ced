"""Helpers for the interception tests (tests/integration/test_intercept_*.py): a skip
with the reason where namespaces or nftables are not available, commands run inside
an intercepted app's namespace, and the host's state the sidecar must leave clean."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mesh.servers import free_port


def skip_without_interception() -> None:
    """pytest.skip, with the reason, unless this process can create namespaces and
    load nftables rules."""
    missing = [tool for tool in ("ip", "nft", "curl") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"interception tests need {', '.join(missing)} on PATH")
    if os.geteuid() != 0:
        pytest.skip("interception tests need root (network namespaces, nftables)")
    probe = f"mwi-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def intercept_state_dir(tmp_path: Path) -> Path:
    """A private record directory, so these tests never clean another run's namespaces."""
    path = tmp_path / "intercept-state"
    os.environ["MESH_INTERCEPT_STATE_DIR"] = str(path)
    return path


async def in_namespace(namespace: str, *command: str, timeout: float = 20) -> tuple[int, str]:
    """Run `command` in `namespace` (as `ip netns exec` does: its resolv.conf too)."""
    proc = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        namespace,
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return int(proc.returncode or 0), out.decode(errors="replace")


async def python_in(namespace: str, code: str, timeout: float = 20) -> tuple[int, str]:
    return await in_namespace(namespace, sys.executable, "-c", code, timeout=timeout)


def app_server_command(port: int) -> list[str]:
    """An app listening on 127.0.0.1 only (as the bookinfo apps do), in its namespace."""
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


async def intercepted_client(
    mesh: Any, service: str = "productpage", dataplane: str = "python", **capture: Any
) -> Any:
    """An intercepted sidecar (in this event loop) whose app, an HTTP server on
    127.0.0.1, runs in its own namespace; tests run their clients in that namespace
    too. `capture`: InterceptSettings fields (e.g. opaque_ports)."""
    from proxy.intercept.rules import InterceptSettings
    from proxy.settings import SidecarSettings
    from proxy.sidecar import Sidecar
    from tests.support import eventually

    port = free_port()
    settings = SidecarSettings(
        service=service,
        version="v1",
        app_port=port,
        nats=[mesh.nats_url],
        prefix=mesh.prefix,
        drain_timeout=1.0,
        token=await mesh.token(service),
        intercept=True,
        capture=InterceptSettings(**capture),
        dataplane=dataplane,
    )
    sc = Sidecar(settings, app_server_command(port))
    mesh.sidecars.append(sc)
    mesh.tasks.append(asyncio.create_task(sc.run(), name=f"sidecar:{service}"))
    await eventually(lambda: sc.ready, timeout=20)
    return sc


def host_address() -> str:
    """The host's own address on its default route (skips without one): a mesh
    instance's raw IP, or a destination outside the mesh, reached from a namespace."""
    out = subprocess.run(
        ["ip", "-4", "route", "get", "1.1.1.1"], capture_output=True, text=True
    ).stdout.split()
    if "src" not in out:
        pytest.skip("no IPv4 default route on this host (its address is the test's target)")
    return out[out.index("src") + 1]


def namespace_of(sidecar: Any) -> str:
    return str(sidecar.interception.addresses.namespace)


def host_state(namespace: str) -> dict[str, bool]:
    """What of an intercepted app's namespace still exists on the host."""
    ident = namespace.removeprefix("mwi-")
    table = subprocess.run(["nft", "list", "table", "ip", f"mwi_{ident}"], capture_output=True)
    return {
        "namespace": Path(f"/run/netns/{namespace}").exists(),
        "veth": Path(f"/sys/class/net/mwi{ident}h").exists(),
        "table": table.returncode == 0,
        "resolv.conf": Path(f"/etc/netns/{namespace}").exists(),
    }


def gone(namespace: str) -> bool:
    return not any(host_state(namespace).values())


__all__ = [
    "app_server_command",
    "free_port",
    "gone",
    "host_address",
    "host_state",
    "in_namespace",
    "intercept_state_dir",
    "intercepted_client",
    "namespace_of",
    "python_in",
    "skip_without_interception",
]
