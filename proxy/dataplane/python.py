"""The Python data plane: our own listeners (inbound mTLS listener, outbound HTTP
proxy, gateway listener, TCP relays) and the telemetry they record."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mesh.hosts import ServiceRef
from mesh.messages import SubscriptionStatus
from mesh.telemetry import new_reporter_id
from proxy.dataplane import Addresses, AdminRoute, Background, DataPlaneContext
from proxy.ext_authz import ExtAuthzClient
from proxy.forward import Outcome, PoolSet
from proxy.gateway_policy import GatewayAdmission
from proxy.http import Exchange, Limits, Request, serve
from proxy.http.server import HttpServerProtocol
from proxy.inbound import InboundHandler
from proxy.intercept.capture import CaptureListener
from proxy.listener import MeshListener
from proxy.mtls import MeshTls
from proxy.outbound import Caller, RouteHandler
from proxy.response_flags import ResponseFlag
from proxy.stats import ProxyStats
from proxy.tcp import TcpRelays, parse_tcp_upstream
from proxy.telemetry import (
    InboundSeen,
    Sampler,
    SidecarTelemetry,
    TelemetryPublisher,
    TelemetryRecorder,
    own_workload,
)

Handler = Callable[[Request, Exchange], Awaitable[None]]

# how often a draining data plane checks whether in-flight work has finished
DRAIN_POLL_S = 0.02


class PythonDataPlane:
    def __init__(self, limits: Limits, *, app_h2c: bool = False):
        self.limits = limits
        self.draining = False
        self.active = 0
        # to the app: HTTP/2 cleartext when it says it speaks it, else HTTP/1.1
        self.app_pools = PoolSet(limits, h2c=app_h2c)
        self.pools = PoolSet(limits)
        self.routes: RouteHandler | None = None
        self.tcp: TcpRelays | None = None
        self.telemetry: SidecarTelemetry | None = None
        self._ctx: DataPlaneContext | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._listeners: list[MeshListener] = []
        self._captures: list[CaptureListener] = []
        self._ports: dict[str, int] = {}
        self._gateway_changed = asyncio.Event()

    # ------------------------------------------------------------ lifecycle

    async def start(self, ctx: DataPlaneContext) -> Addresses:
        self._ctx = ctx
        s = ctx.settings
        identity, policy = ctx.identity, ctx.inbound_policy
        if identity is not None:
            self.pools.tls = MeshTls(identity)
        telemetry = self.telemetry = sidecar_telemetry(ctx)
        routes = self.routes = RouteHandler(
            Caller(namespace=s.namespace, labels=s.labels),
            ctx.destinations,
            self.pools,
            telemetry=telemetry,
        )
        if policy is not None:
            # CUSTOM policies reach their authorizer like any mesh call
            policy.ext_authz = ExtAuthzClient(
                ctx.destinations, self.pools, s.namespace, identity=s.identity
            )
        self.tcp = TcpRelays(
            ctx.destinations,
            ctx.stats.registry,
            telemetry=telemetry,
            tls=self.pools.tls if isinstance(self.pools.tls, MeshTls) else None,
            inbound_context=(lambda: identity.inbound_context()) if identity else None,
            inbound_mode=policy.mode if policy is not None else None,
            authorizer=(lambda: policy.authorizer) if policy is not None else None,
            count_dry_run=ctx.stats.count_dry_run,
            app_host=s.app_host,
            source_labels=s.labels,
            source_namespace=s.namespace,
        )
        tcp_listeners: dict[str, str] = {}
        if s.tcp_ports:
            tcp_listeners = await self.tcp.start_inbound(s.bind_host, s.tcp_ports)
        if s.tcp_upstreams:
            upstreams = [parse_tcp_upstream(spec, s.namespace) for spec in s.tcp_upstreams]
            await self.tcp.start_outbound(upstreams)
        self._ports.update(self.tcp.ports)
        # CONNECT to a ServiceEntry host with `tls` / `tcp` rules: relayed and routed
        # as a TCP connection
        routes.tcp_relays = self.tcp
        routes.own_ports = self._ports.values()  # a live view: listeners opened below too
        if ctx.gateway is not None:
            ctx.gateway.attach(routes)
            if policy is not None:
                routes.admission = GatewayAdmission(policy, ctx.stats, s.gateway_port)
            handler = self._counted("gateway", routes.handle)
            if s.egress_gateway and identity is not None:
                service_port = await self._listen_egress_gateway(ctx, handler)
            else:
                service_port = await self._listen("gateway", handler, s.gateway_port, s.bind_host)
        else:
            assert policy is not None
            inbound = InboundHandler(s, self.app_pools, policy, ctx.stats)
            service_port = await self._listen_inbound(
                ctx, self._counted("inbound", inbound.handle, telemetry)
            )
            outbound = self._counted("outbound", routes.handle)
            await self._listen("outbound", outbound, s.outbound_port, "127.0.0.1")
            if ctx.capture is not None:
                await self._listen_capture(ctx, outbound)
        return Addresses(
            service_port=service_port, listeners=dict(self._ports), tcp_listeners=tcp_listeners
        )

    def background(self) -> Background:
        if self._ctx is None:
            return []
        tasks: Background = []
        if self._ctx.gateway is not None:
            tasks.append(("gateway-l4", self._serve_gateway_l4))
        if self.telemetry is None:
            return tasks
        # cancelled after the drain: its final flush (bounded) sends what the drained
        # requests recorded
        tcp = self.tcp
        publisher = TelemetryPublisher(
            self.telemetry.recorder,
            self._ctx.bus,
            before_flush=tcp.report_telemetry if tcp is not None else None,
        )
        return [*tasks, ("telemetry", publisher.run)]

    async def _serve_gateway_l4(self) -> None:
        """Gateway mode: keep a TCP relay listener per TCP / TLS server of the
        gateway's config, reconciled after every change."""
        ctx, tcp = self._ctx, self.tcp
        assert ctx is not None and ctx.gateway is not None and tcp is not None
        registered: dict[str, str] = {}
        while True:
            self._gateway_changed.clear()
            await tcp.sync_gateway(ctx.settings.bind_host, ctx.gateway.config)
            listeners = tcp.gateway_listeners(ctx.settings.bind_host)
            if listeners != registered and ctx.tcp_listeners_changed is not None:
                # sidecars' `tls` / `tcp` routes to this gateway reach these listeners
                ctx.tcp_listeners_changed(listeners)
                registered = listeners
            await self._gateway_changed.wait()

    def config_changed(self) -> None:
        """HTTP listeners read the followers' state per request; a gateway's TCP and
        TLS servers are listeners of their own, reconciled by `_serve_gateway_l4`."""
        self._gateway_changed.set()

    def identity_changed(self) -> None:
        """Nothing to do: the TLS contexts come from the identity per connection."""

    async def drain(self, deadline: float) -> None:
        self.draining = True
        while (self.active > 0 or self._tcp_active()) and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for listener in self._listeners:
            listener.close()
        for capture in self._captures:
            capture.close()
        if self.tcp is not None:
            self.tcp.close()
        if self.routes is not None:
            self.routes.close()
        self.pools.close()
        self.app_pools.close()

    def statuses(self, followed: list[SubscriptionStatus]) -> list[SubscriptionStatus]:
        """The listeners read the followers' state per request: applied as accepted."""
        return followed

    def info(self) -> dict[str, Any]:
        return {"dataplane": "python", "draining": self.draining, "active": self.active}

    def mirrors(self) -> dict[str, Any] | None:
        return self.routes.mirrors.snapshot() if self.routes is not None else None

    def admin_routes(self) -> dict[str, AdminRoute]:
        return {}

    @property
    def inbound_listener(self) -> MeshListener:
        """The inbound listener (its connection counts: tests and `/config_dump`)."""
        return self._listeners[0]

    def _tcp_active(self) -> bool:
        return self.tcp is not None and self.tcp.active_connections() > 0

    # ------------------------------------------------------------ listeners

    async def _listen(self, name: str, handler: Handler, port: int, host: str) -> int:
        server = await serve(handler, host, port, limits=self.limits)
        self._servers.append(server)
        bound = int(server.sockets[0].getsockname()[1])
        self._ports[name] = bound
        return bound

    async def _listen_inbound(self, ctx: DataPlaneContext, handler: Handler) -> int:
        """The inbound listener: mTLS, plaintext or both, as PeerAuthentication says."""
        s = ctx.settings
        identity, policy = ctx.identity, ctx.inbound_policy
        assert policy is not None
        listener = MeshListener(
            lambda: HttpServerProtocol(handler, self.limits),
            context=(lambda: identity.inbound_context()) if identity is not None else lambda: None,
            mode=lambda: policy.mode(s.app_port),
            name="inbound",
        )
        port = await listener.start(s.bind_host, s.inbound_port)
        self._listeners.append(listener)
        self._ports["inbound"] = port
        return port

    async def _listen_capture(self, ctx: DataPlaneContext, outbound: Handler) -> None:
        """The capture listener of an intercepted app (docs/architecture.md §5.4): the
        same router as the outbound listener, and the TCP relays."""
        assert ctx.capture is not None and self.tcp is not None
        s = ctx.settings
        capture = CaptureListener(
            http_handler=outbound,
            limits=self.limits,
            tcp=self.tcp,
            targets=ctx.capture.targets,
            registry=ctx.stats.registry,
            namespace=s.namespace,
            policy=ctx.capture.outbound_policy,
            opaque_ports=s.capture.opaque_ports,
        )
        self._ports["capture"] = await capture.start(ctx.capture.host, ctx.capture.port)
        self._captures.append(capture)

    async def _listen_egress_gateway(self, ctx: DataPlaneContext, handler: Handler) -> int:
        """An egress gateway's listener: mTLS from mesh sidecars (which reach it as a
        mesh service with an identity), plaintext from anyone else, on one port."""
        s = ctx.settings
        identity = ctx.identity
        assert identity is not None
        listener = MeshListener(
            lambda: HttpServerProtocol(handler, self.limits),
            context=lambda: identity.inbound_context(),
            mode=lambda: "PERMISSIVE",
            name="gateway",
        )
        port = await listener.start(s.bind_host, s.gateway_port)
        self._listeners.append(listener)
        self._ports["gateway"] = port
        return port

    # ------------------------------------------------------------ handlers

    def _counted(
        self,
        listener: str,
        handle: Callable[[Request, Exchange], Awaitable[Outcome]],
        telemetry: SidecarTelemetry | None = None,
    ) -> Handler:
        if telemetry is not None:
            return self._counted_traced(listener, handle, telemetry)
        stats = self._stats()

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
                    stats.count(listener, outcome.status, outcome.flags)
                else:
                    stats.count(listener, 0, ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)

        return handler

    def _counted_traced(
        self,
        listener: str,
        handle: Callable[[Request, Exchange], Awaitable[Outcome]],
        telemetry: SidecarTelemetry,
    ) -> Handler:
        """`_counted` with the inbound telemetry (`SidecarTelemetry.inbound`) done in
        the same coroutine: one coroutine fewer per request."""
        stats = self._stats()

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
                    stats.count(listener, outcome.status, outcome.flags)
                else:
                    stats.count(listener, 0, ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
                if seen is not None:
                    telemetry.inbound_done(req, ex, outcome, seen)

        return handler

    def _stats(self) -> ProxyStats:
        assert self._ctx is not None
        return self._ctx.stats


def sidecar_telemetry(ctx: DataPlaneContext) -> SidecarTelemetry | None:
    """The recorder (its `istio_*` series on the admin `/stats/prometheus`) and what
    the listeners call per request; None with `--no-telemetry`."""
    s = ctx.settings
    if not s.telemetry:
        return None
    recorder = TelemetryRecorder(
        reporter_id=new_reporter_id(s.instance, random.getrandbits(32)),
        namespace=s.namespace,
        service=s.service,
        instance=s.instance,
        cluster=s.cluster_id,
    )
    ctx.stats.registry.register(recorder)
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
