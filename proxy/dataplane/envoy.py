"""The Envoy data plane: an Envoy process configured over xDS by this sidecar.

The agent's followers keep the config; this module turns it into Envoy resources
(`proxy.envoy.translate`) on every change (debounced) and serves them on the
sidecar's private ADS socket (`proxy.envoy.xds_server`), with the workload certificate
and trust bundle over SDS on every install (rotation without an Envoy restart).
Envoy's ACK/NACK becomes the proxy-status report (`envoy_view.ApplyTracker`); a push
Envoy refuses, or one the translator cannot make, is reported as NACK and the last
good configuration keeps serving.

Destinations: a sidecar's Envoy learns them on demand (the default, not a gateway and
not an intercepting sidecar), as the Python proxy does: the outbound route
configuration has no virtual hosts, Envoy's `on_demand` filter asks VHDS (a delta
stream) for `outbound_http/<host>` and holds the request; the agent follows that
destination, pushes its clusters and endpoints (state of the world), and once Envoy
has ACKed them answers with the virtual host (a mesh service's or a ServiceEntry
host's; a Host naming nothing known gets the translation's unknown-host routes: 502
`unknown host`, or the ALLOW_ANY passthrough). A followed destination's changes are
pushed like any other; destinations are never forgotten. With `--no-envoy-on-demand`
(and on a gateway or an intercepting sidecar) it follows every service the registry
knows (`registry.get` for all, then every new endpoint set on `registry.endpoints.>`)
and every host the routes name (architecture §5.2).

Telemetry: Envoy's gRPC access logs come to the sidecar's access-log service
(`proxy.envoy.access_log_service`, converted by `access_log_convert`) and become the same
records the Python data plane publishes, through the same recorder and publisher.
Envoy drops the entries it buffered when it exits, so `stop()` runs in this order:
(Envoy drained by `drain()`), wait until no entry arrived for a while, stop Envoy, stop
the access-log service, and only then the publisher's final flush. Envoy runs in the instance's own
state directory (`envoy_host`): a sidecar restarted under the same `--instance` adopts
the Envoy its predecessor left serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from envoy.config.route.v3 import route_components_pb2
from google.protobuf.message import Message
from prometheus_client import generate_latest

from mesh import errors
from mesh.compiled import GatewayConfig
from mesh.compiled_mesh import ExternalService
from mesh.hosts import ServiceRef, service_of_host
from mesh.logs import get_logger
from mesh.messages import EndpointSet, EndpointsGetReply, EndpointsGetRequest, SubscriptionStatus
from mesh.port_owner import describe_holder
from proxy.admin import AdminRoute
from proxy.dataplane import Addresses, Background, DataPlaneContext
from proxy.dataplane.envoy_host import accepts, choose_ports, instance_state_dir
from proxy.dataplane.envoy_view import (
    ApplyTracker,
    EnvoyPorts,
    capture_detection_timeouts,
    destinations_of_clusters,
    mesh_view,
    port_flag,
    ports_in_use,
    proxy_node,
    selected_by,
    selecting_entries,
    vhds_answer,
    vhds_fqdn,
    vhds_host,
    view_endpoints,
)
from proxy.dataplane.python import sidecar_telemetry
from proxy.envoy.access_log_convert import AccessLogConverter, LocalProxy
from proxy.envoy.access_log_service import AccessLogIngest, AccessLogServer
from proxy.envoy.bootstrap import BootstrapOptions, build_bootstrap
from proxy.envoy.otlp_spans import OtlpSpanConverter
from proxy.envoy.private_grpc import PrivateGrpcServer, PrivateSocketError, wait_quiet
from proxy.envoy.process import (
    EnvoyError,
    EnvoyExit,
    EnvoyOptions,
    EnvoyProcess,
    find_running_envoy,
)
from proxy.envoy.resources import CLUSTER, ENDPOINT, LISTENER, VIRTUAL_HOST, XdsResources
from proxy.envoy.stats_convert import (
    ADMIN_STATS_PATH,
    StatsError,
    StatsIngest,
    parse_request_stats,
)
from proxy.envoy.trace_service import SpanIngest, TraceServer
from proxy.envoy.translate import (
    MeshView,
    ProxyNode,
    TranslationError,
    jwt_authn,
    referenced_hosts,
    tls_secrets,
    translate,
)
from proxy.envoy.translate.jwt_authn import discovery_uris
from proxy.envoy.translate.names import OUTBOUND_HTTP_ROUTE
from proxy.envoy.translate.tcp import L4_GATEWAY_PROTOCOLS
from proxy.envoy.xds_server import ApplyState, TypeStatus, XdsError, XdsServer
from proxy.jwks_fetch import OidcDiscovery
from proxy.tcp import listener_address
from proxy.telemetry import SidecarTelemetry, TelemetryPublisher

log = get_logger("proxy.dataplane.envoy")

# changes that arrive together become one push
DEBOUNCE_S = 0.005
# how long start() waits for Envoy to take its first configuration and listen
FIRST_CONFIG_TIMEOUT_S = 30.0
LISTEN_POLL_S = 0.05
DRAIN_POLL_S = 0.1
ADMIN_TIMEOUT_S = 5.0
# destinations fetched at once while following every service
FOLLOW_CONCURRENCY = 32
# how many hops of "a route sends to another host" are followed at once
REFERENCE_DEPTH = 8
# the bootstrap's cluster for the sidecar's access-log service
ACCESS_LOG_CLUSTER = "meshwork-access-log"
# the bootstrap's cluster for the sidecar's OTLP trace receiver (Envoy's tracer)
TRACING_CLUSTER = "meshwork-traces"
# Envoy's OpenTelemetry tracer reports the spans (to the sidecar's OTLP receiver); it
# samples by the W3C trace context, not the request id (`translate.listeners.tracing`),
# so a middle hop whose app forwards only `traceparent` continues the trace. Off: the
# spans come from the access logs (children of the incoming context)
ENVOY_TRACER = True
# stopping: how long no access-log entry must have arrived before Envoy is stopped
# (Envoy flushes its buffer every second), and the most the sidecar waits for that
LOGS_QUIET_S = 1.5
LOGS_QUIET_TIMEOUT_S = 10.0
# `--envoy-telemetry stats` (docs/architecture.md §7): how often the agent reads
# Envoy's request counters, and how long it waits before its last read on stopping
# (Envoy merges histograms just after the read that flushes them)
STATS_READ_S = 1.0
STATS_MERGE_S = 0.2


class EnvoyDataPlane:
    def __init__(self) -> None:
        self._ctx: DataPlaneContext | None = None
        self._dir: Path | None = None
        self._xds: XdsServer | None = None
        self._envoy: EnvoyProcess | None = None
        self._node: ProxyNode | None = None
        self._ports: EnvoyPorts | None = None
        self._tracker = ApplyTracker()
        self._secrets: dict[str, Any] = {}
        self._resources = XdsResources()
        self._wake = asyncio.Event()
        # set once Envoy ACKed a whole push (its listeners are in place)
        self._envoy_took_config = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._following: set[ServiceRef] = set()
        # an intercepted app: the virtual IPs of the services followed (fqdn -> address)
        self._vips: dict[str, str] = {}
        self._session: aiohttp.ClientSession | None = None
        self.pushes = 0
        # a gateway's TCP / TLS server listeners as last registered (port -> host:port)
        self._l4_registered: dict[str, str] = {}
        self.telemetry: SidecarTelemetry | None = None
        self._als: AccessLogServer | None = None
        # stats mode: what turns Envoy's request counters into the recorder's series
        self._stats: StatsIngest | None = None
        # set once Envoy listens: the publisher's `collect` reads the counters
        self._stats_reading = False
        # one read at a time: a read's counters must not reach the deltas after a
        # later read's (a counter that went down reads as an Envoy restart)
        self._stats_lock = asyncio.Lock()
        self._traces: TraceServer | None = None
        self._publisher: asyncio.Task[None] | None = None
        # the view the last push was translated from: the endpoints Envoy may choose
        self._mesh_view: MeshView | None = None
        # OIDC discovery for RequestAuthentication rules with only an issuer
        self._oidc: OidcDiscovery | None = None
        # on demand: every VHDS name Envoy asked for -> the FQDN its Host names ("" for
        # no mesh service), and the task that serves the virtual hosts once Envoy has
        # the clusters they route to
        self._vhds_requested: dict[str, str] = {}
        self._vhds_task: asyncio.Task[None] | None = None
        # on demand: the ServiceEntries whose workloadSelector picks registered
        # instances (their services are followed), and whether the registry's endpoint
        # events are watched for them
        self._selecting: tuple[ExternalService, ...] = ()
        self._registry_watched = False
        # on demand, with inbound TCP listeners: every registered service's endpoints,
        # to name the caller of an inbound TCP connection (its certificate names its
        # service account; TCP carries no peer metadata) as the Python relay does by
        # fetching it; kept in the agent only, never pushed to Envoy
        self._registered: dict[ServiceRef, EndpointSet] = {}

    # ------------------------------------------------------------ lifecycle

    async def start(self, ctx: DataPlaneContext) -> Addresses:
        self._ctx = ctx
        s = ctx.settings
        if ctx.identity is None:
            raise errors.BadRequest(
                "--dataplane envoy needs mTLS (a certificate from the CA): drop --no-mtls"
            )
        self._dir = instance_state_dir(s)
        # an Envoy a previous sidecar of this instance left running (it died): adopted,
        # so the app's traffic never stopped; same admin port, same bootstrap
        left = find_running_envoy(self._dir)
        ports = self._ports = choose_ports(ctx, left.admin_port if left else 0)
        self.telemetry = sidecar_telemetry(ctx)
        if self.telemetry is not None:
            await self._start_telemetry(ctx, self.telemetry)
        self._node = proxy_node(
            s,
            ports,
            ACCESS_LOG_CLUSTER if self._als else "",
            TRACING_CLUSTER if self._traces else "",
        )
        self._xds = XdsServer(
            self._dir / "xds.sock",
            on_status=self._on_xds_status,
            on_delta_wanted=self._on_vhosts_wanted,
        )
        try:
            await self._xds.start()
        except XdsError as e:
            raise errors.Unavailable(f"the xDS server did not start: {e}") from None
        self._secrets = self._current_secrets()
        self._oidc = OidcDiscovery(s.jwks_ca_file, self._wake.set)
        try:
            # ServiceEntry hosts and the outbound policy are in the first configuration
            await ctx.destinations.mesh_wide.current()
        except errors.MeshError as e:
            log.warning("envoy.meshwide_unavailable", error=str(e))
        if not self._node.on_demand:
            await self._follow_every_service()
        else:
            if self._indexes_callers():
                await self._watch_registry()
                await self._list_services()
            if left is not None:
                # what the app called through the Envoy we adopt: followed before the
                # first push, which would otherwise take its clusters away (503 NC)
                await self._follow(await self._adopted_destinations())
            await self._follow_referenced()
        self._push()
        self._tasks.append(asyncio.create_task(self._push_loop(), name="envoy:push"))
        bootstrap = build_bootstrap(
            BootstrapOptions(
                node_id=s.instance,
                cluster=s.service,
                xds_socket=self._dir / "xds.sock",
                admin_port=ports.admin,
                access_log_cluster=ACCESS_LOG_CLUSTER if self._als else "",
                access_log_socket=self._als.socket_path if self._als else None,
                request_stats=self._stats is not None,
                tracing_cluster=TRACING_CLUSTER if self._traces else "",
                tracing_socket=self._traces.socket_path if self._traces else None,
            )
        )
        self._envoy = EnvoyProcess(
            EnvoyOptions(
                bootstrap=bootstrap,
                admin_port=ports.admin,
                state_dir=self._dir,
                # listeners close when the sidecar's drain ends, not before: the app
                # still calls out while its inbound drains
                drain_time_s=s.drain_timeout,
                parent_shutdown_time_s=s.drain_timeout + 5.0,
                adopt=True,
            ),
            on_exit=self._envoy_exited,
        )
        try:
            await self._envoy.start()
        except EnvoyError as e:
            raise errors.Unavailable(f"Envoy did not start: {e}") from None
        await self._until_listening(ports)
        if self._stats is not None:
            if left is not None:
                # an adopted Envoy's counters were reported by the sidecar before
                await self._read_request_stats(baseline=True)
            # from now on the publisher reads them before each flush
            self._stats_reading = True
        listeners = {"envoy-admin": ports.admin}
        if s.gateway:
            listeners["gateway"] = ports.gateway
        else:
            listeners.update(inbound=ports.inbound, outbound=ports.outbound)
        for app_port, port in ports.tcp_inbound.items():
            listeners[f"tcp-inbound:{app_port}"] = port
        if ports.capture:
            listeners["capture"] = ports.capture
        log.info("envoy.serving", pid=self._envoy.pid, listeners=listeners)
        return Addresses(
            service_port=ports.gateway if s.gateway else ports.inbound,
            listeners=listeners,
            tcp_listeners={
                str(app_port): f"{s.bind_host}:{port}"
                for app_port, port in ports.tcp_inbound.items()
            },
        )

    def background(self) -> Background:
        # the EnvoyProcess supervises (restarts) Envoy in a task it owns; the telemetry
        # publisher is this data plane's own task: it must outlive Envoy (stop())
        return []

    def config_changed(self) -> None:
        self._wake.set()

    def identity_changed(self) -> None:
        if self._xds is None:
            return
        self._secrets = self._current_secrets()
        self._wake.set()

    async def drain(self, deadline: float) -> None:
        """Envoy's graceful drain of its listeners (keep-alive clients are told to
        close), then wait until no request is active or `deadline`."""
        if self._envoy is None or self._ports is None:
            return
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            await self._admin("POST", "/drain_listeners?graceful")
        while time.monotonic() < deadline:
            try:
                if await self._active_requests() == 0:
                    return
            except (aiohttp.ClientError, TimeoutError):
                return
            await asyncio.sleep(DRAIN_POLL_S)

    async def stop(self) -> None:
        """Stop in the order that loses no telemetry: Envoy (drained already by
        `drain()`, or stopping after a failed start) has sent every buffered entry once
        none arrived for `LOGS_QUIET_S`; then Envoy stops, then the access-log service
        (finishing what it received), then the publisher's final flush."""
        self._stats_reading = False  # the reads below are the last ones
        tasks = [*self._tasks, *([self._vhds_task] if self._vhds_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._oidc is not None:
            await self._oidc.close()
        receivers = [r for r in (self._als, self._traces) if r is not None]
        if receivers and self._envoy is not None and self._envoy.pid is not None:
            last = lambda: max(r.last_message_at for r in receivers)  # noqa: E731
            if not await wait_quiet(last, LOGS_QUIET_S, LOGS_QUIET_TIMEOUT_S):
                log.warning("envoy.telemetry_not_quiet", timeout_s=LOGS_QUIET_TIMEOUT_S)
        if self._stats is not None and self._envoy is not None and self._envoy.pid is not None:
            # what Envoy counted since the last read, then its histograms once merged
            await self._read_request_stats()
            await asyncio.sleep(STATS_MERGE_S)
            await self._read_request_stats()
        if self._envoy is not None:
            await self._envoy.stop(drain=False)
        if self._xds is not None:
            await self._xds.stop()
        for receiver in receivers:
            await receiver.stop()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            # its final flush sends what the last entries recorded (the bus is still up)
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
        if self._session is not None:
            await self._session.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def statuses(self, followed: list[SubscriptionStatus]) -> list[SubscriptionStatus]:
        return self._tracker.statuses(followed)

    def info(self) -> dict[str, Any]:
        xds = self._xds
        return {
            "dataplane": "envoy",
            # where Envoy reaches the app (its namespace's address when intercepted)
            "app_host": self._ctx.settings.app_host if self._ctx is not None else "",
            "pid": self._envoy.pid if self._envoy is not None else None,
            "restarts": self._envoy.restarts if self._envoy is not None else 0,
            "pushes": self.pushes,
            "following": sorted(str(ref) for ref in self._following),
            "xds": {
                status.short_name: {
                    "state": status.state.value,
                    "sent": status.version_sent,
                    "acked": status.version_acked,
                    "nack": status.last_nack.message if status.last_nack else "",
                }
                for status in (xds.status().values() if xds is not None else ())
            },
            "rejection": self._tracker.rejection,
            "access_log": vars(self._als.counts) if self._als is not None else {},
            "request_stats": vars(self._stats.counts) if self._stats is not None else {},
            "spans": vars(self._traces.counts) if self._traces is not None else {},
        }

    def mirrors(self) -> dict[str, Any] | None:
        return None

    def admin_routes(self) -> dict[str, AdminRoute]:
        return {
            "/config_dump": self._proxied("/config_dump"),
            "/stats/prometheus": self._proxied("/stats/prometheus"),
            "/clusters": self._proxied("/clusters?format=json"),
        }

    # ------------------------------------------------------------ config

    async def _push_loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(DEBOUNCE_S)
            self._wake.clear()
            try:
                self._push()
                await self._follow_referenced()
            except errors.MeshError as e:
                # the last good configuration keeps serving; the next change retries
                log.error("envoy.push_failed", error=str(e))
            except Exception:
                # a bug must not end the loop that serves every later change
                log.exception("envoy.push_crashed")

    def _push(self) -> None:
        """Translate the followers' state and serve it; a translation error is a
        rejection (reported), the last good resources keep serving."""
        ctx, node, xds = self._ctx, self._node, self._xds
        assert ctx is not None and node is not None and xds is not None
        followed = self._followed_revisions(ctx)
        view = self._mesh_view = self._view(ctx)
        try:
            resources = translate(node, view)
        except TranslationError as e:
            log.warning("envoy.translation_rejected", error=str(e))
            self._tracker = self._tracker.rejected(followed, f"translation: {e}")
            # the certificate still rotates with the last good configuration
            resources = self._resources
        else:
            self._resources = resources
            self._tracker = self._tracker.translated(followed)
            self._register_gateway_l4(ctx, view)
        snapshot = XdsResources(
            listeners=resources.listeners,
            routes=resources.routes,
            clusters=resources.clusters,
            endpoints=resources.endpoints,
            secrets=dict(self._secrets),
        )
        try:
            xds.set_resources(snapshot)
        except XdsError as e:
            log.error("envoy.snapshot_refused", error=str(e))
            self._tracker = self._tracker.rejected(followed, f"xDS snapshot: {e}")
        self.pushes += 1
        self._on_xds_status(None)
        if node.on_demand:
            self._serve_vhosts(resources.virtual_hosts, resources.unknown_host)

    # ------------------------------------------------------------ on demand (VHDS)

    def _on_vhosts_wanted(self, type_url: str, names: set[str]) -> None:
        """Envoy asked for virtual hosts we have not answered: follow their
        destinations, then push (which answers them)."""
        if type_url != VIRTUAL_HOST or self._ctx is None:
            return
        # new names, and names answered absent that Envoy asks for again (a destination
        # published since then is found now)
        new = {n for n in names if not self._is_followed(self._vhds_requested.get(n))}
        if new:
            task = asyncio.create_task(self._resolve_vhosts(new), name="envoy:vhds-resolve")
            self._tasks.append(task)
            task.add_done_callback(self._tasks_done)
        if new != names:
            # a followed destination asked again: answered by the next push, from what
            # its follower knows now
            self._wake.set()

    def _is_followed(self, fqdn: str | None) -> bool:
        """Whether a requested Host's destination is followed (one that is no mesh
        service has nothing to follow); None: never asked."""
        if not fqdn:
            return False
        ref = service_of_host(fqdn)
        return ref is None or ref in self._following

    def _tasks_done(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("envoy.follow_failed", task=task.get_name(), error=str(task.exception()))

    async def _resolve_vhosts(self, names: set[str]) -> None:
        ctx = self._ctx
        assert ctx is not None
        fqdns = {name: vhds_fqdn(name, ctx.settings.namespace) for name in names}
        await self._follow({ref for fqdn in fqdns.values() if (ref := service_of_host(fqdn))})
        # the hosts their routes send to, followed before the answer: the first request
        # must find their clusters' endpoints (503 otherwise)
        await self._follow_referenced()
        # a Host that names nothing known gets the unknown-host answer (`vhds_answer`)
        # until its service appears
        self._vhds_requested.update(fqdns)
        log.info(
            "envoy.vhds_requested",
            hosts=sorted(vhds_host(n) for n in names),
            following=len(self._following),
        )
        self._wake.set()

    def _serve_vhosts(
        self,
        virtual_hosts: Mapping[str, Message],
        unknown_host: route_components_pb2.VirtualHost | None,
    ) -> None:
        """Serve the virtual hosts once Envoy has ACKed the clusters and endpoints of
        this push, so a request resumed by the answer finds its cluster warm."""
        xds = self._xds
        assert xds is not None
        resources, absent = vhds_answer(virtual_hosts, self._vhds_requested, unknown_host)
        if self._vhds_task is not None:
            self._vhds_task.cancel()

        async def serve() -> None:
            try:
                await xds.wait_until(
                    lambda _s: xds.applied(CLUSTER, ENDPOINT), FIRST_CONFIG_TIMEOUT_S
                )
            except TimeoutError as e:
                # a refused or lost CDS/EDS push: the routes still go out (503 NC)
                log.warning("envoy.vhds_clusters_not_applied", error=str(e))
            xds.set_delta_resources(
                VIRTUAL_HOST, resources, absent, opening=[f"{OUTBOUND_HTTP_ROUTE}/"]
            )

        self._vhds_task = asyncio.create_task(serve(), name="envoy:vhds-serve")

    def _register_gateway_l4(self, ctx: DataPlaneContext, view: MeshView) -> None:
        """A gateway's TCP / TLS servers listen on `<--bind>:<server port>`
        (`translate.tcp.add_gateway_l4`): registered with the instance, so sidecars'
        `tls` / `tcp` routes reach them (docs/architecture.md §5.5)."""
        if view.gateway is None or ctx.tcp_listeners_changed is None:
            return
        bind = ctx.settings.bind_host
        listeners = {
            str(server.port): listener_address(bind, server.port)
            for server in view.gateway.servers
            if server.protocol.upper() in L4_GATEWAY_PROTOCOLS
        }
        if listeners != self._l4_registered:
            self._l4_registered = listeners
            ctx.tcp_listeners_changed(listeners)

    def _envoy_exited(self, exit: EnvoyExit) -> None:
        log.warning("envoy.restarting", pid=exit.pid, code=exit.returncode, restarts=exit.restarts)

    def _on_xds_status(self, _status: TypeStatus | None) -> None:
        xds, ctx = self._xds, self._ctx
        if xds is None or ctx is None:
            return
        statuses = xds.status()
        rejected = [t for t in statuses.values() if t.state is ApplyState.REJECTED]
        before = self._tracker
        if rejected:
            # a type Envoy refused: the whole push is rejected, whatever else is pending
            reason = "; ".join(
                f"{t.short_name}: {t.last_nack.message.strip()}" for t in rejected if t.last_nack
            )
            self._tracker = before.rejected(before.pushed, reason)
        elif any(t.state is ApplyState.PENDING for t in statuses.values()):
            return
        elif not xds.connected or any(
            statuses[t].state is ApplyState.NOT_SENT for t in (LISTENER, CLUSTER)
        ):
            return  # Envoy has not taken anything yet
        elif not before.rejection:
            self._tracker = before.acked()
            self._envoy_took_config.set()
        if self._tracker != before:
            ctx.status_changed()

    def _view(self, ctx: DataPlaneContext) -> MeshView:
        policy = ctx.inbound_policy.policy if ctx.inbound_policy is not None else None
        gateway = ctx.gateway.config if ctx.gateway is not None else None
        if ctx.gateway is not None and gateway is None:
            # nothing fetched yet (control plane unreachable): no server bound, as a
            # Gateway resource selecting nothing would give
            s = ctx.settings
            gateway = GatewayConfig(namespace=s.namespace, name=s.service, revision=0)
        discovered: dict[str, str] = {}
        if self._oidc is not None and self._node is not None:
            self._oidc.want(discovery_uris(jwt_authn.selected(policy, self._node.labels)))
            discovered = dict(self._oidc.resolved)
        return mesh_view(
            ctx.destinations.destinations,
            policy,
            gateway,
            self._vips,
            discovered,
            ctx.destinations.mesh_wide.config,
        )

    @staticmethod
    def _followed_revisions(ctx: DataPlaneContext) -> dict[str, int]:
        out = {s.subject: s.revision for s in ctx.destinations.subscription_statuses()}
        for follower in (ctx.gateway, ctx.inbound_policy):
            if follower is not None:
                out.update({s.subject: s.revision for s in follower.statuses()})
        return out

    def _current_secrets(self) -> dict[str, Any]:
        ctx = self._ctx
        assert ctx is not None and ctx.identity is not None
        snap = ctx.identity.current()
        key = snap.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return dict(tls_secrets(snap.chain_pem.decode(), key, "".join(snap.bundle.roots)))

    # ------------------------------------------------------------ telemetry

    async def _start_telemetry(self, ctx: DataPlaneContext, telemetry: SidecarTelemetry) -> None:
        """The access-log service and the OTLP trace receiver Envoy sends to, and the
        publisher of what they record (the Python data plane's recorder and wire
        schema)."""
        assert self._dir is not None
        s = ctx.settings
        converter = AccessLogConverter(
            LocalProxy(
                workload=telemetry.workload,
                service_host=telemetry.service_host,
                namespace=s.namespace,
                service=s.service,
                instance=s.instance,
            ),
            endpoints=self._endpoints_of,
        )
        stats_mode = s.envoy_telemetry == "stats"
        if stats_mode:
            self._stats = StatsIngest(converter, telemetry.recorder)
        self._als = AccessLogServer(
            self._dir / "als.sock",
            # stats mode: Envoy counts the requests, the log gives access records only
            AccessLogIngest(
                converter, telemetry.recorder, spans=not ENVOY_TRACER, metrics=not stats_mode
            ),
        )
        if ENVOY_TRACER:
            self._traces = TraceServer(
                self._dir / "traces.sock",
                SpanIngest(OtlpSpanConverter(converter), telemetry.recorder),
            )
        server: PrivateGrpcServer | None
        for server in (self._als, self._traces):
            if server is None:
                continue
            try:
                await server.start()
            except PrivateSocketError as e:
                raise errors.Unavailable(f"the {server.what} did not start: {e}") from None
        publisher = TelemetryPublisher(
            telemetry.recorder,
            ctx.bus,
            interval=STATS_READ_S,
            collect=self._collect_request_stats if stats_mode else None,
        )
        self._publisher = asyncio.create_task(publisher.run(), name="envoy:telemetry")

    def _endpoints_of(self, fqdn: str) -> EndpointSet | None:
        """The registered endpoints of `fqdn` (the converter names an upstream or a
        TCP caller by them): those Envoy was configured with, else, on demand, the
        registry's index of callers (`_registered`)."""
        found = view_endpoints(self._mesh_view, fqdn)
        if found is None and (ref := service_of_host(fqdn)) is not None:
            found = self._registered.get(ref)
        return found

    # ------------------------------------------------------------ destinations

    async def _follow_every_service(self) -> None:
        """Every service the registry knows now, and every one that appears later."""
        await self._watch_registry()
        await self._list_services()

    async def _watch_registry(self) -> None:
        ctx = self._ctx
        assert ctx is not None
        if self._registry_watched:
            return
        self._registry_watched = True
        bus = ctx.bus
        await bus.subscribe(bus.subjects.endpoints_all, EndpointSet, self._on_any_endpoints)
        # services that appeared while the bus was away are listed again on reconnect
        bus.on_reconnect(self._list_services)

    def _indexes_callers(self) -> bool:
        """On demand, a sidecar with inbound TCP listeners keeps `_registered`."""
        node = self._node
        return node is not None and node.on_demand and bool(node.tcp_inbound)

    def _registered_now(self, endpoint_set: EndpointSet) -> None:
        ref = ServiceRef(endpoint_set.namespace, endpoint_set.service)
        current = self._registered.get(ref)
        if current is None or current.revision < endpoint_set.revision:
            self._registered[ref] = endpoint_set

    def _wants(self, endpoint_set: EndpointSet) -> bool:
        """Is this registered service followed before any request names it? Every one
        by default; on demand, those a workloadSelector ServiceEntry selects from."""
        node = self._node
        return node is None or not node.on_demand or selected_by(self._selecting, endpoint_set)

    async def _follow_selected(self) -> None:
        """On demand: a ServiceEntry with a workloadSelector has the registered
        instances it selects as endpoints (§5.5), so their services are followed from
        when such an entry appears (listed, then from the registry's endpoint events)."""
        ctx = self._ctx
        assert ctx is not None
        entries = selecting_entries(ctx.settings.namespace, ctx.destinations.mesh_wide.config)
        if entries == self._selecting:
            return
        self._selecting = entries
        if entries:
            await self._watch_registry()
            await self._list_services()

    async def _list_services(self) -> None:
        ctx = self._ctx
        assert ctx is not None
        bus = ctx.bus
        try:
            reply = await bus.request(
                bus.subjects.registry_get, EndpointsGetRequest(), EndpointsGetReply
            )
        except errors.MeshError as e:
            log.warning("envoy.registry_list_failed", error=str(e))
            return
        if self._indexes_callers():
            for eps in reply.sets:
                self._registered_now(eps)
        before = len(self._following)
        await self._follow(
            ServiceRef(eps.namespace, eps.service) for eps in reply.sets if self._wants(eps)
        )
        if len(self._following) != before:
            self._wake.set()

    async def _on_any_endpoints(self, eps: EndpointSet, _subject: str) -> None:
        if self._indexes_callers():
            self._registered_now(eps)
        ref = ServiceRef(eps.namespace, eps.service)
        if ref not in self._following and self._wants(eps):
            await self._follow([ref])
            self._wake.set()

    async def _follow_referenced(self) -> None:
        """Hosts the routes name (a VirtualService sending to another service, a
        Kubernetes Service's instances) and the services of the TCP relays that are
        not followed yet: followed, and theirs in turn (up to `REFERENCE_DEPTH`
        hops), then pushed again."""
        ctx, node = self._ctx, self._node
        assert ctx is not None and node is not None
        if node.on_demand:
            await self._follow_selected()
        before = len(self._following)
        for _ in range(REFERENCE_DEPTH):
            try:
                hosts = referenced_hosts(node, self._view(ctx))
            except TranslationError:
                break
            refs = {ref for host in hosts if (ref := service_of_host(host)) is not None}
            # TCP relays ask for nothing (no Host): on demand, their services are
            # followed from the start (one not published yet is tried again on the
            # next push)
            refs |= {upstream.service for upstream in node.tcp_upstreams}
            found = len(self._following)
            await self._follow(refs - self._following)
            if len(self._following) == found:
                break
        if len(self._following) != before:  # else a push would only retry, in a loop
            self._wake.set()

    async def _follow(self, refs: Iterable[ServiceRef]) -> None:
        """Fetch and subscribe to each destination, a bounded number at a time (a mesh
        of 1,000 services is 2,000 requests at start)."""
        ctx = self._ctx
        assert ctx is not None
        new = sorted(set(refs) - self._following)
        self._following.update(new)
        for i in range(0, len(new), FOLLOW_CONCURRENCY):
            batch = new[i : i + FOLLOW_CONCURRENCY]
            results = await asyncio.gather(
                *(ctx.destinations.get(ref) for ref in batch), return_exceptions=True
            )
            for ref, result in zip(batch, results, strict=True):
                if isinstance(result, errors.MeshError):
                    # nothing published for it yet: its endpoint event brings it later
                    self._following.discard(ref)
                    log.info(
                        "envoy.destination_unavailable", destination=str(ref), error=str(result)
                    )
                elif isinstance(result, BaseException):
                    raise result
                elif ctx.capture is not None and ctx.capture.vips is not None:
                    # for the capture listener's TCP chains (a lookup per new service)
                    address = await ctx.capture.vips.address_of(ref)
                    if address:
                        self._vips[ref.fqdn] = address

    # ------------------------------------------------------------ Envoy's admin

    async def _until_listening(self, ports: EnvoyPorts) -> None:
        """Envoy has taken the first configuration and binds its listeners."""
        ctx = self._ctx
        assert ctx is not None and self._xds is not None
        s = ctx.settings
        wanted = [(s.bind_host, ports.gateway)] if s.gateway else [(s.bind_host, ports.inbound)]
        if not s.gateway:
            wanted.append(("127.0.0.1", ports.outbound))
        if ports.capture:
            wanted.append((ports.capture_host, ports.capture))
        try:
            await asyncio.wait_for(self._first_config(wanted), FIRST_CONFIG_TIMEOUT_S)
        except TimeoutError:
            raise errors.Unavailable(
                f"Envoy did not take its first configuration within {FIRST_CONFIG_TIMEOUT_S}s"
            ) from None

    async def _first_config(self, wanted: list[tuple[str, int]]) -> None:
        while not self._envoy_took_config.is_set():
            rejection = self._tracker.rejection
            if rejection:
                self._raise_ports_in_use(rejection)
                raise errors.Unavailable(f"Envoy refused its first configuration: {rejection}")
            await asyncio.sleep(LISTEN_POLL_S)
        for host, port in wanted:
            while not await accepts(host, port):
                await asyncio.sleep(LISTEN_POLL_S)

    def _raise_ports_in_use(self, rejection: str) -> None:
        """A listener Envoy could not bind because its port is taken: said as the
        Python data plane and `meshctl` say it (flag, port, holder)."""
        taken = ports_in_use(rejection)
        if not taken or self._ports is None:
            return
        ports = self._ports
        said = [
            f"{port_flag(ports, port)} {port} is in use{describe_holder(port)}" for _, port in taken
        ]
        raise errors.Unavailable("; ".join(said))

    async def _collect_request_stats(self) -> None:
        """The publisher's `collect`: a read of Envoy's request counters just before
        each flush, once Envoy listens and until the sidecar stops."""
        if self._stats_reading:
            await self._read_request_stats()

    async def _read_request_stats(self, *, baseline: bool = False) -> None:
        """One read of Envoy's request counters into the recorder (`StatsIngest`); with
        `baseline`, only remembered (what an adopted Envoy counted was reported)."""
        assert self._stats is not None
        async with self._stats_lock:
            await self._read_request_stats_locked(baseline)

    async def _read_request_stats_locked(self, baseline: bool) -> None:
        assert self._stats is not None
        try:
            text = await self._admin("GET", ADMIN_STATS_PATH)
        except (aiohttp.ClientError, TimeoutError) as e:
            # Envoy restarting: its counters start again from zero, read next time
            log.warning("envoy.request_stats_unavailable", error=type(e).__name__)
            return
        try:
            if baseline:
                self._stats.deltas.update(parse_request_stats(text))
            else:
                self._stats.on_stats(text)
        except StatsError as e:
            log.error("envoy.request_stats_unreadable", error=str(e))
        except Exception as e:  # a bug: the next read tries again; its type, no values
            log.error("envoy.request_stats_failed", error=type(e).__name__)

    async def _adopted_destinations(self) -> set[ServiceRef]:
        """The mesh services an adopted Envoy has clusters for (none if its admin does
        not answer: they are then asked for again on demand)."""
        try:
            text = await self._admin("GET", "/clusters?format=json")
            names = [c.get("name", "") for c in json.loads(text).get("cluster_statuses", [])]
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as e:
            log.warning("envoy.adopted_clusters_unavailable", error=type(e).__name__)
            return set()
        return destinations_of_clusters(names)

    async def _active_requests(self) -> int:
        text = await self._admin("GET", "/stats?filter=downstream_rq_active$")
        total = 0
        for line in text.splitlines():
            _name, _, value = line.partition(": ")
            with contextlib.suppress(ValueError):
                total += int(value)
        return total

    async def _admin(self, method: str, path: str) -> str:
        assert self._ports is not None
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S)
            )
        url = f"http://127.0.0.1:{self._ports.admin}{path}"
        async with self._session.request(method, url) as response:
            return await response.text()

    def _proxied(self, path: str) -> AdminRoute:
        async def handler(_request: web.Request) -> web.StreamResponse:
            if self._ports is None or self._envoy is None:
                return web.json_response({"error": "Envoy is not running yet"}, status=503)
            try:
                body = await self._admin("GET", path)
            except (aiohttp.ClientError, TimeoutError) as e:
                return web.json_response(
                    {"error": f"Envoy's admin did not answer: {type(e).__name__}"}, status=502
                )
            if path == "/stats/prometheus":
                assert self._ctx is not None
                # Envoy's series, then ours (istio_* from the access logs, config trust)
                ours = generate_latest(self._ctx.stats.registry).decode()
                ours += capture_detection_timeouts(body)
                return web.Response(text=body + ours, content_type="text/plain")
            if path == "/config_dump":
                # Envoy's dump, and what the sidecar knows about its Envoy
                with contextlib.suppress(ValueError):
                    return web.json_response({**json.loads(body), "dataplane": self.info()})
            return web.Response(text=body, content_type="application/json")

        return handler
