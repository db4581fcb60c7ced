"""The ADS server the sidecar runs for its Envoy: gRPC on a Unix socket private to the
sidecar, serving listeners, routes, clusters, endpoints and SDS secrets on one
aggregated stream (state of the world), and the virtual hosts Envoy asks for on demand
on delta streams (VHDS's `DeltaVirtualHosts`, or `DeltaAggregatedResources`).

The decisions (what to answer, ACK/NACK bookkeeping, push order) are in
`proxy.envoy.ads_protocol` and `proxy.envoy.delta_protocol`; this module moves messages
between them and gRPC.

    async with XdsServer(socket_path, on_status=report) as xds:
        xds.set_resources(snapshot)          # pushes what changed to every Envoy
        await xds.wait_until(lambda s: ...)  # e.g. every type APPLIED
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.route.v3 import rds_pb2_grpc

from mesh.logs import get_logger
from proxy.envoy.ads_protocol import (
    WILDCARD_TYPES,
    AdsState,
    AdsStream,
    ApplyState,
    TypeStatus,
    XdsError,
)
from proxy.envoy.delta_protocol import DeltaResource, DeltaState, DeltaStream
from proxy.envoy.private_grpc import PrivateSocketError, start_private_server
from proxy.envoy.resources import XdsResources

log = get_logger("proxy.envoy.xds")

StatusCallback = Callable[[TypeStatus], None]
# (type URL, names a delta stream asked for that the server cannot resolve yet)
DeltaWantedCallback = Callable[[str, set[str]], None]

__all__ = ["ApplyState", "StatusCallback", "TypeStatus", "XdsError", "XdsServer"]


class _Connection:
    """One Envoy stream: the protocol state and the queue of responses to write."""

    def __init__(self, stream: AdsStream):
        self.stream = stream
        self.outbox: asyncio.Queue[discovery_pb2.DiscoveryResponse | None] = asyncio.Queue()

    def send(self, responses: list[discovery_pb2.DiscoveryResponse]) -> None:
        for response in responses:
            self.outbox.put_nowait(response)


class _AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, server: XdsServer):
        self._server = server

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._server._serve_stream(request_iterator, context)

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        # what the delta state holds (the virtual hosts); everything else is served
        # state of the world on StreamAggregatedResources
        await self._server._serve_delta_stream(request_iterator, context)


class _VhdsServicer(rds_pb2_grpc.VirtualHostDiscoveryServiceServicer):
    """VHDS on its own delta stream (`RouteConfiguration.vhds` names an
    `api_config_source` of type DELTA_GRPC)."""

    def __init__(self, server: XdsServer):
        self._server = server

    async def DeltaVirtualHosts(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._server._serve_delta_stream(request_iterator, context)


class _DeltaConnection:
    def __init__(self, stream: DeltaStream):
        self.stream = stream
        self.outbox: asyncio.Queue[discovery_pb2.DeltaDiscoveryResponse | None] = asyncio.Queue()

    def send(self, responses: list[discovery_pb2.DeltaDiscoveryResponse]) -> None:
        for response in responses:
            self.outbox.put_nowait(response)


class XdsServer:
    """ADS over `socket_path` (created 0600, removed on stop)."""

    def __init__(
        self,
        socket_path: Path | str,
        *,
        on_status: StatusCallback | None = None,
        on_delta_wanted: DeltaWantedCallback | None = None,
    ):
        self.socket_path = Path(socket_path)
        self._state = AdsState()
        self._delta = DeltaState()
        self._delta_connections: set[_DeltaConnection] = set()
        # told of names a delta stream subscribed to that the state cannot resolve yet
        self._on_delta_wanted = on_delta_wanted
        self._callbacks: list[StatusCallback] = [on_status] if on_status else []
        self._connections: set[_Connection] = set()
        self._stream_ids = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self._changed = asyncio.Event()

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        def add_services(server: grpc.aio.Server) -> None:
            ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
                _AdsServicer(self), server
            )
            rds_pb2_grpc.add_VirtualHostDiscoveryServiceServicer_to_server(
                _VhdsServicer(self), server
            )

        try:
            self._server = await start_private_server(self.socket_path, "xDS server", add_services)
        except PrivateSocketError as e:
            raise XdsError(str(e)) from None
        log.info("xds.started", socket=str(self.socket_path))

    async def stop(self, grace: float = 0.0) -> None:
        """Stop serving: streams end (Envoy keeps its configuration and reconnects to
        whatever serves this path next), the socket file is removed."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
            log.info("xds.stopped", socket=str(self.socket_path))
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def __aenter__(self) -> XdsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------- the agent's API

    def set_resources(self, snapshot: XdsResources) -> None:
        """Serve `snapshot` (complete: what it leaves out is removed) from now on and
        push the types that changed to every connected Envoy. Call it from the event
        loop the server runs in; it may be called before `start`. XdsError names a
        resource of the wrong type (the previous snapshot stays)."""
        steps = self._state.set_resources(snapshot)
        if steps:
            log.info(
                "xds.snapshot",
                types={self._state.status[s.type_url].short_name: s.version for s in steps},
                streams=len(self._connections),
            )
        for connection in list(self._connections):
            connection.send(connection.stream.on_push(steps))
            self._publish(connection.stream)

    def set_delta_resources(
        self,
        type_url: str,
        resources: Iterable[DeltaResource],
        absent: Iterable[str] = (),
        opening: Iterable[str] = (),
    ) -> None:
        """Serve these resources of `type_url` on the delta streams (complete: one left
        out is removed from the Envoys that have it); `absent`: names known not to
        exist (answered as such); `opening`: names answered as not existing in each
        stream's first response (`delta_protocol.TypeResources.opening`). Each stream is
        sent what changed for it."""
        self._delta.set(type_url, resources, absent, opening)
        for connection in list(self._delta_connections):
            connection.send(connection.stream.on_change([type_url]))

    def delta_wanted(self, type_url: str) -> set[str]:
        """Names some delta stream subscribed to that are neither served nor absent."""
        out: set[str] = set()
        for connection in self._delta_connections:
            out |= connection.stream.unresolved(type_url)
        return out

    def delta_nacks(self) -> dict[str, str]:
        """Per type: Envoy's last refusal of a delta response, on any stream."""
        return {
            type_url: nack.message
            for connection in self._delta_connections
            for type_url, nack in connection.stream.last_nack.items()
        }

    def status(self) -> dict[str, TypeStatus]:
        """Per type URL: the version sent, the version ACKed, the last NACK."""
        return dict(self._state.status)

    def add_status_callback(self, callback: StatusCallback) -> None:
        self._callbacks.append(callback)

    @property
    def connected(self) -> int:
        """How many Envoy streams are open."""
        return len(self._connections)

    async def wait_until(
        self, predicate: Callable[[Mapping[str, TypeStatus]], bool], timeout: float
    ) -> dict[str, TypeStatus]:
        """Wait until `predicate(status)` holds; TimeoutError (naming the status) if not."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self._state.status):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            summary = ", ".join(
                f"{s.short_name}: {s.state.value} sent={s.version_sent or '-'} "
                f"acked={s.version_acked or '-'}"
                for s in self._state.status.values()
            )
            raise TimeoutError(f"xDS status not reached within {timeout}s ({summary})") from None
        return self.status()

    def applied(self, *type_urls: str) -> bool:
        """Whether every given type (all by default) has what was last sent ACKed.
        Listeners and clusters must have been sent (every Envoy subscribes to them); a
        named type never sent (nothing asked for it) counts as applied."""
        status = self._state.status
        return all(
            status[t].state is ApplyState.APPLIED
            or (status[t].state is ApplyState.NOT_SENT and t not in WILDCARD_TYPES)
            for t in (type_urls or status)
        )

    # ------------------------------------------------------------- the stream shell

    def _publish(self, stream: AdsStream) -> None:
        changes, stream.status_changes = stream.status_changes, []
        for status in changes:
            if status.last_nack is not None and status.state is ApplyState.REJECTED:
                log.warning(
                    "xds.nack",
                    type=status.short_name,
                    version=status.last_nack.version,
                    error=status.last_nack.message,
                    node=stream.node_id,
                )
            for callback in self._callbacks:
                try:
                    callback(status)
                except Exception:
                    log.exception("xds.status_callback_failed", type=status.short_name)
        if changes:
            self._changed.set()

    async def _serve_delta_stream(
        self,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        connection = _DeltaConnection(DeltaStream(self._delta, next(self._stream_ids)))
        stream = connection.stream
        self._delta_connections.add(connection)
        log.info("xds.delta_stream_opened", stream=stream.stream_id)

        async def read() -> None:
            try:
                async for request in requests:
                    responses = stream.on_request(request)
                    log.debug(
                        "xds.delta_request",
                        stream=stream.stream_id,
                        type=request.type_url,
                        subscribe=list(request.resource_names_subscribe),
                        unsubscribe=list(request.resource_names_unsubscribe),
                        initial=sorted(request.initial_resource_versions),
                        nonce=request.response_nonce,
                        responses=len(responses),
                    )
                    connection.send(responses)
                    if request.HasField("error_detail"):
                        log.warning(
                            "xds.delta_nack",
                            type=request.type_url,
                            error=request.error_detail.message,
                            node=stream.node_id,
                        )
                    wanted = stream.unresolved(request.type_url)
                    if wanted and self._on_delta_wanted is not None:
                        try:
                            self._on_delta_wanted(request.type_url, wanted)
                        except Exception:
                            log.exception("xds.delta_wanted_callback_failed")
            finally:
                connection.outbox.put_nowait(None)

        async def write() -> None:
            while (response := await connection.outbox.get()) is not None:
                await context.write(response)

        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(read(), name=f"xds-delta-read-{stream.stream_id}")
                tasks.create_task(write(), name=f"xds-delta-write-{stream.stream_id}")
        except* (grpc.aio.AioRpcError, grpc.aio.UsageError, ConnectionError) as errors:
            log.info(
                "xds.delta_stream_broken", stream=stream.stream_id, error=str(errors.exceptions[0])
            )
        finally:
            self._delta_connections.discard(connection)
            log.info("xds.delta_stream_closed", stream=stream.stream_id, node=stream.node_id)

    async def _serve_stream(
        self,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        connection = _Connection(AdsStream(self._state, next(self._stream_ids)))
        stream = connection.stream
        self._connections.add(connection)
        log.info("xds.stream_opened", stream=stream.stream_id)

        async def read() -> None:
            try:
                async for request in requests:
                    connection.send(stream.on_request(request))
                    self._publish(stream)
            finally:
                connection.outbox.put_nowait(None)  # the writer ends with the stream

        async def write() -> None:
            while (response := await connection.outbox.get()) is not None:
                await context.write(response)

        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(read(), name=f"xds-read-{stream.stream_id}")
                tasks.create_task(write(), name=f"xds-write-{stream.stream_id}")
        except* (grpc.aio.AioRpcError, grpc.aio.UsageError, ConnectionError) as errors:
            log.info("xds.stream_broken", stream=stream.stream_id, error=str(errors.exceptions[0]))
        finally:
            self._connections.discard(connection)
            log.info("xds.stream_closed", stream=stream.stream_id, node=stream.node_id)
