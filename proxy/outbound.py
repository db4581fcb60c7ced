"""Outbound (and gateway) routing: resolve the destination, apply its route table,
pick a subset and an endpoint, forward to that endpoint's sidecar.

The decisions are the routing core's (`proxy.routing`); this module only gathers the
request's attributes, asks, and carries out the answer. Per routed request, in order:
the rule's fault injection (`fault`: delay, flag `DI`; abort, a local reply with
flag `FI`), its mirror copy (`proxy.mirroring`), then the request itself through
`proxy.attempts` (circuit breaker, timeouts, retries, outlier detection).

With telemetry, every request is recorded with `reporter="source"` (local replies too,
with their flags); a forwarded one leaves with a client span's trace headers and this
proxy's peer metadata (`SidecarTelemetry.client_headers`, `outbound_done`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from mesh import errors
from mesh.compiled import HeaderOps, HTTPRoute, L4Route, Mirror, WeightedDestination
from mesh.hosts import ServiceRef, canonical_host, service_of_host, strip_port
from mesh.messages import Endpoint
from proxy import attempts, cluster_send
from proxy.destinations import Destination, DestinationCache
from proxy.forward import Outcome, PoolSet, forward, local_reply
from proxy.http import (
    BodyStream,
    Exchange,
    Request,
    UpstreamError,
    append_forwarded_for,
    header_map,
    strip_hop_by_hop,
)
from proxy.mirroring import MIRROR_TIMEOUT_S, Mirrors
from proxy.own_listeners import names_own_listener
from proxy.resilience import decide_fault, should_mirror
from proxy.response_flags import ResponseFlag, join_flags
from proxy.routing import (
    CompiledRoutes,
    HashContext,
    NoDestinationError,
    RequestAttrs,
    RingHashBalancer,
    RouteMatch,
    apply_request_header_ops,
    apply_response_header_ops,
    pick_destination,
    redirect_location,
    request_authority,
    rewrite_path,
)
from proxy.routing.upstream_headers import HeaderEdit, upstream_request_headers
from proxy.telemetry import PEER_METADATA_HEADER, SidecarTelemetry

if TYPE_CHECKING:
    from proxy.tcp import TcpRelays


class Admitted(NamedTuple):
    """What a gateway's request policy decided: `refused`, the reply it gave, or None
    to let the request on (possibly rewritten: a JWT removed, claims added) with
    `client_headers` added to the answer (an external authorizer's)."""

    refused: Outcome | None = None
    client_headers: tuple[tuple[str, str], ...] = ()


ADMITTED = Admitted()


class Admission(Protocol):
    """A gateway's request policy (`proxy.gateway_policy`)."""

    async def admit(self, req: Request, ex: Exchange) -> Admitted: ...


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is sending: the workload this proxy fronts (labels match `sourceLabels`)."""

    namespace: str
    labels: dict[str, str]
    gateway: str = ""  # "<ns>/<name>" in gateway mode


class RouteHandler:
    """Routes requests to mesh services: the sidecar's outbound listener, or a gateway
    (then `routes_for` gives the gateway's compiled virtual hosts)."""

    def __init__(
        self,
        caller: Caller,
        cache: DestinationCache,
        pools: PoolSet,
        rand: random.Random | None = None,
        telemetry: SidecarTelemetry | None = None,
    ):
        self.caller = caller
        self.cache = cache
        self.pools = pools
        self.rand = rand or random.Random()
        self.telemetry = telemetry
        self.gateway_routes: CompiledRoutes | None = None
        self.gateway_mode = False
        # gateway mode: RequestAuthentication and AuthorizationPolicy before routing
        self.admission: Admission | None = None
        self.mirrors = Mirrors(cache, pools, self.rand)
        # the data plane's TCP relays: a CONNECT to a ServiceEntry host whose
        # VirtualService has `tls` / `tcp` rules is handed to them (routed by SNI)
        self.tcp_relays: TcpRelays | None = None
        # this data plane's listener ports: ALLOW_ANY never passes through to them
        self.own_ports: Collection[int] = ()
        # host as sent -> mesh service; a handful of distinct hosts per proxy, so a
        # small memo spares canonicalising strings on every request
        self._services: dict[str, ServiceRef | None] = {}

    def _service(self, host: str) -> ServiceRef | None:
        ref = self._services.get(host, _UNRESOLVED)
        if ref is _UNRESOLVED:
            if len(self._services) >= _MAX_MEMO:
                self._services.clear()
            ref = service_of_host(canonical_host(host, self.caller.namespace))
            self._services[host] = ref
        return ref  # type: ignore[return-value]

    def close(self) -> None:
        """Cancel the mirror copies still in flight."""
        self.mirrors.close()

    async def handle(self, req: Request, ex: Exchange) -> Outcome:
        if req.method == "CONNECT":
            return await self._connect(req, ex)
        telemetry = self.telemetry
        if telemetry is None:
            return await self._handle(req, ex, None)
        # what routing learns on the way; recorded as is (status 0, flags DC) when the
        # handler ends by an exception, e.g. the client went away
        seen = Outcome(0, ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
        try:
            result = await self._handle(req, ex, seen)
        except BaseException:
            telemetry.outbound_done(req, ex, seen)
            raise
        seen.status, seen.flags, seen.upstream = result.status, result.flags, result.upstream
        telemetry.outbound_done(req, ex, seen)
        return result

    async def _connect(self, req: Request, ex: Exchange) -> Outcome:
        """CONNECT to a mesh service's host:port (what gRPC clients send when given the
        sidecar's `http_proxy`): answered 200, and the tunnelled connection is served
        by this listener as HTTP/1.1 or h2c, so each request in it is routed, retried,
        authorized and counted like any other (not relayed as opaque bytes). A host
        outside the registry: `_connect_outside`. Anything else is answered 404 `NR`,
        as Envoy does without a `connect_matcher` route."""
        authority = req.authority
        ref = self._service(authority) if authority and not self.gateway_mode else None
        if (ref is None or ref.name == "*") and authority and not self.gateway_mode:
            if req.http_version == "1.1" and _port_of(authority):
                return await self._connect_outside(req, ex)
        if ref is None or ref.name == "*" or req.http_version != "1.1" or not _port_of(authority):
            return await local_reply(ex, 404, ResponseFlag.NO_ROUTE_FOUND, "CONNECT is not routed")
        try:
            dest = await self.cache.get(ref)
        except errors.MeshError as e:
            return await local_reply(
                ex, 503, ResponseFlag.NO_HEALTHY_UPSTREAM, f"no configuration for {ref}: {e}"
            )
        if not _exists(dest):
            # a name the registry does not know: a ServiceEntry host or ALLOW_ANY may
            return await self._connect_outside(req, ex)
        await ex.accept_connect()
        return Outcome(200, "", "", ref.fqdn)

    async def _connect_outside(self, req: Request, ex: Exchange) -> Outcome:
        """CONNECT to a host outside the registry (what an app sends for https:// given
        the sidecar's proxy): a ServiceEntry host declaring that port with a protocol
        other than HTTP's (HTTPS, TLS, TCP...), or any host under ALLOW_ANY, gets an
        opaque tunnel to it (the app's TLS passes through, as through Istio's
        sidecar); anything else 404 `NR`."""
        host, port = strip_port(req.authority), _port_of(req.authority)
        try:
            config = await self.cache.mesh_wide.current()
        except errors.MeshError as e:
            return await local_reply(
                ex, 503, ResponseFlag.NO_HEALTHY_UPSTREAM, f"no mesh-wide configuration: {e}"
            )
        dest = None
        if self.cache.mesh_wide.tunnels(host, port, self.caller.namespace):
            dest = self.cache.mesh_wide.destination(host, port, self.caller.namespace)
        if dest is not None:
            cluster = dest.cluster("", self.rand)
            now = time.monotonic()
            endpoint = cluster.choose(None, frozenset(), now) if cluster is not None else None
            if endpoint is None:
                return await local_reply(
                    ex, 503, ResponseFlag.NO_HEALTHY_UPSTREAM, f"no healthy upstream for {host}"
                )
            address = endpoint.address
            table, relays = dest.table, self.tcp_relays
            if table is not None and (table.tls or table.tcp) and relays is not None:
                return await self._connect_routed(
                    ex, relays, table.tls, table.tcp, host, port, address
                )
        elif config.outbound_traffic_policy == "ALLOW_ANY":
            if await names_own_listener(host, port, self.own_ports):
                return await local_reply(ex, 508, "", "passthrough to this sidecar refused")
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        else:
            return await local_reply(ex, 404, ResponseFlag.NO_ROUTE_FOUND, "CONNECT is not routed")
        try:
            upstream = await self.pools.get(address).open_connection()
        except UpstreamError as e:
            return await local_reply(
                ex, 503, ResponseFlag.UPSTREAM_CONNECTION_FAILURE, f"upstream connect error: {e}"
            )
        await ex.relay_connect(upstream)
        return Outcome(200, "", address, host)

    async def _connect_routed(
        self,
        ex: Exchange,
        relays: TcpRelays,
        tls: Sequence[L4Route],
        tcp: Sequence[L4Route],
        host: str,
        port: int,
        address: str,
    ) -> Outcome:
        """CONNECT to a ServiceEntry host whose VirtualService has `tls` / `tcp` rules
        (Istio's egress gateway for HTTPS): answered 200, and the tunnel becomes a
        relayed TCP connection routed as a sidecar's relay routes one, by the SNI of
        the app's ClientHello then the `tcp` rules; no rule matching: to `address`,
        the entry's endpoint already chosen. The app's TLS passes through untouched."""
        name, _sep, port_text = address.rpartition(":")
        fallback = relays.address_opener(name.strip("[]"), int(port_text))
        opener = relays.entry_opener(tls, tcp, port, fallback)
        await ex.accept_connect(relays.tunnel_protocol(f"connect:{host}:{port}", opener))
        return Outcome(200, "", address, host)

    async def _handle(self, req: Request, ex: Exchange, seen: Outcome | None) -> Outcome:
        # path and authority were normalised and validated by the engine
        # (proxy.http.target) before routing: routed as forwarded
        authority = req.authority
        if not authority:
            return await local_reply(ex, 400, "", "missing Host header")
        if self.admission is not None and self.gateway_mode:
            # before routing, as Envoy's jwt_authn and RBAC filters precede the router;
            # routing then sees the request as forwarded (token removed, claims added)
            admitted = await self.admission.admit(req, ex)
            if admitted.refused is not None:
                return admitted.refused
            client_headers = admitted.client_headers
        else:
            client_headers = ()
        headers = header_map(req.headers)
        attrs = RequestAttrs(
            method=req.method,
            scheme=req.scheme,
            authority=authority,
            path=req.path,
            headers=headers,
            port=_port_of(authority),
            source_labels=self.caller.labels,
            source_namespace=self.caller.namespace,
            gateway=self.caller.gateway,
        )
        if self.gateway_mode:
            # a gateway server's port is what a `port` match compares with; a Host
            # without one arrived on the scheme's default port (80 for HTTP)
            attrs = _with_default_port(attrs, req.scheme)
            if self.gateway_routes is None:
                return await local_reply(
                    ex, 503, ResponseFlag.NO_CLUSTER_FOUND, "gateway has no configuration yet"
                )
            match = self.gateway_routes.select(attrs)
            if match is None:
                return await local_reply(
                    ex, 404, ResponseFlag.NO_ROUTE_FOUND, f"no route for {authority}{req.path}"
                )
            return await self._route(req, ex, attrs, match, seen, client_headers)

        ref = self._service(authority)
        if ref is None or ref.name == "*":
            return await self._outside_registry(req, ex, attrs, seen, "not a mesh service")
        if seen is not None:
            seen.service = ref.fqdn
        try:
            dest = await self.cache.get(ref)
        except errors.MeshError as e:
            return await local_reply(
                ex, 503, ResponseFlag.NO_HEALTHY_UPSTREAM, f"no configuration for {ref}: {e}"
            )
        if not _exists(dest):
            return await self._outside_registry(req, ex, attrs, seen, "no such service")
        assert dest.routes is not None
        match = dest.routes.select(attrs)
        if match is None:
            return await local_reply(
                ex, 404, ResponseFlag.NO_ROUTE_FOUND, f"no route matched {req.method} {req.path}"
            )
        return await self._route(req, ex, attrs, match, seen)

    async def _outside_registry(
        self, req: Request, ex: Exchange, attrs: RequestAttrs, seen: Outcome | None, why: str
    ) -> Outcome:
        """A host the registry does not know: a ServiceEntry host is routed like a mesh
        service; anything else is refused (REGISTRY_ONLY, 502 `NR`) or passed through
        to the host and port asked for (ALLOW_ANY), as the mesh-wide table says."""
        host = strip_port(attrs.authority)
        # a ServiceEntry port is what the Host names, else the scheme's default port
        attrs = _with_default_port(attrs, req.scheme)
        try:
            config = await self.cache.mesh_wide.current()
        except errors.MeshError as e:
            return await local_reply(
                ex, 503, ResponseFlag.NO_HEALTHY_UPSTREAM, f"no mesh-wide configuration: {e}"
            )
        dest = self.cache.mesh_wide.destination(host, attrs.port, self.caller.namespace)
        if dest is None:
            if config.outbound_traffic_policy == "ALLOW_ANY":
                return await self._passthrough(req, ex, host, attrs.port or 80, seen)
            return await local_reply(
                ex, 502, ResponseFlag.NO_ROUTE_FOUND, f"unknown host {host!r}: {why}"
            )
        if seen is not None:
            seen.service = dest.host
        assert dest.routes is not None
        match = dest.routes.select(attrs)
        if match is None:
            return await local_reply(
                ex, 404, ResponseFlag.NO_ROUTE_FOUND, f"no route matched {req.method} {req.path}"
            )
        return await self._route(req, ex, attrs, match, seen)

    async def _passthrough(
        self, req: Request, ex: Exchange, host: str, port: int, seen: Outcome | None
    ) -> Outcome:
        """ALLOW_ANY: the request as the app sent it, to the host and port it named
        (Istio's PassthroughCluster): no routing, no retries, plaintext."""
        if seen is not None:
            seen.service = host
        if await names_own_listener(host, port, self.own_ports):
            # it would come back to this listener, and go round again
            return await local_reply(ex, 508, "", "passthrough to this sidecar refused")
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        headers = strip_hop_by_hop(req.headers, req.upgrade)
        headers = append_forwarded_for(headers, req.peer[0] if req.peer else "")
        return await forward(
            ex,
            req,
            self.pools.get(address),
            method=req.method,
            path=req.path,
            headers=headers,
            upstream=address,
        )

    async def _route(
        self,
        req: Request,
        ex: Exchange,
        attrs: RequestAttrs,
        match: RouteMatch,
        seen: Outcome | None,
        client_headers: tuple[tuple[str, str], ...] = (),
    ) -> Outcome:
        route: HTTPRoute = match.route
        if route.direct_response is not None:
            dr = route.direct_response
            await ex.respond(
                dr.status, [("content-type", "text/plain; charset=utf-8")], (dr.body or "").encode()
            )
            return Outcome(dr.status)
        if route.redirect is not None:
            status, location = redirect_location(
                route.redirect, req.scheme, attrs.authority, req.path, match.match
            )
            await ex.respond(status, [("location", location)], b"")
            return Outcome(status)
        try:
            chosen = pick_destination(route, self.rand.random())
        except NoDestinationError as e:
            return await local_reply(ex, 503, ResponseFlag.NO_CLUSTER_FOUND, str(e))
        target_ref = self._service(chosen.destination.host)
        external: Destination | None = None
        if target_ref is None or target_ref.name == "*":
            # a ServiceEntry host (`proxy.egress`), at the port the route names or,
            # without one, the port the request was sent to
            external = await self._external(
                chosen.destination.host, chosen.destination.port or attrs.port
            )
            if external is None:
                return await local_reply(
                    ex,
                    502,
                    ResponseFlag.NO_ROUTE_FOUND,
                    f"route destination {chosen.destination.host} is not a mesh service "
                    "or ServiceEntry host",
                )
        if seen is not None:
            if external is not None:
                seen.service = external.host
            elif target_ref is not None:
                seen.service = target_ref.fqdn
        fault_flags = ""
        if route.fault is not None:
            fault = decide_fault(route.fault, self.rand.random(), self.rand.random())
            if fault.delay_ms:
                await asyncio.sleep(fault.delay_ms / 1000)
            fault_flags = ",".join(fault.flags)
            if fault.abort_status:
                return await local_reply(
                    ex,
                    fault.abort_status,
                    fault_flags,
                    "fault filter abort",
                    grpc_status=fault.abort_grpc_status,
                )
        if external is not None:
            target = external
        else:
            assert target_ref is not None
            try:
                target = await self.cache.get(target_ref)
            except errors.MeshError as e:
                return await local_reply(
                    ex,
                    503,
                    ResponseFlag.NO_HEALTHY_UPSTREAM,
                    f"no configuration for {target_ref}: {e}",
                )
        # the port the route names, else the one asked for (portLevelSettings)
        cluster = target.cluster(
            chosen.destination.subset, self.rand, chosen.destination.port or attrs.port
        )
        if cluster is None:
            return await local_reply(
                ex,
                503,
                ResponseFlag.NO_CLUSTER_FOUND,
                f"unknown subset {chosen.destination.subset!r} of {target.host or target_ref}",
            )
        balancer = cluster.balancer
        peer_ip = req.peer[0] if req.peer else ""
        hash_ctx = None
        if isinstance(balancer, RingHashBalancer):
            hash_ctx = HashContext(
                headers=attrs.headers,
                path=req.path,
                source_ip=peer_ip,
                source_port=req.peer[1] if req.peer else 0,
            )

        path = rewrite_path(route, match.match, req.path)
        authority = request_authority(route, chosen, attrs.authority)
        out_headers, _request_id = upstream_request_headers(
            req.headers,
            upgrade=req.upgrade,
            authority=authority,
            client_ip=peer_ip,
            edit=_header_edit(route, chosen),
            # our peer metadata never leaves the mesh (a gateway passes on what it got)
            drop=_PEER_METADATA if external is not None else _NOTHING,
        )
        if seen is not None and self.telemetry is not None and external is None:
            # trace context and peer metadata go to mesh workloads only: a host
            # outside the mesh gets the request as the app sent it
            out_headers = self.telemetry.client_headers(out_headers, seen)
        cookie = balancer.cookie_to_set(hash_ctx) if hash_ctx is not None else None

        def response_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
            headers = apply_response_header_ops(headers, route, chosen)
            if cookie:
                headers.append(("set-cookie", cookie))
            headers.extend(client_headers)
            return headers

        mirror = route.mirror
        if mirror is not None and (
            req.upgrade or not should_mirror(mirror.percentage, self.rand.random())
        ):
            mirror = None  # a copy of an upgrade would open a tunnel nobody reads
        body: bytes | BodyStream = req.body
        if (route.retries is not None or mirror is not None) and not req.upgrade:
            # kept in memory (up to 64 KiB) so that it can be sent more than once
            body = await attempts.buffered_body(req.body)
        if mirror is not None:
            self._mirror(mirror, route, req.method, path, out_headers, authority, body)

        on_endpoint = None
        if seen is not None and self.telemetry is not None and target_ref is not None:
            telemetry, outcome, workload_of = self.telemetry, seen, target_ref

            def on_endpoint(endpoint: Endpoint) -> None:
                outcome.destination = telemetry.destination_of(workload_of, endpoint)

        result = await attempts.send(
            ex,
            cluster_send.Request(
                req.method,
                path,
                out_headers,
                body,
                grpc=attrs.headers.get("content-type", "").startswith("application/grpc"),
            ),
            cluster=cluster,
            pools=self.pools,
            route=route,
            hash_ctx=hash_ctx,
            rand=self.rand,
            response_headers=response_headers,
            on_endpoint=on_endpoint,
        )
        if fault_flags:
            result.flags = join_flags(fault_flags, result.flags)
        return result

    async def _external(self, host: str, port: int) -> Destination | None:
        """The ServiceEntry destination for a route's `host:port`, or None."""
        try:
            await self.cache.mesh_wide.current()
        except errors.MeshError:
            return None
        return self.cache.mesh_wide.destination(strip_port(host), port or 80, self.caller.namespace)

    def _mirror(
        self,
        mirror: Mirror,
        route: HTTPRoute,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        authority: str,
        body: bytes | BodyStream,
    ) -> None:
        ref = self._service(mirror.host)
        if ref is None:
            return
        if isinstance(body, BodyStream):
            if not (body.complete and body.length == 0):
                self.mirrors.skipped_body()
                return
            body = b""
        timeout_s = route.timeout_ms / 1000 if route.timeout_ms else MIRROR_TIMEOUT_S
        self.mirrors.send(ref, mirror.subset, method, path, headers, authority, body, timeout_s)


_UNRESOLVED = object()
_MAX_MEMO = 1024
_NOTHING: frozenset[str] = frozenset()
_PEER_METADATA = frozenset({PEER_METADATA_HEADER})


def _header_edit(route: HTTPRoute, chosen: WeightedDestination) -> HeaderEdit | None:
    """The route's and destination's request header operations; None without any."""
    if _no_ops(route.headers.request) and _no_ops(chosen.headers.request):
        return None
    return lambda headers: apply_request_header_ops(headers, route, chosen)


def _no_ops(ops: HeaderOps) -> bool:
    return not (ops.set or ops.add or ops.remove)


def _exists(dest: Destination) -> bool:
    known = dest.table is not None and (dest.table.exists or dest.table.has_virtual_service)
    return known or bool(dest.endpoints and dest.endpoints.endpoints)


def _with_default_port(attrs: RequestAttrs, scheme: str) -> RequestAttrs:
    if attrs.port:
        return attrs
    return attrs._replace(port=443 if scheme == "https" else 80)


def _port_of(authority: str) -> int:
    _, sep, port = authority.rpartition(":")
    return int(port) if sep and port.isdigit() else 0


__all__ = ["Caller", "RouteHandler", "ServiceRef"]
