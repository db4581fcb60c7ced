"""The sidecar agent: identity, registration, config following, status reports and the
app's lifecycle, driving a data plane (`proxy.dataplane`: our Python listeners or
Envoy) that carries the traffic.

One lifecycle, ordered (DESIGN §7). Start: admin listener (not ready), bus, followers
and status reporter, certificate, (with `--intercept`: the app's namespace and the DNS
server), data plane, (the interception rules), register, ready — and only then the
app, with HTTP_PROXY pointing at the outbound listener (an intercepted app gets none),
so the app never runs before the mesh is ready. An app the sidecar starts is
registered `starting` (no traffic) until it accepts connections, then `healthy`.
Every step that has started registers its cleanup on one exit stack: a stop at any
point (SIGTERM, SIGINT, `stop()`, the app exiting) unwinds exactly what started, in
reverse order. Stop once serving: mark the instance draining, let the data plane
drain while clients see that (bounded), stop the app, deregister, then close the data
plane, identity, bus and admin listener. An app that exits by itself makes the
sidecar exit with the app's exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import msgspec

from mesh import errors
from mesh.bus import Bus
from mesh.bus_permissions import sidecar_inbox
from mesh.ca_messages import TrustBundle
from mesh.lifecycle import StopRequested, StopSignal
from mesh.logs import get_logger
from mesh.messages import Instance, SubscriptionStatus
from mesh.port_owner import port_in_use
from mesh.proxy_records import ProxyRecord
from proxy.admin import AdminServer
from proxy.app_process import ManagedApp, app_env, healthy_when_listening
from proxy.dataplane import Addresses, DataPlane, DataPlaneContext, make_dataplane
from proxy.destinations import DestinationCache
from proxy.gateway import GatewayFollower
from proxy.http import Limits
from proxy.identity_client import ConfigTrust, IdentityRefused, WorkloadIdentity
from proxy.inbound_policy import InboundPolicyFollower
from proxy.intercept.agent import Interception
from proxy.intercept.targets import policy_of
from proxy.registration import Registration
from proxy.settings import SidecarSettings
from proxy.stats import ProxyStats
from proxy.status_report import StatusReporter

log = get_logger("proxy.sidecar")

# how long a stopping sidecar keeps serving after announcing `draining`, for the
# registry event to reach every client proxy before its listeners stop mattering
DRAIN_ANNOUNCE_S = 1.0


class Sidecar:
    def __init__(
        self,
        settings: SidecarSettings,
        app_command: list[str] | None = None,
        limits: Limits | None = None,
        dataplane: DataPlane | None = None,
    ):
        self.settings = settings
        self.limits = limits or Limits()
        self.stats = ProxyStats()
        self.dataplane = dataplane or make_dataplane(
            settings.dataplane, self.limits, app_h2c=settings.app_speaks_h2
        )
        self.app = ManagedApp(app_command, settings.app_port) if app_command else None
        self.ready = False
        self.draining = False
        self.ports: dict[str, int] = {}
        self._stop = StopSignal()
        self._exit_code = 0
        self.bus: Bus
        self.cache: DestinationCache
        self.reporter: StatusReporter
        self.gateway: GatewayFollower | None = None
        self.identity: WorkloadIdentity | None = None
        self.trust: ConfigTrust | None = None
        self.inbound_policy: InboundPolicyFollower | None = None
        self.record: ProxyRecord | None = None
        self.interception: Interception | None = None
        # a gateway's TCP / TLS server listeners (server port -> host:port), registered
        # with the instance so that sidecars' TCP routes reach them
        self._gateway_tcp_listeners: dict[str, str] = {}
        self._app_tcp_listeners: dict[str, str] = {}
        self._registration: Registration | None = None
        self._reregistering: asyncio.Task[None] | None = None

    @property
    def pools(self) -> Any:
        """The Python data plane's upstream connection pools (tests and benchmarks)."""
        return getattr(self.dataplane, "pools", None)

    def stop(self) -> None:
        self._stop.request()

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
            "dataplane": self.dataplane.info(),
            "intercept": self.interception.info() if self.interception else None,
        }

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        self._stop.install()
        async with contextlib.AsyncExitStack() as started:
            try:
                registration = await self._start(started)
            except StopRequested:
                return self._exit_code
            except errors.MeshError as e:
                # e.g. the data plane could not start: said once, no traceback
                log.error("sidecar.start_failed", instance=self.settings.instance, error=str(e))
                return 1
            await self._serve(registration)
        return self._exit_code

    async def _start(self, started: contextlib.AsyncExitStack) -> Registration:
        """Every start-up step, in order; each pushes its own cleanup on `started`. A
        stop request during a wait raises StopRequested."""
        s = self.settings
        if self.app is not None and not s.intercept:
            # another process there would be registered, and marked healthy, as our app
            taken = port_in_use("app port", s.app_port)
            if taken:
                raise errors.Unavailable(f"{taken}: the app this sidecar starts listens there")
        self._record_in_cluster(started)
        admin = AdminServer(
            ready=lambda: self.ready,
            stats=self.stats,
            cache=lambda: getattr(self, "cache", None),
            info=self.info,
            certs=self._certs,
            mirrors=self.dataplane.mirrors,
            overrides=self.dataplane.admin_routes(),
        )
        self.ports["admin"] = await admin.start(s.bind_host, s.admin_port)
        started.push_async_callback(admin.stop)
        self.bus = await self._stop.unless_stopped(
            Bus.connect(
                s.nats,
                name=f"sidecar:{s.instance}",
                prefix=s.prefix,
                user=s.nats_user,
                password=s.nats_password,
                wait_for_server=True,
                inbox_prefix=sidecar_inbox(s.prefix),
            )
        )
        started.push_async_callback(self.bus.close)
        await self._follow_config()
        await self._obtain_identity(started)
        if self.inbound_policy is not None:
            # its JWKS fetches end with the sidecar
            started.push_async_callback(self.inbound_policy.close)
            await self.inbound_policy.start()
        if self.gateway is not None:
            await self.gateway.start()
        capture = None
        if s.intercept:
            self.interception = Interception(s, self.bus, self.stats)
            capture = await self.interception.setup(started)
            if self.app is not None:
                self.app.command = self.interception.app_command(self.app.command)
                self.app.host = s.app_host
        elif s.capture_port:
            self.interception = Interception(s, self.bus, self.stats)
            capture = await self.interception.setup_pod(started)
        if capture is not None:
            # unknown destinations follow the mesh-wide outbound traffic policy
            mesh_wide = self.cache.mesh_wide
            capture = dataclasses.replace(
                capture, outbound_policy=lambda: policy_of(mesh_wide.config)
            )
            try:
                await mesh_wide.current()  # fetched and followed from here on
            except errors.MeshError as e:
                log.warning("sidecar.meshwide_unavailable", error=str(e))
        started.push_async_callback(self.dataplane.stop)
        addresses = await self.dataplane.start(
            DataPlaneContext(
                settings=s,
                bus=self.bus,
                stats=self.stats,
                limits=self.limits,
                destinations=self.cache,
                inbound_policy=self.inbound_policy,
                gateway=self.gateway,
                identity=self.identity,
                status_changed=self.reporter.changed,
                capture=capture,
                tcp_listeners_changed=self._tcp_listeners_changed,
            )
        )
        self.ports.update(addresses.listeners)
        if self.interception is not None and s.intercept:
            await self.interception.capture(self.ports["capture"])
        if self.record is not None and s.dataplane == "envoy":
            # Envoy outlives a killed sidecar: `meshctl down` must find it
            self.record.add("envoy", self.dataplane.info().get("pid"))
        self._app_tcp_listeners = dict(addresses.tcp_listeners)
        registration = Registration(self.bus, self._instance(addresses), ttl=s.register_ttl)
        self._registration = registration
        await registration.listen_for_resync()
        await self._stop.unless_stopped(registration.register_until_done())
        self.ready = True
        return registration

    def _record_in_cluster(self, started: contextlib.AsyncExitStack) -> None:
        """Next to a local cluster, record this process in its state dir (removed on
        exit, last), so that `meshctl down` stops it (mesh.proxy_records)."""
        s = self.settings
        if not s.cluster_state_dir:
            return
        kind = "gateway" if s.gateway else "sidecar"
        self.record = ProxyRecord(
            Path(s.cluster_state_dir), s.instance, kind, s.service, s.dataplane
        )
        started.callback(self.record.remove)
        self.record.add(kind, os.getpid())
        if s.dataplane == "envoy":
            # imported here: it brings the Envoy translation and its protos, which a
            # Python data plane never uses (resident memory, docs/architecture.md §5.1)
            from proxy.dataplane.envoy_host import instance_state_dir

            self.record.set(envoy_dir=str(instance_state_dir(s)))

    async def _follow_config(self) -> None:
        """Destinations (on demand), the inbound policy or the gateway's config, the
        status reporter, and signature checking."""
        s = self.settings
        self.cache = DestinationCache(self.bus, on_change=self._config_changed)
        if s.gateway:
            self.gateway = GatewayFollower(self.bus, s, on_change=self._config_changed)
        # a gateway too: RequestAuthentication and AuthorizationPolicy selecting it apply
        # there before routing, as in Istio
        self.inbound_policy = InboundPolicyFollower(self.bus, s, on_change=self._config_changed)
        self.reporter = StatusReporter(
            self.bus,
            proxy=s.instance,
            namespace=s.namespace,
            service=s.service,
            version=s.version,
            labels=s.labels,
            kind="gateway" if s.gateway else "sidecar",
            statuses=self._statuses,
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

    async def _obtain_identity(self, started: contextlib.AsyncExitStack) -> None:
        """The first workload certificate, before the data plane starts (retrying while
        the CA is unreachable); without mTLS, the trust bundle that config signatures
        are checked against. A refused certificate stops the sidecar with exit code 1."""
        s = self.settings
        if not s.mtls:
            if self.trust is not None:
                await self._stop.unless_stopped(self.trust.obtain())
            return
        self.identity = WorkloadIdentity(
            self.bus,
            namespace=s.namespace,
            service_account=s.service_account,
            trust_domain=s.trust_domain,
            token=s.token,
            on_bundle=self._identity_changed,
            # our listeners speak HTTP/2 between sidecars when both sides offer it
            alpn=("h2", "http/1.1"),
        )
        started.push_async_callback(self.identity.close)
        try:
            snapshot = await self._stop.unless_stopped(self.identity.start())
        except IdentityRefused as e:
            log.error("sidecar.identity_refused", identity=s.identity, error=e.message)
            self._exit_code = 1
            raise StopRequested from None
        log.info("sidecar.certificate", identity=snapshot.spiffe_id, serial=snapshot.serial)

    def _instance(self, addresses: Addresses) -> Instance:
        s = self.settings
        return Instance(
            namespace=s.namespace,
            service=s.service,
            instance=s.instance,
            address=f"{s.bind_host}:{addresses.service_port}",
            version=s.version,
            labels=s.labels,
            service_account=s.service_account,
            identity=s.identity if s.mtls else "",
            tcp_ports=s.tcp_ports,
            tcp_listeners={**self._app_tcp_listeners, **self._gateway_tcp_listeners},
            plain_tcp_ports=sorted(int(port) for port in self._gateway_tcp_listeners),
            admin=f"http://{s.bind_host}:{self.ports['admin']}",
            # an app we start gets traffic once it listens (see healthy_when_listening)
            status="starting" if self.app is not None else "healthy",
        )

    async def _serve(self, registration: Registration) -> None:
        """Registered and ready: the background tasks and the app run until a stop
        request; then drain and leave, and cancel the tasks."""
        s = self.settings
        async with asyncio.TaskGroup() as tg:
            work = [
                ("heartbeat", registration.heartbeat_forever),
                ("status", self.reporter.run),
                ("resync", lambda: self.cache.resync_forever(self._resync)),
                *self.dataplane.background(),
            ]
            if self.identity is not None:
                work.append(("identity", self.identity.run))
            tasks = [tg.create_task(fn(), name=f"sidecar:{name}") for name, fn in work]
            if self.app is not None:
                await self.app.start(
                    app_env(
                        s,
                        # an intercepted app is given no proxy: its traffic is captured
                        outbound=""
                        if self.interception is not None
                        else f"http://127.0.0.1:{self.ports['outbound']}",
                        admin=f"http://{s.bind_host}:{self.ports['admin']}",
                    )
                )
                tasks.append(tg.create_task(self._watch_app(self.app), name="sidecar:app"))
                if self.record is not None and self.app.process is not None:
                    self.record.add("app", self.app.process.pid)
                healthy = healthy_when_listening(
                    self.app,
                    stopping=lambda: self.draining,
                    mark_healthy=lambda: registration.register_until_done(status="healthy"),
                )
                tasks.append(tg.create_task(healthy, name="sidecar:serving"))
            log.info("sidecar.ready", instance=s.instance, listeners=self.ports)
            await self._stop.wait()
            await self._drain_and_leave(registration)
            for task in tasks:
                task.cancel()

    async def _drain_and_leave(self, registration: Registration) -> None:
        """Drain, then stop: announce `draining` (clients stop choosing this instance
        and close their connections to it on their next response), let the data plane
        serve while that spreads and in-flight requests finish, and only then stop the
        app and deregister, so no client request meets a stopped app."""
        s = self.settings
        log.info("sidecar.stopping", instance=s.instance)
        self.draining = True
        self.ready = False
        deadline = time.monotonic() + s.drain_timeout
        drained = asyncio.create_task(self.dataplane.drain(deadline), name="sidecar:drain")
        with contextlib.suppress(Exception):
            await registration.register(status="draining")
        await asyncio.gather(asyncio.sleep(min(DRAIN_ANNOUNCE_S, s.drain_timeout)), drained)
        if self.app is not None:
            await self.app.stop(max(1.0, deadline - time.monotonic()))
        if self._reregistering is not None:
            self._reregistering.cancel()
        await registration.deregister()
        await self.reporter.goodbye()
        log.info("sidecar.stopped", instance=s.instance, dataplane=self.dataplane.info())

    async def _watch_app(self, app: ManagedApp) -> None:
        code = await app.wait_exit()
        if not self._stop.is_set():
            log.info("sidecar.app_exited", code=code)
            self._exit_code = code
            self.stop()

    # ------------------------------------------------------------ followers

    def _config_changed(self) -> None:
        self.reporter.changed()
        self.dataplane.config_changed()

    def _tcp_listeners_changed(self, listeners: dict[str, str]) -> None:
        """A gateway opened or closed TCP / TLS server listeners: the instance is
        registered again with them (a failed attempt is logged; the next change or a
        re-registration after a lapsed lease carries them)."""
        self._gateway_tcp_listeners = dict(listeners)
        registration = self._registration
        if registration is None:
            return  # registered later, with them (`_instance`)
        registration.instance = msgspec.structs.replace(
            registration.instance,
            tcp_listeners={**self._app_tcp_listeners, **listeners},
            plain_tcp_ports=sorted(int(port) for port in listeners),
        )

        async def register() -> None:
            if self.draining:
                return  # leaving: never registered again after the deregistration
            try:
                await registration.register()
            except errors.MeshError as e:
                log.warning("sidecar.reregister_failed", error=str(e))

        if self._reregistering is None or self._reregistering.done():
            self._reregistering = asyncio.create_task(register(), name="sidecar:reregister")
        else:
            # one in flight may carry the previous listeners: register again after it
            previous = self._reregistering

            async def after() -> None:
                with contextlib.suppress(Exception):
                    await previous
                await register()

            self._reregistering = asyncio.create_task(after(), name="sidecar:reregister")

    def _identity_changed(self, bundle: TrustBundle) -> None:
        """A certificate or trust bundle was installed (called by WorkloadIdentity)."""
        if self.trust is not None:
            self.trust.install(bundle)
        self.dataplane.identity_changed()

    def _statuses(self) -> list[SubscriptionStatus]:
        out = self.cache.subscription_statuses()
        for follower in (self.gateway, self.inbound_policy):
            if follower is not None:
                out.extend(follower.statuses())
        return self.dataplane.statuses(out)

    async def _resync(self) -> None:
        await self.cache.resync()
        if self.gateway is not None:
            await self.gateway.refresh()
        if self.inbound_policy is not None:
            await self.inbound_policy.refresh()
        self.reporter.changed()

    def _certs(self) -> dict[str, Any] | None:
        return self.identity.certs_info() if self.identity is not None else None
