"""The app a sidecar starts (`meshctl sidecar ... -- COMMAND`): its environment, the
moment it listens, its exit and its stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable

import mesh
from mesh.logs import get_logger
from proxy.settings import SidecarSettings

log = get_logger("proxy.app")

# how often a sidecar checks whether the app it started listens yet
APP_POLL_S = 0.05


def app_env(settings: SidecarSettings, *, outbound: str, admin: str) -> dict[str, str]:
    """The app's environment: HTTP_PROXY at the sidecar's outbound listener (none
    when `outbound` is "": an intercepted app, whose traffic is captured) and the
    MESH_* facts about its instance."""
    env = dict(os.environ)
    if mesh.FORK_SUPPORT_SET_BY_US:
        env.pop("GRPC_ENABLE_FORK_SUPPORT", None)  # ours, not the app's
    if outbound:
        env.update(
            HTTP_PROXY=outbound,
            http_proxy=outbound,
            NO_PROXY="localhost,127.0.0.1",
            no_proxy="localhost,127.0.0.1",
        )
    else:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
            env.pop(name, None)
    env.update(
        MESH_SERVICE=settings.service,
        MESH_NAMESPACE=settings.namespace,
        MESH_VERSION=settings.version,
        MESH_INSTANCE=settings.instance,
        PORT=str(settings.app_port),
        MESH_ADMIN=admin,
    )
    return env


def exit_code_of(returncode: int) -> int:
    """A process's exit code as a shell reports it (a signal N becomes 128 + N)."""
    return returncode if returncode >= 0 else 128 - returncode


class ManagedApp:
    def __init__(self, command: list[str], port: int, host: str = "127.0.0.1"):
        self.command = command
        self.port = port
        # where the sidecar reaches the app (its namespace's address when intercepted)
        self.host = host
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, env: dict[str, str]) -> None:
        self.process = await asyncio.create_subprocess_exec(*self.command, env=env)

    async def wait_exit(self) -> int:
        """The app's exit code once it exits."""
        assert self.process is not None
        return exit_code_of(await self.process.wait())

    async def wait_listening(self, stopping: Callable[[], bool]) -> bool:
        """True once the app accepts connections on its port; False if `stopping()`
        turns true first. An app that never listens (a job) never returns True."""
        while not stopping():
            try:
                _reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                await asyncio.sleep(APP_POLL_S)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        return False

    async def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        app = self.process
        if app is None or app.returncode is not None:
            return
        app.terminate()
        try:
            await asyncio.wait_for(app.wait(), timeout)
        except TimeoutError:
            app.kill()


async def healthy_when_listening(
    app: ManagedApp, stopping: Callable[[], bool], mark_healthy: Callable[[], Awaitable[None]]
) -> None:
    """Registered as `starting` (clients send it nothing), the instance becomes
    `healthy` once its app accepts connections: a client never meets an app that is
    not listening yet. An app that never listens stays out of load balancing."""
    if await app.wait_listening(stopping) and not stopping():
        log.info("sidecar.app_listening", port=app.port)
        await mark_healthy()
