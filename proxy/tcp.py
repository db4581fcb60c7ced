"""The sidecar's L4 TCP relays: raw bytes, load-balanced per connection.

Inbound: one listener per TCP port the app declares (`--tcp-port 6379`), on the
sidecar's bind host and an OS-chosen port, relaying to 127.0.0.1:6379. The instance
registers where these listeners are (`Instance.tcp_listeners`: app port -> host:port).

Outbound: for each `--tcp-upstream SERVICE[.NAMESPACE]:PORT=LOCALPORT`, a listener on
127.0.0.1:LOCALPORT relaying each accepted connection to the listener that one endpoint
of SERVICE registered for PORT, chosen by the TCP cluster of (service, subset, port)
(`Destination.tcp_cluster`, `ServiceClusterEndpoints`: the DestinationRule's load
balancer, outlier detection and `tcp.maxConnections`, architecture §5.1 "The upstream
path"); when a connect fails, another endpoint is tried, up to `CONNECT_ATTEMPTS` in
all, else the client is reset. The endpoints come from the `DestinationCache`, which
follows them live.

A relayed connection is two protocols writing into each other: full duplex; a FIN from
one side is passed on as a FIN to the other (half-close) and the sockets close once
both directions are finished; reading from one side pauses while the other side's
write buffer is over `HIGH_WATER`; an error on either side resets both.

Endpoint addresses (`tcp_endpoints`, `relay_address`) and upstream parsing
(`parse_tcp_upstream`) are pure, endpoint choice is the cluster's; `TcpRelays` does
the I/O.

With telemetry, each relayed connection is counted in Istio's `istio_tcp_*` metrics
(reporter "destination" on inbound relays, "source" on outbound ones): opened once
linked, bytes as they flow (`report_telemetry`, called before each telemetry flush)
and closed at the end; a connection no upstream accepted counts as opened and closed
with flags UF. An inbound relay names an mTLS caller's workload, app and version from
the registry (`_caller`, `caller_workload`), as TCP carries no peer metadata header.

Inbound relays authorize every connection before connecting to the app
(`Authorizer.decide_connection`, the workload's AuthorizationPolicies with Istio's
rules for TCP): a denied connection is reset at once, nothing it sent reaches the
app, and it is counted (`meshwork_proxy_tcp_connections_denied_total`, and in the
`istio_tcp_*` metrics as opened and closed with flags RBAC) and logged with the
deciding policy. Dry-run policies only add a shadow result, logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import re
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import cast

from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh import errors
from mesh.compiled import GatewayConfig, L4Route
from mesh.hosts import ServiceRef, canonical_host, service_of_host
from mesh.identity import requested_server_name
from mesh.logs import get_logger
from mesh.messages import Endpoint
from proxy import cluster_send
from proxy.clusters import Cluster
from proxy.destinations import Destination, DestinationCache, tcp_endpoints
from proxy.listener import HANDSHAKE_TIMEOUT_S, MeshListener
from proxy.mtls import MeshTls
from proxy.peer import peer_of
from proxy.policy import Authorizer, ConnectionFacts, ShadowDecision
from proxy.response_flags import ResponseFlag
from proxy.routing import (
    Balancer,
    ConnectionAttrs,
    HashContext,
    NoDestinationError,
    TcpTarget,
    client_hello_sni,
    pick_l4_destination,
    route_target,
    select_l4_route,
    tcp_target,
)
from proxy.routing.sni import MORE
from proxy.telemetry import SidecarTelemetry, TcpRecord, Workload, caller_workload
from proxy.tls_pipe import TlsPipe

log = get_logger("proxy.tcp")

APP_HOST = "127.0.0.1"
CONNECT_ATTEMPTS = 3
CONNECT_TIMEOUT_S = 5.0
# how long an inbound relay waits for the registry to name a caller (telemetry only)
CALLER_LOOKUP_S = 1.0
# how long a TLS PASSTHROUGH gateway server waits for the ClientHello (Envoy's
# tls_inspector waits up to its listener filter timeout, 15 s)
TLS_INSPECT_TIMEOUT_S = 15.0
# the gateway server protocols the relays serve (HTTP ones are the gateway listener's)
L4_GATEWAY_PROTOCOLS = ("TCP", "TLS")
# Per-socket write buffer above which the other side stops being read.
HIGH_WATER = 256 * 1024
# Envoy's flag for a connection denied by RBAC (authorization policy)
DENIED_FLAG = ResponseFlag.RBAC_ACCESS_DENIED
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST

_UPSTREAM_FORM = "SERVICE[.NAMESPACE]:PORT=LOCALPORT"
_HOST_CHARS = re.compile(r"[A-Za-z0-9.-]+")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


# ---------------------------------------------------------------- pure core


@dataclass(frozen=True, slots=True)
class TcpUpstream:
    """`--tcp-upstream`: relay 127.0.0.1:`local_port` to `service`'s TCP port `port`."""

    service: ServiceRef
    port: int
    local_port: int  # 0 = OS-chosen (tests); `parse_tcp_upstream` requires a real port

    @property
    def listener(self) -> str:
        """The listener's name in stats and `TcpRelays.ports`."""
        return f"tcp-outbound:{self.service.name}.{self.service.namespace}:{self.port}"


def _parse_port(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError(f"{what} must be a port in 1..65535, got {text!r}")
    return int(text)


def parse_tcp_upstream(text: str, default_namespace: str) -> TcpUpstream:
    """`redis:6379=16379`, `redis.cache:6379=16379` (or the service's FQDN) -> TcpUpstream.

    A service without a namespace is in `default_namespace` (the sidecar's own). The
    ValueError says what is wrong with the spec; the caller names the flag and the spec
    (`meshctl sidecar` prints "--tcp-upstream 'redis:0=1': PORT must be ...").
    """
    spec = text.strip()
    target, sep, local = spec.partition("=")
    if not sep or not target:
        raise ValueError(f"expected {_UPSTREAM_FORM}")
    host, sep, port = target.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected {_UPSTREAM_FORM} (missing :PORT)")
    if not _HOST_CHARS.fullmatch(host):
        raise ValueError(f"{host!r} is not a service name")
    ref = service_of_host(canonical_host(host, default_namespace))
    if ref is None or not (_DNS_LABEL.fullmatch(ref.name) and _DNS_LABEL.fullmatch(ref.namespace)):
        raise ValueError(
            f"{host!r} is not a mesh service "
            "(SERVICE, SERVICE.NAMESPACE or SERVICE.NAMESPACE.svc.cluster.local)"
        )
    return TcpUpstream(
        service=ref, port=_parse_port(port, "PORT"), local_port=_parse_port(local, "LOCALPORT")
    )


def relay_address(endpoint: Endpoint, port: int) -> tuple[str, int]:
    """Host and port of the TCP listener `endpoint` registered for `port`.

    Raises ValueError when there is none or it is not host:port (a bad registration
    must not take the relay down: the caller tries another endpoint).
    """
    text = endpoint.tcp_listeners.get(str(port), "")
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{endpoint.instance}: bad TCP listener {text!r} for port {port}")
    number = int(port_text)
    if not 0 < number < 65536:
        raise ValueError(f"{endpoint.instance}: bad TCP listener {text!r} for port {port}")
    return host, number


def listener_address(host: str, port: int) -> str:
    """host:port as registered, bracketing IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ServiceClusterEndpoints:
    """A mesh service's endpoints for one relayed connection (`cluster_send.connect`):
    the TCP cluster of (service, subset, port) (`Destination.tcp_cluster`), looked up
    again per attempt so that endpoints changed while a connect was pending are seen;
    its balancer chooses (ejected endpoints skipped, tried ones avoided while others
    remain; a consistent hash keys on the client's IP, as Envoy's tcp_proxy
    `hash_policy: source_ip` that Istio sets for `useSourceIp`), connect outcomes go to
    its outlier detector (`cluster_send.ClusterEndpoints`)."""

    __slots__ = ("_dest", "_hash", "_port", "_rand", "_subset", "cluster")

    def __init__(
        self,
        dest: Destination,
        cluster: Cluster,
        subset: str,
        port: int,
        rand: random.Random,
        source_ip: str,
    ) -> None:
        self._dest = dest
        self._subset = subset
        self._port = port
        self._rand = rand
        self._hash = HashContext(source_ip=source_ip)
        self.cluster = cluster

    def choose(self, tried: frozenset[str]) -> Endpoint | None:
        cluster = self._dest.tcp_cluster(self._subset, self._rand, self._port) or self.cluster
        self.cluster = cluster
        return cluster.choose(self._hash, tried, time.monotonic())

    def connected(self, endpoint: Endpoint, ok: bool) -> None:
        cluster_send.ClusterEndpoints(self.cluster).connected(endpoint, ok)


def _relay_ended(cluster: Cluster, balancer: Balancer, instance: str) -> None:
    """A relayed connection to `instance` of `cluster` finished: its breaker slot
    (`tcp.maxConnections`) and its least-request count are given back."""
    cluster.breaker.release_connection()
    balancer.on_request_end(instance)


# ---------------------------------------------------------------- stats


@dataclass(frozen=True, slots=True)
class ListenerCounters:
    """The metric children of one listener, bound once so the data path only increments."""

    opened: Counter
    closed: Counter
    sent: Counter
    received: Counter
    connect_failures: Counter
    active: Gauge
    denied: Counter  # by policy: `.labels(policy)` on the (rare) denial


class TcpStats:
    """Per-listener TCP counters, on the proxy's registry (one `TcpStats` per registry).

    "sent" is downstream -> upstream (what the accepted connection wrote), "received"
    upstream -> downstream.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["listener"]
        self.opened = Counter(
            "meshwork_proxy_tcp_connections_opened_total",
            "TCP connections accepted, by listener",
            labels,
            registry=registry,
        )
        self.closed = Counter(
            "meshwork_proxy_tcp_connections_closed_total",
            "TCP connections finished, by listener",
            labels,
            registry=registry,
        )
        self.sent = Counter(
            "meshwork_proxy_tcp_sent_bytes_total",
            "Bytes relayed from downstream to upstream, by listener",
            labels,
            registry=registry,
        )
        self.received = Counter(
            "meshwork_proxy_tcp_received_bytes_total",
            "Bytes relayed from upstream to downstream, by listener",
            labels,
            registry=registry,
        )
        self.connect_failures = Counter(
            "meshwork_proxy_tcp_upstream_connect_failures_total",
            "Upstream connects that failed (refused, unreachable, timed out), by listener",
            labels,
            registry=registry,
        )
        self.active = Gauge(
            "meshwork_proxy_tcp_active_connections",
            "TCP connections being relayed, by listener",
            labels,
            registry=registry,
        )
        self.denied = Counter(
            "meshwork_proxy_tcp_connections_denied_total",
            "Inbound TCP connections denied by authorization (reset, flag RBAC), by "
            'listener and deciding policy ("none": no ALLOW policy matched)',
            ["listener", "policy"],
            registry=registry,
        )

    def listener(self, name: str) -> ListenerCounters:
        return ListenerCounters(
            opened=self.opened.labels(name),
            closed=self.closed.labels(name),
            sent=self.sent.labels(name),
            received=self.received.labels(name),
            connect_failures=self.connect_failures.labels(name),
            active=self.active.labels(name),
            denied=self.denied,
        )


# ---------------------------------------------------------------- relaying


def _ssl_object(side: _Side) -> ssl.SSLObject | None:
    """The TLS object of a side's connection (None for plaintext)."""
    return side.tls.ssl_object if side.tls is not None else None


def _local_ip(side: _Side) -> str:
    """The address the client connected to ("" when unknown): `destination.ip`."""
    t = side.transport
    sockname = t.get_extra_info("sockname") if t is not None else None
    return str(sockname[0]) if isinstance(sockname, tuple) and sockname else ""


def _peer_ip(side: _Side) -> str:
    """The caller's address as the socket reports it ("" when unknown)."""
    t = side.transport
    peername = t.get_extra_info("peername") if t is not None else None
    return str(peername[0]) if isinstance(peername, tuple) and peername else ""


class _Side(asyncio.Protocol):
    """One socket of a relayed connection: what it reads is written to its peer.

    Until the two sides are linked (while the upstream connect is pending, or between
    the upstream's `connection_made` and the link), what is read is held, up to
    `HIGH_WATER`, and reading pauses beyond that. Pausing in `connection_made` would be
    simpler but uvloop starts reading accepted sockets after that call regardless.

    A side to another sidecar runs mTLS itself (`TlsPipe` on the plain socket, given
    `tls_context`): the app's bytes inside TLS, nothing more, and a FIN as a
    close_notify followed by a TCP FIN, as Envoy's tcp_proxy does (architecture §5.1,
    "TCP between sidecars"). An accepted TLS side joins its connection once the
    handshake is done (authorization needs the peer's certificate); a connecting one
    resolves `handshaken`.
    """

    def __init__(
        self,
        conn: _Connection,
        counted: Counter,
        tls_context: ssl.SSLContext | None = None,
        *,
        server_side: bool = False,
        on_handshake: Callable[[bool], None] | None = None,
    ) -> None:
        self.conn = conn
        self.counted = counted  # bytes read on this side
        self.relayed = 0  # bytes read on this side and passed to the peer (telemetry)
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.held: list[bytes] = []  # read before the link
        self.held_size = 0
        self.eof_in = False  # this socket sent us a FIN
        self.eof_out = False  # we sent this socket a FIN
        self.closed = False
        self.tls = (
            TlsPipe(tls_context, server_side=server_side) if tls_context is not None else None
        )
        self.handshaken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._on_handshake = on_handshake  # told the outcome (the listener counts it)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        if self.tls is None:
            self.conn.side_made(self)
            return
        self._handshake_timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT_S, self._handshake_failed, TimeoutError("TLS handshake timed out")
        )
        if not self.tls.ssl_object.server_side:
            self.tls.start()
            self._flush()

    def data_received(self, data: bytes) -> None:
        tls = self.tls
        if tls is None:
            self._received(data)
            return
        if self.handshaken.done() and not tls.handshake_done:
            return  # a failed handshake: the socket is being closed
        try:
            plain = tls.receive(data)
        except ssl.SSLError as e:
            self._flush()  # the alert, if any
            if not tls.handshake_done:
                self._handshake_failed(e)
            else:
                log.debug("tcp.tls_error", listener=self.conn.name, error=str(e))
                self.conn.reset()
            return
        self._flush()
        if tls.handshake_done and not self.handshaken.done():
            self._handshake_succeeded()
        if plain:
            self._received(plain)
        if tls.peer_finished and not self.eof_in:
            self._eof()

    def _handshake_succeeded(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.handshaken.set_result(None)
        if self._on_handshake is not None:
            self._on_handshake(True)
        if self.tls is not None and self.tls.ssl_object.server_side:
            self.conn.side_made(self)

    def _handshake_failed(self, error: Exception) -> None:
        if self.handshaken.done():
            return
        self.handshaken.set_exception(error)
        self.handshaken.exception()  # retrieved: a connecting side awaits it, or nobody
        if self._on_handshake is not None:
            self._on_handshake(False)
        if self.tls is not None and self.tls.ssl_object.server_side:
            log.debug("tcp.handshake_failed", listener=self.conn.name, error=str(error))
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()

    def _flush(self) -> None:
        t, tls = self.transport, self.tls
        if t is None or tls is None or t.is_closing():
            return
        out = tls.outgoing()
        if out:
            t.write(out)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.tls is not None:
            self.tls.send(data)
            self._flush()
        else:
            self.transport.write(data)

    def _received(self, data: bytes) -> None:
        if self.peer is None:
            self.held.append(data)
            self.held_size += len(data)
            if self.held_size >= HIGH_WATER:
                self.pause_reading()
            self.conn.held_more.set()
            return
        self._forward(data)

    def eof_received(self) -> bool | None:
        if self.tls is not None:
            if not self.tls.handshake_done:
                self._handshake_failed(ConnectionResetError("closed during the TLS handshake"))
                return None
            if not self.tls.peer_finished:
                # the TLS stream ended without a close_notify: truncated, not finished
                self.conn.reset()
                return None
            return True  # the close_notify was the FIN: the other direction goes on
        self._eof()
        # keep the socket open: the other direction may still be sending
        return True

    def _eof(self) -> None:
        self.eof_in = True
        self.conn.held_more.set()  # whoever waits for bytes: no more are coming
        if self.peer is not None:
            self.peer.send_eof()
            self._close_if_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.tls is not None and not self.handshaken.done():
            self._handshake_failed(exc or ConnectionResetError("closed during the TLS handshake"))
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self.tls is not None and self.tls.ssl_object.server_side and not self.tls.handshake_done:
            return  # never joined its connection: nothing was counted or relayed
        if self.peer is not None:
            self.peer.peer_lost(exc)
        self.conn.side_lost(self)

    def linked(self) -> None:
        """Both sides know their peer: pass on what was held, then relay as it comes."""
        self.resume_reading()  # first: the flush below may pause it again (flow control)
        held, self.held, self.held_size = self.held, [], 0
        if held:
            self._forward(b"".join(held))
        if self.eof_in and self.peer is not None:
            self.peer.send_eof()
            self._close_if_done()

    def _forward(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None or peer.transport.is_closing():
            return  # the peer failed: this side is being reset too
        peer.write(data)
        self.counted.inc(len(data))
        self.relayed += len(data)

    # flow control: our write buffer is what the peer's reads fill
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    def pause_reading(self) -> None:
        # After a FIN the selector transport would re-arm its reader on resume and
        # report the FIN again: leave a finished direction alone.
        t = self.transport
        if self.eof_in or t is None or t.is_closing() or not t.is_reading():
            return
        t.pause_reading()

    def resume_reading(self) -> None:
        t = self.transport
        if self.eof_in or t is None or t.is_closing() or t.is_reading():
            return
        t.resume_reading()

    def send_eof(self) -> None:
        t = self.transport
        if self.eof_out or t is None or t.is_closing():
            return
        self.eof_out = True
        if self.tls is not None:
            # close_notify, then the TCP FIN (Envoy's TLS socket does both)
            self.tls.finish()
            self._flush()
            t.write_eof()
            self._close_if_done()
        elif t.can_write_eof():
            t.write_eof()
            self._close_if_done()
        else:
            t.close()

    def peer_lost(self, exc: Exception | None) -> None:
        """The other socket is gone: flush and close after a clean end, reset after an error."""
        t = self.transport
        if t is None or t.is_closing():
            return
        if exc is None:
            t.close()
        else:
            self.reset()

    def reset(self) -> None:
        """Abort with an RST rather than a FIN: a cut stream must not look finished to the
        other end (a truncated upload followed by a FIN reads as a complete one)."""
        t = self.transport
        if t is None or self.closed:
            return
        sock = t.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        t.abort()

    def _close_if_done(self) -> None:
        if self.eof_in and self.eof_out and self.transport is not None:
            self.transport.close()


Opener = Callable[["_Connection"], Awaitable[bool]]


class _Connection:
    """One accepted connection and the upstream connection opened for it."""

    def __init__(
        self,
        relays: TcpRelays,
        name: str,
        counters: ListenerCounters,
        opener: Opener,
        tls_context: ssl.SSLContext | None = None,
        on_handshake: Callable[[bool], None] | None = None,
    ) -> None:
        self.relays = relays
        self.name = name
        self.counters = counters
        self.opener = opener
        # `tls_context`: an mTLS client (another sidecar), handshake run by the side
        self.downstream = _Side(
            self, counters.sent, tls_context, server_side=True, on_handshake=on_handshake
        )
        self.upstream: _Side | None = None
        self.connecting = False
        self.finished = False
        self.telemetry: TcpRecord | None = None  # set once the connect is decided
        self.telemetry_opened = False
        self.reported = (0, 0)  # bytes already reported: downstream->, upstream->
        # set when the downstream sent more before the link (or its FIN): for an
        # opener that routes on the first bytes (SNI)
        self.held_more = asyncio.Event()
        # what the opener holds for this connection's life (a cluster's breaker slot)
        self.on_finished: Callable[[], None] | None = None

    def unreported_bytes(self) -> tuple[int, int]:
        """(request direction, response direction) bytes relayed since last asked."""
        up = self.downstream.relayed
        down = self.upstream.relayed if self.upstream is not None else 0
        last_up, last_down = self.reported
        self.reported = (up, down)
        return up - last_up, down - last_down

    def side_made(self, side: _Side) -> None:
        if side is self.downstream:
            self.counters.opened.inc()
            self.counters.active.inc()
            self.connecting = True
            self.relays._accepted(self)

    def link(self, upstream: _Side) -> None:
        self.upstream = upstream
        upstream.peer, self.downstream.peer = self.downstream, upstream
        self.downstream.linked()
        upstream.linked()

    def connect_done(self, linked: bool) -> None:
        self.connecting = False
        if not linked:
            # an RST: the client must not take the connection for one that was served
            self.downstream.reset()
        self._finish_if_done()

    def side_lost(self, side: _Side) -> None:
        if side is self.downstream and self.connecting:
            self.relays._cancel_connect(self)
        self._finish_if_done()

    def reset(self) -> None:
        self.downstream.reset()
        if self.upstream is not None:
            self.upstream.reset()

    def _finish_if_done(self) -> None:
        if self.finished or self.connecting or not self.downstream.closed:
            return
        if self.upstream is not None and not self.upstream.closed:
            return
        self.finished = True
        if self.on_finished is not None:
            self.on_finished()
        self.counters.closed.inc()
        self.counters.active.dec()
        self.relays._finished(self)
        self.relays._telemetry_closed(self)


class TcpRelays:
    """The sidecar's TCP listeners (inbound and outbound) and their relayed connections.

    `start_inbound` / `start_outbound` add listeners (on failure, those already started
    stay until `close()`); `close()` stops accepting and resets what is left, after the
    sidecar has waited for `active_connections()` to drop during its drain.
    """

    def __init__(
        self,
        cache: DestinationCache,
        stats_registry: CollectorRegistry,
        rand: random.Random | None = None,
        *,
        app_host: str = APP_HOST,
        telemetry: SidecarTelemetry | None = None,
        tls: MeshTls | None = None,
        inbound_context: Callable[[], ssl.SSLContext | None] | None = None,
        inbound_mode: Callable[[int], str] | None = None,
        authorizer: Callable[[], Authorizer] | None = None,
        count_dry_run: Callable[[str, ShadowDecision], None] | None = None,
        source_labels: Mapping[str, str] | None = None,
        source_namespace: str = "",
    ) -> None:
        self.cache = cache
        # this workload, as VirtualService `tcp` matches (`sourceLabels`, ...) see it
        self.source_labels: Mapping[str, str] = dict(source_labels or {})
        self.source_namespace = source_namespace
        # mTLS: outbound relays connect with the workload certificate and check the
        # endpoint's identity; inbound listeners accept per PeerAuthentication
        self.tls = tls
        self.inbound_context = inbound_context
        self.inbound_mode = inbound_mode
        # the workload's current authorizer (swapped on each policy revision); None:
        # no inbound policy is followed (an outbound-only relay set, tests)
        self.authorizer = authorizer
        self.count_dry_run = count_dry_run
        self.telemetry = telemetry
        self.stats = TcpStats(stats_registry)
        self.rand = rand or random.Random()
        self.app_host = app_host
        self.ports: dict[str, int] = {}  # listener name -> bound port
        self._servers: list[asyncio.Server | MeshListener] = []
        self._connections: set[_Connection] = set()
        self._connect_tasks: dict[_Connection, asyncio.Task[bool]] = {}
        # gateway mode: the config in force and a listener per TCP/TLS server port
        self._gateway: GatewayConfig | None = None
        self._gateway_listeners: dict[tuple[int, str], asyncio.Server] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------ listeners

    async def start_inbound(self, bind_host: str, app_ports: Sequence[int]) -> dict[str, str]:
        """A listener per app TCP port; returns the `tcp_listeners` to register
        (app port as a string -> host:port of its listener)."""
        listeners: dict[str, str] = {}
        for app_port in dict.fromkeys(app_ports):
            if not 0 < app_port < 65536:
                raise ValueError(f"TCP port must be in 1..65535, got {app_port}")
            opener = partial(self._open_app, app_port)
            bound = await self._listen(
                f"tcp-inbound:{app_port}", bind_host, 0, opener, app_port=app_port
            )
            listeners[str(app_port)] = listener_address(bind_host, bound)
        return listeners

    async def start_outbound(self, upstreams: Sequence[TcpUpstream]) -> None:
        """A listener on 127.0.0.1:local_port per upstream."""
        for upstream in upstreams:
            opener = partial(self._open_service, upstream)
            await self._listen(upstream.listener, "127.0.0.1", upstream.local_port, opener)

    async def sync_gateway(self, bind_host: str, config: GatewayConfig | None) -> None:
        """Gateway mode: serve `config`'s TCP and TLS (PASSTHROUGH) servers, each on
        its port: listeners for new servers are opened, those of removed ones closed
        (their open connections stay until they end). A port that cannot be bound is
        logged and tried again on the next change."""
        self._gateway = config
        wanted = {
            (server.port, server.protocol)
            for server in (config.servers if config is not None else ())
            if server.protocol in L4_GATEWAY_PROTOCOLS
        }
        for key in [k for k in self._gateway_listeners if k not in wanted]:
            closing = self._gateway_listeners.pop(key)
            closing.close()
            self._servers.remove(closing)
            log.info("tcp.gateway_listener_closed", port=key[0], protocol=key[1])
        for port, protocol in sorted(wanted - self._gateway_listeners.keys()):
            name = f"gateway-{protocol.lower()}:{port}"
            opener = partial(self._open_gateway, port, protocol)
            try:
                await self._listen(name, bind_host, port, opener)
            except OSError as e:
                log.error("tcp.gateway_listen_failed", port=port, protocol=protocol, error=str(e))
                continue
            opened = self._servers[-1]
            assert isinstance(opened, asyncio.Server)
            self._gateway_listeners[(port, protocol)] = opened

    def gateway_listeners(self, bind_host: str) -> dict[str, str]:
        """The gateway's open TCP / TLS server listeners: server port (as a string) ->
        host:port, as registered (`Instance.tcp_listeners`)."""
        return {str(port): listener_address(bind_host, port) for port, _ in self._gateway_listeners}

    async def _listen(
        self, name: str, host: str, port: int, opener: Opener, *, app_port: int = 0
    ) -> int:
        counters = self.stats.listener(name)

        def accept() -> asyncio.Protocol:
            return _Connection(self, name, counters, opener).downstream

        def accept_tls(
            context: ssl.SSLContext, on_handshake: Callable[[bool], None]
        ) -> asyncio.Protocol:
            return _Connection(self, name, counters, opener, context, on_handshake).downstream

        if app_port and self.inbound_mode is not None:
            mode, context = self.inbound_mode, self.inbound_context or (lambda: None)
            listener = MeshListener(
                accept, context, lambda: mode(app_port), name=name, tls_protocol_factory=accept_tls
            )
            bound = await listener.start(host, port)
            self._servers.append(listener)
        else:
            server = await asyncio.get_running_loop().create_server(
                accept, host, port, backlog=1024
            )
            self._servers.append(server)
            bound = int(server.sockets[0].getsockname()[1])
        self.ports[name] = bound
        log.info("tcp.listening", listener=name, address=listener_address(host, bound))
        return bound

    # ------------------------------------------------------------ captured connections

    async def adopt(self, sock: socket.socket, name: str, opener: Opener) -> None:
        """Relay an already accepted socket (a captured connection,
        `proxy.intercept.capture`) with `opener` choosing its upstream."""
        counters = self.stats.listener(name)
        await asyncio.get_running_loop().connect_accepted_socket(
            lambda: _Connection(self, name, counters, opener).downstream, sock
        )

    def service_opener(self, upstream: TcpUpstream) -> Opener:
        """Connects to one endpoint of `upstream.service` that serves `upstream.port`."""
        return partial(self._open_service, upstream)

    def address_opener(self, host: str, port: int, identity: str = "") -> Opener:
        """Connects to host:port: mTLS requiring `identity` when given (a mesh
        instance's TCP listener), else plaintext (a passthrough)."""

        async def opener(conn: _Connection) -> bool:
            return await self._open(conn, host, port, f"{host}:{port}", identity)

        return opener

    # ------------------------------------------------------------ connections

    def active_connections(self) -> int:
        return len(self._connections)

    def _accepted(self, conn: _Connection) -> None:
        self._connections.add(conn)
        self._idle.clear()
        task = asyncio.create_task(self._connect(conn), name=f"tcp:connect:{conn.name}")
        self._connect_tasks[conn] = task
        # a callback rather than a `finally`: it also runs for a task cancelled before it started
        task.add_done_callback(partial(self._connect_ended, conn))

    def _cancel_connect(self, conn: _Connection) -> None:
        task = self._connect_tasks.get(conn)
        if task is not None:
            task.cancel()

    def _connect_ended(self, conn: _Connection, task: asyncio.Task[bool]) -> None:
        self._connect_tasks.pop(conn, None)
        conn.connect_done(not task.cancelled() and task.result())

    def _finished(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if not self._connections:
            self._idle.set()

    async def _connect(self, conn: _Connection) -> bool:
        try:
            return await conn.opener(conn)
        except Exception as e:
            log.exception("tcp.connect_crashed", listener=conn.name, error=str(e))
            return False

    async def _open_app(self, app_port: int, conn: _Connection) -> bool:
        if self._denied(app_port, conn):
            if self.telemetry is not None:
                ssl_object = _ssl_object(conn.downstream)
                caller = await self._caller(conn)
                self._telemetry_decided(
                    conn, self.telemetry.tcp_inbound(ssl_object, DENIED_FLAG, caller)
                )
            return False  # reset, before any byte reached the app
        if self.telemetry is None:
            return await self._open(conn, self.app_host, app_port, "app")
        # before the app is connected: once linked, a short exchange can end (and
        # cancel this task) before a pending lookup would; cached after the first
        caller = await self._caller(conn)
        linked = await self._open(conn, self.app_host, app_port, "app")
        ssl_object = _ssl_object(conn.downstream)
        self._telemetry_decided(
            conn,
            self.telemetry.tcp_inbound(
                ssl_object, "-" if linked else ResponseFlag.UPSTREAM_CONNECTION_FAILURE, caller
            ),
        )
        return linked

    async def _caller(self, conn: _Connection) -> Workload | None:
        """The calling workload of an mTLS connection, for the `istio_tcp_*` source
        labels: the registry's instances of the service named like the caller's
        service account (Meshwork's default) holding its identity. None when
        plaintext, not found, or not known within `CALLER_LOOKUP_S`."""
        peer = peer_of(cast(ssl.SSLObject | None, _ssl_object(conn.downstream)))
        account = peer.principal.rpartition("/sa/")[2]
        if not peer.spiffe_id or not account or not peer.namespace:
            return None
        ref = ServiceRef(peer.namespace, account)
        try:
            async with asyncio.timeout(CALLER_LOOKUP_S):
                dest = await self.cache.get(ref)
        except (errors.MeshError, TimeoutError) as e:
            log.debug("tcp.caller_unknown", listener=conn.name, service=str(ref), error=str(e))
            return None
        endpoints = dest.endpoints.endpoints if dest.endpoints is not None else ()
        return caller_workload(ref, endpoints, peer.spiffe_id, _peer_ip(conn.downstream))

    def _denied(self, app_port: int, conn: _Connection) -> bool:
        """Authorize an inbound connection to `app_port`; True when it must be refused.
        Logs carry the caller's identity and address, never payload bytes."""
        authorizer = self.authorizer() if self.authorizer is not None else None
        if authorizer is None or authorizer.empty:
            return False
        side = conn.downstream
        peer = peer_of(cast(ssl.SSLObject | None, _ssl_object(side)))
        source_ip = _peer_ip(side)
        ssl_object = cast(ssl.SSLObject | None, _ssl_object(side))
        decision = authorizer.decide_connection(
            ConnectionFacts(
                peer.principal,
                peer.namespace,
                source_ip,
                app_port,
                destination_ip=_local_ip(side),
                sni=requested_server_name(ssl_object),
            )
        )
        shadow = decision.shadow
        if shadow is not None:
            if self.count_dry_run is not None:
                self.count_dry_run("tcp", shadow)
            log.info(
                "tcp.authz_dry_run",
                listener=conn.name,
                result="allowed" if shadow.allowed else "denied",
                policy=shadow.policy or "none",
                reason=shadow.reason,
                source_principal=peer.principal or "-",
                source_ip=source_ip,
            )
        if decision.audit:
            log.info(
                "tcp.authz_audit",
                listener=conn.name,
                allowed=decision.allowed,
                source_principal=peer.principal or "-",
                source_ip=source_ip,
            )
        if decision.allowed:
            return False
        policy = decision.policy or "none"
        conn.counters.denied.labels(conn.name, policy).inc()
        log.info(
            "tcp.authz_denied",
            listener=conn.name,
            policy=policy,
            reason=decision.reason,
            source_principal=peer.principal or "-",
            source_ip=source_ip,
        )
        return True

    async def _open_service(self, upstream: TcpUpstream, conn: _Connection) -> bool:
        ref = upstream.service
        try:
            dest = await self.cache.get(ref)
        except errors.MeshError as e:
            log.warning("tcp.no_destination", listener=conn.name, service=str(ref), error=str(e))
            if self.telemetry is not None:
                self._telemetry_decided(
                    conn, self.telemetry.tcp_outbound(ref, None, ResponseFlag.NO_HEALTHY_UPSTREAM)
                )
            return False
        attrs = ConnectionAttrs(
            port=upstream.port,
            destination_ip=_local_ip(conn.downstream),
            source_labels=self.source_labels,
            source_namespace=self.source_namespace,
        )
        table = dest.table
        try:
            target = None
            if table is not None and table.tls:
                # `tls` rules route TLS connections by SNI (the ClientHello is read
                # first, as Envoy's tls_inspector does); other traffic takes `tcp` rules
                sni = await self._client_hello_sni(conn)
                if sni:
                    with_sni = dataclasses.replace(attrs, sni=sni)
                    target = route_target(table.tls, with_sni, self.rand.random())
            if target is None:
                tcp_rules = table.tcp if table is not None else ()
                target = tcp_target(tcp_rules, ref, attrs, self.rand.random())
        except NoDestinationError as e:
            log.warning("tcp.no_route", listener=conn.name, service=str(ref), error=str(e))
            if self.telemetry is not None:
                self._telemetry_decided(
                    conn, self.telemetry.tcp_outbound(ref, None, ResponseFlag.NO_ROUTE_FOUND)
                )
            return False
        return await self._connect_target(conn, target, dest if target.service == ref else None)

    async def _open_gateway(self, port: int, protocol: str, conn: _Connection) -> bool:
        """A connection to a gateway TCP server (routed by the `tcp` rules bound to
        the gateway) or TLS PASSTHROUGH server (by the `tls` rules, on the SNI of the
        ClientHello, relayed unchanged); no rule matching: closed, flag NR."""
        config = self._gateway
        if config is None:
            return False
        if self._denied(port, conn):  # AuthorizationPolicies selecting the gateway
            if self.telemetry is not None:
                record = self.telemetry.tcp_outbound(None, None, DENIED_FLAG)
                self._telemetry_decided(conn, record)
            return False
        sni = ""
        if protocol == "TLS":
            sni = await self._client_hello_sni(conn)
        attrs = ConnectionAttrs(
            port=port,
            destination_ip=_local_ip(conn.downstream),
            source_labels=self.source_labels,
            source_namespace=self.source_namespace,
            gateway=config.name,
            sni=sni,
        )
        routes = config.tls if protocol == "TLS" else config.tcp
        return await self._open_routed(conn, routes, attrs, None)

    def tunnel_protocol(self, name: str, opener: Opener) -> asyncio.Protocol:
        """The protocol that takes a CONNECT tunnel over (`Exchange.accept_connect`):
        its bytes are relayed as an accepted connection of listener `name`, to where
        `opener` connects it."""
        return _Connection(self, name, self.stats.listener(name), opener).downstream

    def entry_opener(
        self,
        routes_tls: Sequence[L4Route],
        routes_tcp: Sequence[L4Route],
        port: int,
        fallback: Opener,
    ) -> Opener:
        """Routes a tunnelled connection to a ServiceEntry host's `port` by that host's
        `tls` rules (on the ClientHello's SNI) then `tcp` rules, as a sidecar's relay
        routes one to a mesh service; no rule matching: `fallback` (the host itself,
        Istio's default route)."""

        async def opener(conn: _Connection) -> bool:
            sni = await self._client_hello_sni(conn) if routes_tls else ""
            attrs = ConnectionAttrs(
                port=port,
                destination_ip=_local_ip(conn.downstream),
                source_labels=self.source_labels,
                source_namespace=self.source_namespace,
                sni=sni,
            )
            routes = [*(routes_tls if sni else ()), *routes_tcp]
            return await self._open_routed(conn, routes, attrs, fallback)

        return opener

    async def _open_routed(
        self,
        conn: _Connection,
        routes: Sequence[L4Route],
        attrs: ConnectionAttrs,
        fallback: Opener | None,
    ) -> bool:
        """Connect by the first of `routes` matching `attrs`: to a mesh service (its
        TCP listeners) or to a ServiceEntry host (an endpoint of the entry, the bytes
        as they are). No rule matching: `fallback`, or closed with flag NR."""
        route = select_l4_route(routes, attrs)
        if route is None:
            if fallback is not None:
                return await fallback(conn)
            log.info("tcp.no_route", listener=conn.name, sni=attrs.sni, error="no rule matches")
            if self.telemetry is not None:
                self._telemetry_decided(
                    conn, self.telemetry.tcp_outbound(None, None, ResponseFlag.NO_ROUTE_FOUND)
                )
            return False
        try:
            chosen = pick_l4_destination(route, self.rand.random()).destination
        except NoDestinationError as e:
            log.info("tcp.no_route", listener=conn.name, sni=attrs.sni, error=str(e))
            if self.telemetry is not None:
                self._telemetry_decided(
                    conn, self.telemetry.tcp_outbound(None, None, ResponseFlag.NO_ROUTE_FOUND)
                )
            return False
        port = chosen.port or attrs.port
        ref = service_of_host(chosen.host)
        if ref is not None:
            target = TcpTarget(ref, chosen.subset, port, route.origin)
            return await self._connect_target(conn, target, None)
        return await self._open_external(conn, chosen.host, chosen.subset, port, route.origin)

    async def _open_external(
        self, conn: _Connection, host: str, subset: str, port: int, origin: str
    ) -> bool:
        """Connect to an endpoint of the ServiceEntry host `host` serving `port`, with
        no TLS of ours (the client's bytes reach it as sent)."""
        mesh_wide = self.cache.mesh_wide
        try:
            await mesh_wide.current()
        except errors.MeshError as e:
            log.warning("tcp.no_destination", listener=conn.name, host=host, error=str(e))
            if self.telemetry is not None:
                self._telemetry_decided(
                    conn, self.telemetry.tcp_outbound(None, None, ResponseFlag.NO_HEALTHY_UPSTREAM)
                )
            return False
        dest = mesh_wide.destination(host, port, self.source_namespace)
        cluster = dest.cluster(subset, self.rand, port) if dest is not None else None
        if dest is None or cluster is None:
            log.warning(
                "tcp.no_route",
                listener=conn.name,
                host=host,
                port=port,
                rule=origin,
                error="not a service or ServiceEntry host (or subset) with that port",
            )
            if self.telemetry is not None:
                self._telemetry_decided(
                    conn, self.telemetry.tcp_outbound(None, None, ResponseFlag.NO_ROUTE_FOUND)
                )
            return False

        async def open_endpoint(endpoint: Endpoint) -> bool:
            address, _sep, port_text = endpoint.address.rpartition(":")
            if not port_text.isdigit():
                log.warning("tcp.bad_endpoint", listener=conn.name, host=host)
                return False
            address = address.removeprefix("[").removesuffix("]")
            return await self._open(conn, address, int(port_text), host)

        endpoints = cluster_send.ClusterEndpoints(cluster)
        chosen, tried = await cluster_send.connect(endpoints, open_endpoint, CONNECT_ATTEMPTS)
        if chosen is not None:
            if self.telemetry is not None:
                # destination_service: the host, as for HTTP to a ServiceEntry host
                record = self.telemetry.tcp_outbound(None, None)
                record = record._replace(destination_service=host)
                self._telemetry_decided(conn, record)
            return True
        log.warning("tcp.no_upstream", listener=conn.name, host=host, port=port, tried=len(tried))
        if self.telemetry is not None:
            self._telemetry_decided(
                conn,
                self.telemetry.tcp_outbound(None, None, ResponseFlag.UPSTREAM_CONNECTION_FAILURE),
            )
        return False

    async def _client_hello_sni(self, conn: _Connection) -> str:
        """The SNI of the ClientHello the client sends first ("" without one, or when
        it is not TLS, or not complete within `TLS_INSPECT_TIMEOUT_S`)."""
        side = conn.downstream
        try:
            async with asyncio.timeout(TLS_INSPECT_TIMEOUT_S):
                while True:
                    conn.held_more.clear()
                    sni = client_hello_sni(b"".join(side.held))
                    if sni is not MORE:
                        return sni
                    if side.eof_in or side.closed:
                        return ""
                    await conn.held_more.wait()
        except TimeoutError:
            return ""

    async def _connect_target(
        self, conn: _Connection, target: TcpTarget, dest: Destination | None
    ) -> bool:
        """Connect `conn` to an endpoint of `target` (`dest`: its state, if at hand),
        trying up to `CONNECT_ATTEMPTS` endpoints."""
        ref, port = target.service, target.port
        try:
            if dest is None:
                dest = await self.cache.get(ref)
        except errors.MeshError as e:
            log.warning("tcp.no_destination", listener=conn.name, service=str(ref), error=str(e))
            if self.telemetry is not None:
                self._telemetry_decided(
                    conn, self.telemetry.tcp_outbound(ref, None, ResponseFlag.NO_HEALTHY_UPSTREAM)
                )
            return False
        cluster = dest.tcp_cluster(target.subset, self.rand, port)
        if cluster is None:
            # an unknown subset: Envoy has no such cluster, the connection is closed, flag NC
            log.warning(
                "tcp.unknown_subset",
                listener=conn.name,
                service=str(ref),
                subset=target.subset,
                rule=target.origin,
            )
            if self.telemetry is not None:
                self._telemetry_decided(
                    conn, self.telemetry.tcp_outbound(ref, None, ResponseFlag.NO_CLUSTER_FOUND)
                )
            return False
        if not cluster.breaker.try_acquire_connection():
            # `tcp.maxConnections` relayed connections are open: closed at once, flag UO
            # (Envoy's tcp_proxy counts upstream_cx_overflow and closes the downstream)
            cluster.counters["overflows"] += 1
            log.info("tcp.overflow", listener=conn.name, cluster=cluster.name)
            if self.telemetry is not None:
                self._telemetry_decided(
                    conn, self.telemetry.tcp_outbound(ref, None, ResponseFlag.UPSTREAM_OVERFLOW)
                )
            return False
        endpoints = ServiceClusterEndpoints(
            dest, cluster, target.subset, port, self.rand, _peer_ip(conn.downstream)
        )

        async def open_endpoint(endpoint: Endpoint) -> bool:
            try:
                host, relay_port = relay_address(endpoint, port)
            except ValueError as e:
                log.warning("tcp.bad_endpoint", listener=conn.name, error=str(e))
                return False
            # a gateway's TCP / TLS server takes the bytes as sent (Istio's PASSTHROUGH)
            plain = port in endpoint.plain_tcp_ports
            identity = "" if plain else endpoint.identity
            # the cluster's `connectionPool.tcp.connectTimeout` when it has one
            options = endpoints.cluster.pool_options
            timeout_s = options.connect_timeout_s if options is not None else CONNECT_TIMEOUT_S
            return await self._open(
                conn, host, relay_port, endpoint.instance, identity, connect_timeout_s=timeout_s
            )

        try:
            chosen, tried = await cluster_send.connect(endpoints, open_endpoint, CONNECT_ATTEMPTS)
        except BaseException:
            cluster.breaker.release_connection()
            raise
        if chosen is not None:
            # held until the relayed connection ends (`_Connection.on_finished`)
            balancer = endpoints.cluster.balancer
            balancer.on_request_start(chosen.instance)
            conn.on_finished = partial(_relay_ended, cluster, balancer, chosen.instance)
            if self.telemetry is not None:
                self._telemetry_decided(conn, self.telemetry.tcp_outbound(ref, chosen))
            return True
        cluster.breaker.release_connection()
        log.warning(
            "tcp.no_upstream",
            listener=conn.name,
            service=str(ref),
            subset=target.subset,
            port=port,
            tried=sorted(tried),
        )
        if self.telemetry is not None:
            # nothing to try (no endpoint, or all ejected): UH, as Envoy's tcp_proxy
            flag = (
                ResponseFlag.UPSTREAM_CONNECTION_FAILURE
                if tried
                else ResponseFlag.NO_HEALTHY_UPSTREAM
            )
            self._telemetry_decided(conn, self.telemetry.tcp_outbound(ref, None, flag))
        return False

    async def _open(
        self,
        conn: _Connection,
        host: str,
        port: int,
        target: str,
        identity: str = "",
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> bool:
        """Connect to host:port and link it to `conn`; False when the connect failed.
        With an `identity` (an endpoint with a sidecar) the connection is mTLS and the
        server must present exactly that identity; never plaintext instead."""
        loop = asyncio.get_running_loop()
        context = None
        try:
            if identity and self.tls is not None:
                context = self.tls.client_context()
            upstream: _Side | None = None
            async with asyncio.timeout(connect_timeout_s):
                _transport, upstream = await loop.create_connection(
                    lambda: _Side(conn, conn.counters.received, context), host, port
                )
                if context is not None:
                    await upstream.handshaken
            if context is not None and self.tls is not None:
                try:
                    self.tls.verifier(identity)(_ssl_object(upstream))
                except errors.MeshError:
                    upstream.reset()
                    raise
        except (OSError, ssl.SSLError, TimeoutError, errors.MeshError) as e:
            # refused, unreachable, TLS, identity, timed out
            if upstream is not None:
                upstream.reset()
            conn.counters.connect_failures.inc()
            log.debug(
                "tcp.connect_failed",
                listener=conn.name,
                target=target,
                address=f"{host}:{port}",
                error=repr(e),
            )
            return False
        if conn.downstream.closed:
            upstream.reset()  # the client left while we were connecting
        else:
            conn.link(upstream)
        return True

    # ------------------------------------------------------------ telemetry

    def report_telemetry(self) -> None:
        """Report the bytes open connections relayed since the last call."""
        if self.telemetry is None:
            return
        recorder = self.telemetry.recorder
        for conn in self._connections:
            if conn.telemetry is not None and conn.upstream is not None:
                request, response = conn.unreported_bytes()
                if request or response:
                    recorder.record_tcp_bytes(conn.telemetry, sent=response, received=request)

    def _telemetry_decided(self, conn: _Connection, record: TcpRecord) -> None:
        assert self.telemetry is not None
        conn.telemetry = record
        if conn.upstream is not None:
            self.telemetry.recorder.record_tcp_opened(record)
            conn.telemetry_opened = True

    def _telemetry_closed(self, conn: _Connection) -> None:
        record = conn.telemetry
        if self.telemetry is None or record is None:
            return  # no telemetry, or the client left before a connect was decided
        recorder = self.telemetry.recorder
        if not conn.telemetry_opened:
            recorder.record_tcp_opened(record)  # never linked: counted opened and closed
        request, response = conn.unreported_bytes()
        # Istio: "sent" is the response direction, "received" the request direction
        recorder.record_tcp_closed(record, sent=response, received=request)

    # ------------------------------------------------------------ shutdown

    def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()

    def close(self) -> None:
        """Stop accepting, give up pending connects and reset every relayed connection."""
        self.stop_accepting()
        for task in list(self._connect_tasks.values()):
            task.cancel()
        for conn in list(self._connections):
            conn.reset()

    async def wait_closed(self) -> None:
        """After `close()`: wait until every connection has ended and the listeners are shut."""
        await asyncio.gather(*self._connect_tasks.values(), return_exceptions=True)
        await self._idle.wait()
        for server in self._servers:
            if isinstance(server, asyncio.Server):
                await server.wait_closed()


__all__ = [
    "CONNECT_ATTEMPTS",
    "DENIED_FLAG",
    "HIGH_WATER",
    "ListenerCounters",
    "Opener",
    "ServiceClusterEndpoints",
    "TcpRelays",
    "TcpStats",
    "TcpTarget",
    "TcpUpstream",
    "client_hello_sni",
    "listener_address",
    "parse_tcp_upstream",
    "relay_address",
    "route_target",
    "tcp_endpoints",
    "tcp_target",
]
