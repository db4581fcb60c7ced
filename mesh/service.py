"""The lifecycle every control-plane service shares.

`run()` is one TaskGroup: bus and store connections, the HTTP endpoints (`/healthz`,
`/readyz`, `/metrics`), the service's request handlers, its background tasks and,
for singleton work, a leader-election loop. SIGTERM/SIGINT shut it down in order:
stop taking requests (readyz fails, subscriptions drain so in-flight requests
finish), cancel tasks with a deadline, resign leadership, close connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mesh.bus import Bus
from mesh.election import Election
from mesh.lifecycle import StopSignal
from mesh.logs import get_logger
from mesh.store import Store


@dataclass
class ServiceConfig:
    nats: list[str]
    etcd: list[str]
    prefix: str = "mesh"
    etcd_prefix: str = "/mesh/"
    http_host: str = "127.0.0.1"
    http_port: int = 0
    replica: str = ""
    election_ttl: int = 5
    nats_user: str | None = None
    nats_password: str | None = None
    etcd_user: str | None = None
    etcd_password: str | None = None
    shutdown_grace: float = 10.0
    # service-specific settings (e.g. lease TTLs), from `meshctl serve --set k=v`
    options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.replica:
            self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


class ControlPlaneService:
    """Subclasses set `name`, implement `setup()` (register handlers) and optionally
    `leader_work(token)` (singleton work, runs only in the elected replica) and
    `background()` (tasks every replica runs)."""

    name = "service"
    has_leader_work = False

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.log = get_logger(self.name, replica=config.replica)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mesh_service_requests_total",
            "Bus requests handled, by subject and outcome",
            ["subject", "outcome"],
            registry=self.registry,
        )
        self.leader_gauge = Gauge(
            "mesh_service_leader", "1 while this replica holds the election", registry=self.registry
        )
        self.bus: Bus
        self.store: Store
        self.election: Election | None = None
        self.ready = False
        self.started_at = time.time()
        self._stopping = StopSignal()
        self.http_port = config.http_port

    # ------------------------------------------------------------ hooks

    async def setup(self) -> None:
        """Register request handlers on the bus (called once connected)."""

    async def leader_work(self, token: int) -> None:
        """Singleton work; runs while this replica leads. `token` fences its writes."""
        await asyncio.Event().wait()

    def background(self) -> list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        """(name, coroutine function) pairs every replica runs until shutdown."""
        return []

    def health_details(self) -> dict[str, object]:
        return {}

    # ------------------------------------------------------------ lifecycle

    @property
    def is_leader(self) -> bool:
        return self.election is not None and self.election.is_leader

    def stop(self) -> None:
        self._stopping.request()

    async def run(self) -> None:
        self._stopping.install()
        runner = await self._start_http()
        self.store = Store(
            self.config.etcd,
            prefix=self.config.etcd_prefix,
            user=self.config.etcd_user,
            password=self.config.etcd_password,
        )
        self.bus = await Bus.connect(
            self.config.nats,
            name=f"{self.name}:{self.config.replica}",
            prefix=self.config.prefix,
            user=self.config.nats_user,
            password=self.config.nats_password,
            wait_for_server=True,
        )
        try:
            await self._wait_for_store()
            await self.setup()
            if self.has_leader_work:
                self.election = Election(
                    self.store, self.name, self.config.replica, ttl=self.config.election_ttl
                )
            self.ready = True
            self.log.info("service.ready", http=f"http://{self.config.http_host}:{self.http_port}")
            async with asyncio.TaskGroup() as tg:
                tasks = []
                if self.election is not None:
                    tasks.append(
                        tg.create_task(self.election.lead(self._lead), name=f"{self.name}:lead")
                    )
                for task_name, fn in self.background():
                    tasks.append(tg.create_task(fn(), name=f"{self.name}:{task_name}"))
                await self._stopping.wait()
                self.log.info("service.stopping")
                self.ready = False
                # stop taking requests; those in flight finish
                await self.bus.unsubscribe_all()
                for task in tasks:
                    task.cancel()
        finally:
            self.ready = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bus.close(), self.config.shutdown_grace)
            await self.store.close()
            await runner.cleanup()
            self.log.info("service.stopped")

    async def _lead(self, token: int) -> None:
        self.leader_gauge.set(1)
        try:
            await self.leader_work(token)
        finally:
            self.leader_gauge.set(0)

    async def _wait_for_store(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            try:
                await self.store.revision()
                return
            except Exception as e:
                self.log.warning("service.store_unavailable", error=str(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # ------------------------------------------------------------ HTTP

    async def _start_http(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self.add_routes(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.config.http_host, self.config.http_port)
        await site.start()
        server: Any = site._server
        if server is not None and getattr(server, "sockets", None):
            self.http_port = server.sockets[0].getsockname()[1]
        return runner

    def add_routes(self, app: web.Application) -> None:
        """Subclasses add their own HTTP API routes."""

    async def _healthz(self, _request: web.Request) -> web.Response:
        body = {
            "service": self.name,
            "replica": self.config.replica,
            "pid": os.getpid(),
            "ready": self.ready,
            "leader": self.is_leader if self.has_leader_work else None,
            "nats_connected": getattr(getattr(self, "bus", None), "connected", False),
            "uptime_s": round(time.time() - self.started_at, 3),
            **self.health_details(),
        }
        return web.json_response(body)

    async def _readyz(self, _request: web.Request) -> web.Response:
        if self.ready and self.bus.connected:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False}, status=503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
