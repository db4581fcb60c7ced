"""A grpc.aio server on a Unix socket private to the sidecar (0600, created with no
window before the mode is set, removed on stop): how the sidecar serves its Envoy the
access-log service and the OTLP trace receiver, each on its own socket
(`start_private_server` also starts the xDS server's socket).

Envoy buffers what it sends there (access-log entries up to a second, spans until its
tracer's flush) and drops it when it exits, so a stopping sidecar waits until neither
socket received anything for a while (`wait_quiet`) before it stops Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from mesh.logs import get_logger

log = get_logger("proxy.envoy.private_grpc")


class PrivateSocketError(Exception):
    """The service cannot serve (its socket is taken or cannot be bound)."""


class PrivateGrpcServer:
    """`add_services(server)` registers the service(s); `what` names them in errors
    and logs. Servicers call `touch()` on every message they receive."""

    def __init__(
        self, socket_path: Path | str, what: str, add_services: Callable[[grpc.aio.Server], None]
    ):
        self.socket_path = Path(socket_path)
        self.what = what
        self._add_services = add_services
        self._server: grpc.aio.Server | None = None
        self.last_message_at = 0.0  # time.monotonic() of the last message received

    def touch(self) -> None:
        self.last_message_at = time.monotonic()

    async def start(self) -> None:
        self._server = await start_private_server(self.socket_path, self.what, self._add_services)
        log.info("private_grpc.started", service=self.what, socket=str(self.socket_path))

    async def stop(self, grace: float = 1.0) -> bool:
        """Stop serving; `grace`: how long open streams may finish what Envoy already
        sent. False if it was not serving."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        return server is not None

    async def wait_quiet(self, quiet: float = 1.5, timeout: float = 10.0) -> bool:
        return await wait_quiet(lambda: self.last_message_at, quiet, timeout)


async def start_private_server(
    path: Path, what: str, add_services: Callable[[grpc.aio.Server], None]
) -> grpc.aio.Server:
    """A started grpc.aio server with `add_services` registered, listening on the Unix
    socket `path` (0600, its folder 0700; a socket left by a dead process is replaced).
    PrivateSocketError, naming `what`, if another process serves there or the socket
    cannot be bound."""
    server = _bind_private_socket(path, what, add_services)
    await server.start()
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)
    return server


def _bind_private_socket(
    path: Path, what: str, add_services: Callable[[grpc.aio.Server], None]
) -> grpc.aio.Server:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists() or path.is_socket():
        if _someone_listens(path):
            raise PrivateSocketError(f"another {what} is serving on {path}")
        path.unlink()  # left by a sidecar process that died
    server = grpc.aio.server()
    add_services(server)
    old_umask = os.umask(0o177)  # no window between bind and chmod
    try:
        bound = server.add_insecure_port(f"unix:{path}")
    finally:
        os.umask(old_umask)
    if not bound:
        raise PrivateSocketError(f"{what}: cannot listen on unix socket {path}")
    return server


async def wait_quiet(
    last_message_at: Callable[[], float], quiet: float = 1.5, timeout: float = 10.0
) -> bool:
    """Wait until nothing has arrived for `quiet` seconds since this call and since
    `last_message_at()` (time.monotonic()); False if that did not happen within
    `timeout`. Once Envoy's listeners are drained and no request is in flight, a quiet
    second and a half means Envoy sent everything it buffered (it flushes every
    second), and it can be stopped without losing any."""
    called = time.monotonic()
    deadline = called + timeout
    while True:
        now = time.monotonic()
        left = max(last_message_at(), called) + quiet - now
        if left <= 0:
            return True
        if now + left > deadline:
            return False
        await asyncio.sleep(left)


def _someone_listens(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
