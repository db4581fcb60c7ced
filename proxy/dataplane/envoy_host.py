"""Where the Envoy data plane lives on this host: its private state directory and the
ports its listeners get."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from mesh import errors
from mesh.servers import free_port
from proxy.dataplane import DataPlaneContext
from proxy.dataplane.envoy_view import EnvoyPorts
from proxy.settings import SidecarSettings


def instance_state_dir(settings: SidecarSettings) -> Path:
    """`private_state_dir` of this sidecar: its instance in its mesh."""
    return private_state_dir(
        settings.instance, cluster=f"{settings.prefix}|{','.join(sorted(settings.nats))}"
    )


def private_state_dir(instance: str, cluster: str) -> Path:
    """The instance's directory for Envoy's bootstrap, log, state file and the ADS and
    access-log sockets: the same for a sidecar restarted under the same `--instance`
    against the same mesh (`cluster`: its NATS URLs and subject prefix), so it finds the
    Envoy its predecessor left; never shared by two meshes on one host whose instances
    happen to have the same names (two demos, parallel tests). Private to this user."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    mesh_id = hashlib.sha256(cluster.encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", instance)
    if len(name) > 40:  # unix socket paths are short (108 bytes)
        name = name[:24] + "-" + hashlib.sha256(instance.encode()).hexdigest()[:15]
    path = base / f"meshwork-envoy-{mesh_id}-{name}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise errors.Unavailable(
                f"{path} exists and is not a directory private to this user: "
                "remove it or run under another --instance"
            ) from None
    return path


def choose_ports(ctx: DataPlaneContext, admin_port: int = 0) -> EnvoyPorts:
    """The settings' ports, or free ones: Envoy binds them when its listeners arrive."""
    s = ctx.settings
    host = s.bind_host

    def port(wanted: int, bind: str = host) -> int:
        return wanted or free_port(bind)

    tcp: Mapping[int, int] = {app_port: free_port(host) for app_port in s.tcp_ports}
    if s.gateway:
        return EnvoyPorts(
            admin=admin_port or free_port(), gateway=port(s.gateway_port), tcp_inbound=tcp
        )
    capture = ctx.capture
    return EnvoyPorts(
        admin=admin_port or free_port(),
        inbound=port(s.inbound_port),
        outbound=port(s.outbound_port, "127.0.0.1"),
        tcp_inbound=tcp,
        capture_host=capture.host if capture else "",
        capture=port(capture.port, capture.host) if capture else 0,
    )


async def accepts(host: str, port: int) -> bool:
    try:
        _reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
