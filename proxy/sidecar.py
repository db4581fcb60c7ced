"""The sidecar process: listeners, registration, config following, the app's lifecycle.

Start order (DESIGN §7): admin listener (not ready), bus, certificate, data
listeners, register, ready — and only then the app, with HTTP_PROXY pointing at the
outbound listener, so the app never runs before the mesh is ready. An app the sidecar
starts is registered `starting` (no traffic) until it accepts connections, then
`healthy`. SIGTERM: mark the instance draining, keep serving while clients see that
and in-flight requests finish (bounded), stop the app, deregister, exit. An app that
exits by itself makes the sidecar exit with the app's exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mesh.bus import Bus
from mesh.bus_permissions import sidecar_inbox
from mesh.hosts import ServiceRef
from mesh.logs import get_logger
from mesh.messages import Instance, SubscriptionStatus
from mesh.telemetry import new_reporter_id
from proxy.admin import AdminServer
from proxy.destinations import DestinationCache
from proxy.ext_authz import ExtAuthzClient
from proxy.forward import Outcome, PoolSet
from proxy.gateway import GatewayFollower
from proxy.gateway_policy import GatewayAdmission
from proxy.http import Exchange, Limits, Request, serve
from proxy.http.server import HttpServerProtocol
from proxy.identity_client import ConfigTrust, IdentityRefused, WorkloadIdentity
from proxy.inbound import InboundHandler
from proxy.inbound_policy import InboundPolicyFollower
from proxy.listener import MeshListener
from proxy.mtls import MeshTls
from proxy.outbound import Caller, RouteHandler
from proxy.registration import Registration
from proxy.settings import SidecarSettings
from proxy.stats import ProxyStats
from proxy.status_report import StatusReporter
from proxy.tcp import TcpRelays, parse_tcp_upstream
from proxy.telemetry import (
    InboundSeen,
    Sampler,
    SidecarTelemetry,
    TelemetryPublisher,
    TelemetryRecorder,
    own_workload,
)

log = get_logger("proxy.sidecar")

# how long a stopping sidecar keeps serving after announcing `draining`, for the
# registry event to reach every client proxy before its listeners stop mattering
DRAIN_ANNOUNCE_S = 1.0
# how often a sidecar checks whether the app it started listens yet
APP_POLL_S = 0.05

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
        self.identity: WorkloadIdentity | None = None
        self.trust: ConfigTrust | None = None
        self.inbound_policy: InboundPolicyFollower | None = None
        self.servers_extra: list[MeshListener] = []
        self.routes: RouteHandler | None = None

    # ------------------------------------------------------------ handlers

    def _counted(
        self,
        listener: str,
        handle: Callable[[Request, Exchange], Awaitable[Outcome]],
        telemetry: SidecarTelemetry | None = None,
    ) -> Handler:
        if telemetry is not None:
            return self._counted_traced(listener, handle, telemetry)

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

    def _counted_traced(
        self,
        listener: str,
        handle: Callable[[Request, Exchange], Awaitable[Outcome]],
        telemetry: SidecarTelemetry,
    ) -> Handler:
        """`_counted` with the inbound telemetry (`SidecarTelemetry.inbound`) done in
        the same coroutine: one coroutine fewer per request."""

        async def handler(req: Request, ex: Exchange) -> None:
            self.active += 1
            outcome: Outcome | None = None
            seen: InboundSeen | None = None
            try:
                seen = telemetry.inbound_start(req)
                if self.draining:
                    ex.close_after = True
                outcome = await handle(req, ex)
            finally:
                self.active -= 1
                if outcome is not None:
                    self.stats.count(listener, outcome.status, outcome.flags)
                else:
                    self.stats.count(listener, 0, "DC")
                if seen is not None:
                    telemetry.inbound_done(req, ex, outcome, seen)

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
            "identity": s.identity if s.mtls else "",
            "mtls": s.mtls,
            "inbound_policy": self.inbound_policy.dump() if self.inbound_policy else None,
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
            certs=self._certs,
            mirrors=lambda: self.routes.mirrors.snapshot() if self.routes is not None else None,
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
                    inbox_prefix=sidecar_inbox(s.prefix),
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
        if s.gateway:
            self.gateway = GatewayFollower(self.bus, s, on_change=lambda: self.reporter.changed())
        # a gateway too: RequestAuthentication/AuthorizationPolicy selecting it (issue 17)
        self.inbound_policy = InboundPolicyFollower(
            self.bus, s, on_change=lambda: self.reporter.changed()
        )

        def statuses() -> list[SubscriptionStatus]:
            out = self.cache.subscription_statuses()
            for follower in (self.gateway, self.inbound_policy):
                if follower is not None:
                    out.extend(follower.statuses())
            return out

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
        await self.reporter.listen_for_requests()
        self.bus.on_reconnect(self._resync)
        if s.config_signatures:
            # from here on, config must be signed by a key from the trust bundle
            self.trust = ConfigTrust(self.bus, self.stats.registry)
        else:
            log.warning(
                "sidecar.config_signatures_off",
                detail="config and endpoints are applied without verifying the control "
                "plane's signature (--no-config-signatures: a mesh without a CA)",
            )
        if s.mtls:
            if not await self._obtain_identity():
                return self._exit_code
        elif self.trust is not None and not await self._until_stopped(self.trust.obtain()):
            return 0
        caller = Caller(namespace=s.namespace, labels=s.labels)
        telemetry = self._telemetry()
        routes = self.routes = RouteHandler(caller, self.cache, self.pools, telemetry=telemetry)
        if self.inbound_policy is not None:
            # CUSTOM policies reach their authorizer like any mesh call (issue 17)
            self.inbound_policy.ext_authz = ExtAuthzClient(self.cache, self.pools, s.namespace)
            await self.inbound_policy.start()
        identity, policy = self.identity, self.inbound_policy
        self.tcp = TcpRelays(
            self.cache,
            self.stats.registry,
            telemetry=telemetry,
            tls=self.pools.tls if isinstance(self.pools.tls, MeshTls) else None,
            inbound_context=(lambda: identity.inbound_context()) if identity else None,
            inbound_mode=policy.mode if policy is not None else None,
            authorizer=(lambda: policy.authorizer) if policy is not None else None,
            count_dry_run=self.stats.count_dry_run,
        )
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
            assert self.inbound_policy is not None
            routes.admission = GatewayAdmission(self.inbound_policy, self.stats, s.gateway_port)
            address_port = await self._listen(
                "gateway", self._counted("gateway", routes.handle), s.gateway_port, s.bind_host
            )
        else:
            assert self.inbound_policy is not None
            inbound = InboundHandler(s, self.app_pools, self.inbound_policy, self.stats)
            address_port = await self._listen_inbound(
                self._counted("inbound", inbound.handle, telemetry)
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
            identity=s.identity if s.mtls else "",
            tcp_ports=s.tcp_ports,
            tcp_listeners=tcp_listeners,
            admin=f"http://{s.bind_host}:{self.ports['admin']}",
            # an app we start gets traffic once it listens (see _serving_when_app_listens)
            status="starting" if self.app_command else "healthy",
        )
        registration = Registration(self.bus, instance, ttl=s.register_ttl)
        await registration.listen_for_resync()
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
                if telemetry is not None:
                    # cancelled last, after the drain: its final flush (bounded) sends
                    # what the drained requests recorded
                    publisher = TelemetryPublisher(
                        telemetry.recorder, self.bus, before_flush=self.tcp.report_telemetry
                    )
                    tasks.append(tg.create_task(publisher.run(), name="sidecar:telemetry"))
                if self.identity is not None:
                    tasks.append(tg.create_task(self.identity.run(), name="sidecar:identity"))
                if self.gateway is not None:
                    await self.gateway.start()
                if self.app_command:
                    self.app = await asyncio.create_subprocess_exec(
                        *self.app_command, env=self._app_env()
                    )
                    tasks.append(tg.create_task(self._watch_app(self.app), name="sidecar:app"))
                    tasks.append(
                        tg.create_task(
                            self._serving_when_app_listens(registration), name="sidecar:serving"
                        )
                    )
                log.info("sidecar.ready", instance=s.instance, listeners=self.ports)
                await self._stop.wait()
                await self._shutdown(registration)
                if self.inbound_policy is not None:
                    await self.inbound_policy.close()  # JWKS fetches (issue 17)
                for task in tasks:
                    task.cancel()
        finally:
            for server in self.servers:
                server.close()
            for listener in self.servers_extra:
                listener.close()
            if self.identity is not None:
                await self.identity.close()
            self.tcp.close()
            routes.close()
            self.pools.close()
            self.app_pools.close()
            await self.bus.close()
        return self._exit_code

    async def _obtain_identity(self) -> bool:
        """The first workload certificate, before any listener opens (retrying while
        the CA is unreachable; a stop request ends the wait). False: do not start."""
        s = self.settings
        self.identity = WorkloadIdentity(
            self.bus,
            namespace=s.namespace,
            service_account=s.service_account,
            trust_domain=s.trust_domain,
            token=s.token,
            on_bundle=self.trust.install if self.trust is not None else None,
        )
        obtain = asyncio.create_task(self.identity.start(), name="sidecar:certificate")
        stop_wait = asyncio.create_task(self._stop.wait(), name="sidecar:stop-wait")
        await asyncio.wait({obtain, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if not obtain.done():
            obtain.cancel()
            return False
        try:
            snapshot = obtain.result()
        except IdentityRefused as e:
            log.error("sidecar.identity_refused", identity=s.identity, error=e.message)
            self._exit_code = 1
            return False
        self.pools.tls = MeshTls(self.identity)
        log.info("sidecar.certificate", identity=snapshot.spiffe_id, serial=snapshot.serial)
        return True

    async def _until_stopped(self, work: Awaitable[None]) -> bool:
        """Run `work` unless a stop request comes first (then False)."""
        task = asyncio.ensure_future(work)
        stop_wait = asyncio.create_task(self._stop.wait(), name="sidecar:stop-wait")
        await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if not task.done():
            task.cancel()
            return False
        task.result()
        return True

    async def _listen_inbound(self, handler: Handler) -> int:
        """The inbound listener: mTLS, plaintext or both, as PeerAuthentication says."""
        s = self.settings
        identity = self.identity
        policy = self.inbound_policy
        assert policy is not None
        listener = MeshListener(
            lambda: HttpServerProtocol(handler, self.limits),
            context=(lambda: identity.inbound_context()) if identity is not None else lambda: None,
            mode=lambda: policy.mode(s.app_port),
            name="inbound",
        )
        port = await listener.start(s.bind_host, s.inbound_port)
        self.servers_extra.append(listener)
        self.ports["inbound"] = port
        return port

    def _certs(self) -> dict[str, Any] | None:
        return self.identity.certs_info() if self.identity is not None else None

    def _telemetry(self) -> SidecarTelemetry | None:
        """The recorder (its `istio_*` series on the admin `/stats/prometheus`) and what
        the listeners call per request; None with `--no-telemetry`."""
        s = self.settings
        if not s.telemetry:
            return None
        recorder = TelemetryRecorder(
            reporter_id=new_reporter_id(s.instance, random.getrandbits(32)),
            namespace=s.namespace,
            service=s.service,
            instance=s.instance,
        )
        self.stats.registry.register(recorder)
        workload = own_workload(
            service=s.service,
            namespace=s.namespace,
            version=s.version,
            labels=s.labels,
            identity=s.identity if s.mtls else "",
        )
        return SidecarTelemetry(
            recorder,
            workload=workload,
            service_host=ServiceRef(s.namespace, s.service).fqdn,
            sampler=Sampler(s.trace_sampling / 100.0),
        )

    async def _become_ready(self, registration: Registration) -> None:
        await registration.register_until_done()
        self.ready = True

    async def _resync(self) -> None:
        await self.cache.resync()
        if self.gateway is not None:
            await self.gateway.refresh()
        if self.inbound_policy is not None:
            await self.inbound_policy.refresh()
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

    async def _serving_when_app_listens(self, registration: Registration) -> None:
        """Registered as `starting` (clients send it nothing), the instance becomes
        `healthy` once its app accepts connections on the app port: a client never
        meets an app that is not listening yet. An app that never listens (a job)
        stays out of load balancing."""
        port = self.settings.app_port
        while not self.draining:
            try:
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(APP_POLL_S)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            break
        if not self.draining:
            log.info("sidecar.app_listening", port=port)
            await registration.register_until_done(status="healthy")

    async def _watch_app(self, app: asyncio.subprocess.Process) -> None:
        code = await app.wait()
        if not self._stop.is_set():
            log.info("sidecar.app_exited", code=code)
            self._exit_code = code if code >= 0 else 128 - code
            self.stop()

    async def _shutdown(self, registration: Registration) -> None:
        """Drain, then stop: announce `draining` (clients stop choosing this instance
        and close their connections to it on their next response), keep serving while
        that spreads and in-flight requests finish, and only then stop the app and
        deregister, so no client request meets a stopped app."""
        s = self.settings
        log.info("sidecar.stopping", instance=s.instance)
        self.draining = True
        self.ready = False
        with contextlib.suppress(Exception):
            await registration.register(status="draining")
        deadline = time.monotonic() + s.drain_timeout
        await asyncio.sleep(min(DRAIN_ANNOUNCE_S, s.drain_timeout))
        while (
            self.active > 0 or self.tcp.active_connections() > 0
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.app is not None and self.app.returncode is None:
            self.app.terminate()
            try:
                await asyncio.wait_for(self.app.wait(), max(1.0, deadline - time.monotonic()))
            except TimeoutError:
                self.app.kill()
        await registration.deregister()
        await self.reporter.goodbye()
        log.info("sidecar.stopped", instance=s.instance, unfinished=self.active)
