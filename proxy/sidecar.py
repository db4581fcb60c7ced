"""The sidecar process: listeners, registration, config following, the app's lifecycle.

Start order (DESIGN §7): admin listener (not ready), bus, data listeners, register,
ready — and only then the app, with HTTP_PROXY pointing at the outbound listener, so
the app never runs before the mesh is ready. SIGTERM: stop the app, mark the
instance draining, finish in-flight requests (bounded), deregister, exit. An app that
exits by itself makes the sidecar exit with the app's exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mesh.bus import Bus
from mesh.logs import get_logger
from mesh.messages import Instance
from proxy.admin import AdminServer
from proxy.destinations import DestinationCache
from proxy.forward import Outcome, PoolSet
from proxy.gateway import GatewayFollower
from proxy.http import Exchange, Limits, Request, serve
from proxy.inbound import InboundHandler
from proxy.outbound import Caller, RouteHandler
from proxy.registration import Registration
from proxy.settings import SidecarSettings
from proxy.stats import ProxyStats
from proxy.status_report import StatusReporter
from proxy.tcp import TcpRelays, parse_tcp_upstream

log = get_logger("proxy.sidecar")

Handler = Callable[[Request, Exchange], Awaitable[None]]


class Sidecar:
    def __init__(
        self,
        settings: SidecarSettings,
        app_command: list[str] | None = None,
        limits: Limits | None = None,
    ):
        self.settings = settings
        self.app_command = app_command or []
        self.limits = limits or Limits()
        self.stats = ProxyStats()
        self.ready = False
        self.draining = False
        self.active = 0
        self.app: asyncio.subprocess.Process | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.ports: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._exit_code = 0
        self.bus: Bus
        self.cache: DestinationCache
        self.reporter: StatusReporter
        self.gateway: GatewayFollower | None = None

    # ------------------------------------------------------------ handlers

    def _counted(
        self, listener: str, handle: Callable[[Request, Exchange], Awaitable[Outcome]]
    ) -> Handler:
        async def handler(req: Request, ex: Exchange) -> None:
            self.active += 1
            outcome: Outcome | None = None
            try:
                if self.draining:
                    # tell keep-alive clients to reconnect (to another instance)
                    ex.close_after = True
                outcome = await handle(req, ex)
            finally:
                self.active -= 1
                if outcome is not None:
                    self.stats.count(listener, outcome.status, outcome.flags)
                else:
                    self.stats.count(listener, 0, "DC")

        return handler

    # ------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stop.set()

    async def _listen(self, name: str, handler: Handler, port: int, host: str) -> int:
        server = await serve(handler, host, port, limits=self.limits)
        self.servers.append(server)
        bound = int(server.sockets[0].getsockname()[1])
        self.ports[name] = bound
        return bound

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "instance": s.instance,
            "service": s.service,
            "namespace": s.namespace,
            "version": s.version,
            "labels": s.labels,
            "identity": s.identity,
            "ready": self.ready,
            "draining": self.draining,
            "listeners": self.ports,
        }

    async def run(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        self.app_pools = PoolSet(self.limits)
        self.pools = PoolSet(self.limits)
        self.bus_ready = asyncio.Event()
        admin = AdminServer(
            ready=lambda: self.ready,
            stats=self.stats,
            cache=lambda: getattr(self, "cache", None),
            info=self.info,
        )
        self.ports["admin"] = await admin.start(s.bind_host, s.admin_port)
        try:
            connect = asyncio.create_task(
                Bus.connect(
                    s.nats,
                    name=f"sidecar:{s.instance}",
                    prefix=s.prefix,
                    user=s.nats_user,
                    password=s.nats_password,
                    wait_for_server=True,
                ),
                name="sidecar:connect",
            )
            stop_wait = asyncio.create_task(self._stop.wait(), name="sidecar:stop-wait")
            await asyncio.wait({connect, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not connect.done():
                connect.cancel()
                return 0
            stop_wait.cancel()
            self.bus = connect.result()
            return await self._run_connected(admin)
        finally:
            await admin.stop()

    async def _run_connected(self, admin: AdminServer) -> int:
        s = self.settings
        self.cache = DestinationCache(self.bus, on_change=lambda: self.reporter.changed())
        statuses = self.cache.subscription_statuses
        if s.gateway:
            self.gateway = GatewayFollower(self.bus, s, on_change=lambda: self.reporter.changed())
            statuses = lambda: [*self.cache.subscription_statuses(), *self.gateway.statuses()]  # type: ignore[union-attr]  # noqa: E731
        self.reporter = StatusReporter(
            self.bus,
            proxy=s.instance,
            namespace=s.namespace,
            service=s.service,
            version=s.version,
            labels=s.labels,
            kind="gateway" if s.gateway else "sidecar",
            statuses=statuses,
        )
        self.bus.on_reconnect(self._resync)
        caller = Caller(namespace=s.namespace, labels=s.labels)
        routes = RouteHandler(caller, self.cache, self.pools)
        self.tcp = TcpRelays(self.cache, self.stats.registry)
        tcp_listeners: dict[str, str] = {}
        if s.tcp_ports:
            tcp_listeners = await self.tcp.start_inbound(s.bind_host, s.tcp_ports)
        if s.tcp_upstreams:
            upstreams = [parse_tcp_upstream(spec, s.namespace) for spec in s.tcp_upstreams]
            await self.tcp.start_outbound(upstreams)
        self.ports.update(self.tcp.ports)
        if s.gateway:
            assert self.gateway is not None
            self.gateway.attach(routes)
            address_port = await self._listen(
                "gateway", self._counted("gateway", routes.handle), s.gateway_port, s.bind_host
            )
        else:
            inbound = InboundHandler(s, self.app_pools)
            address_port = await self._listen(
                "inbound", self._counted("inbound", inbound.handle), s.inbound_port, s.bind_host
            )
            await self._listen(
                "outbound", self._counted("outbound", routes.handle), s.outbound_port, "127.0.0.1"
            )
        instance = Instance(
            namespace=s.namespace,
            service=s.service,
            instance=s.instance,
            address=f"{s.bind_host}:{address_port}",
            version=s.version,
            labels=s.labels,
            service_account=s.service_account,
            identity=s.identity,
            tcp_ports=s.tcp_ports,
            tcp_listeners=tcp_listeners,
            admin=f"http://{s.bind_host}:{self.ports['admin']}",
        )
        registration = Registration(self.bus, instance, ttl=s.register_ttl)
        try:
            async with asyncio.TaskGroup() as tg:
                registering = tg.create_task(
                    self._become_ready(registration), name="sidecar:register"
                )
                stop_wait = tg.create_task(self._stop.wait(), name="sidecar:stop-wait")
                await asyncio.wait({registering, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if self._stop.is_set():
                    registering.cancel()
                    return 0
                tasks = [
                    tg.create_task(registration.heartbeat_forever(), name="sidecar:heartbeat"),
                    tg.create_task(self.reporter.run(), name="sidecar:status"),
                    tg.create_task(self.cache.resync_forever(), name="sidecar:resync"),
                ]
                if self.gateway is not None:
                    await self.gateway.start()
                if self.app_command:
                    self.app = await asyncio.create_subprocess_exec(
                        *self.app_command, env=self._app_env()
                    )
                    tasks.append(tg.create_task(self._watch_app(self.app), name="sidecar:app"))
                log.info("sidecar.ready", instance=s.instance, listeners=self.ports)
                await self._stop.wait()
                await self._shutdown(registration)
                for task in tasks:
                    task.cancel()
        finally:
            for server in self.servers:
                server.close()
            self.tcp.close()
            self.pools.close()
            self.app_pools.close()
            await self.bus.close()
        return self._exit_code

    async def _become_ready(self, registration: Registration) -> None:
        await registration.register_until_done()
        self.ready = True

    async def _resync(self) -> None:
        await self.cache.resync()
        if self.gateway is not None:
            await self.gateway.refresh()
        self.reporter.changed()

    def _app_env(self) -> dict[str, str]:
        proxy = f"http://127.0.0.1:{self.ports['outbound']}"
        env = dict(os.environ)
        env.update(
            HTTP_PROXY=proxy,
            http_proxy=proxy,
            NO_PROXY="localhost,127.0.0.1",
            no_proxy="localhost,127.0.0.1",
            MESH_SERVICE=self.settings.service,
            MESH_NAMESPACE=self.settings.namespace,
            MESH_VERSION=self.settings.version,
            MESH_INSTANCE=self.settings.instance,
            PORT=str(self.settings.app_port),
            MESH_ADMIN=f"http://{self.settings.bind_host}:{self.ports['admin']}",
        )
        return env

    async def _watch_app(self, app: asyncio.subprocess.Process) -> None:
        code = await app.wait()
        if not self._stop.is_set():
            log.info("sidecar.app_exited", code=code)
            self._exit_code = code if code >= 0 else 128 - code
            self.stop()

    async def _shutdown(self, registration: Registration) -> None:
        s = self.settings
        log.info("sidecar.stopping", instance=s.instance)
        if self.app is not None and self.app.returncode is None:
            self.app.terminate()
            try:
                await asyncio.wait_for(self.app.wait(), s.drain_timeout)
            except TimeoutError:
                self.app.kill()
        self.draining = True
        self.ready = False
        with contextlib.suppress(Exception):
            await registration.register(status="draining")
        deadline = time.monotonic() + s.drain_timeout
        # give clients a moment to see the draining status, then wait for in-flight requests
        await asyncio.sleep(min(0.5, s.drain_timeout))
        while (
            self.active > 0 or self.tcp.active_connections() > 0
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await registration.deregister()
        await self.reporter.goodbye()
        log.info("sidecar.stopped", instance=s.instance, unfinished=self.active)
