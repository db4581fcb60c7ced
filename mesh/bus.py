"""NATS access: connection with capped, jittered reconnect; typed request/reply; bounded
subscriptions consumed by named tasks; JetStream helpers.

Wire format is MessagePack of the tagged Structs in `mesh.messages`. A request handler
returns its reply Struct or raises `MeshError`, which crosses as an `ErrorReply` and is
raised again on the caller's side as `RemoteError` with the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig

from mesh import errors, messages
from mesh.logs import get_logger
from mesh.subjects import Subjects

log = get_logger("bus")

T = TypeVar("T", bound=msgspec.Struct)
R = TypeVar("R", bound=msgspec.Struct)


class ConnectionState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


def reconnect_delay(
    attempt: int, *, base: float = 0.1, cap: float = 5.0, rnd: random.Random | None = None
) -> float:
    """Capped exponential backoff with full jitter, so reconnects of many clients spread out."""
    r = rnd or random
    return r.uniform(0.0, min(cap, base * (2 ** min(attempt, 16))))


def _pick_server(servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
    fewest = min(s.reconnects for s in servers)
    candidates = [s for s in servers if s.reconnects == fewest]
    chosen = random.choice(candidates)
    attempts = sum(s.reconnects for s in servers)
    return chosen, reconnect_delay(attempts) if attempts else random.uniform(0.0, 0.25)


class Bus:
    """One NATS connection, shared by a process's components."""

    def __init__(self, nc: NATS, subjects: Subjects, name: str):
        self.nc = nc
        self.subjects = subjects
        self.name = name
        self.state = ConnectionState.CONNECTED
        self._reconnect_listeners: list[Callable[[], Awaitable[None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Any] = []
        self._decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}

    # ------------------------------------------------------------ connection

    @classmethod
    async def connect(
        cls,
        servers: Sequence[str],
        *,
        name: str,
        prefix: str = "mesh",
        user: str | None = None,
        password: str | None = None,
        connect_timeout: float = 2.0,
        wait_for_server: bool = False,
    ) -> Bus:
        """Connect to any of `servers`. With `wait_for_server`, keep trying (with backoff)
        until one answers, instead of failing at once."""
        holder: dict[str, Bus] = {}

        async def on_disconnect() -> None:
            if "bus" in holder and holder["bus"].state is not ConnectionState.CLOSED:
                holder["bus"].state = ConnectionState.RECONNECTING
                log.warning("bus.disconnected", name=name)

        async def on_reconnect() -> None:
            if "bus" in holder:
                await holder["bus"]._reconnected()

        async def on_error(e: Exception) -> None:
            log.debug("bus.error", name=name, error=str(e) or type(e).__name__)

        async def on_closed() -> None:
            if "bus" in holder:
                holder["bus"].state = ConnectionState.CLOSED

        attempt = 0
        while True:
            try:
                nc = await nats.connect(
                    servers=list(servers),
                    name=name,
                    user=user,
                    password=password,
                    connect_timeout=connect_timeout,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_to_server_handler=_pick_server,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    error_cb=on_error,
                    closed_cb=on_closed,
                    ping_interval=5,
                    max_outstanding_pings=3,
                )
                break
            except (nats.errors.NoServersError, OSError, TimeoutError) as e:
                if not wait_for_server:
                    raise errors.Unavailable(
                        f"cannot reach NATS at {', '.join(servers)}: {e}"
                    ) from e
                attempt += 1
                await asyncio.sleep(reconnect_delay(attempt, base=0.2, cap=3.0))
        bus = cls(nc, Subjects(prefix), name)
        holder["bus"] = bus
        return bus

    def on_reconnect(self, listener: Callable[[], Awaitable[None]]) -> None:
        """Called after every reconnect: receivers resync state instead of assuming it."""
        self._reconnect_listeners.append(listener)

    async def _reconnected(self) -> None:
        self.state = ConnectionState.CONNECTED
        log.info(
            "bus.reconnected",
            name=self.name,
            server=str(self.nc.connected_url.netloc if self.nc.connected_url else ""),
        )
        for listener in list(self._reconnect_listeners):
            try:
                await listener()
            except Exception as e:  # a listener's failure must not stop the others
                log.warning("bus.reconnect_listener_failed", error=repr(e))

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    async def close(self) -> None:
        """Drain subscriptions (in-flight handlers finish), then close."""
        if self.nc.is_closed:
            return
        self.state = ConnectionState.CLOSED
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.drain(), timeout=5)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.nc.close()
        self.state = ConnectionState.CLOSED

    # ------------------------------------------------------------ codec

    def _decoder(self, tp: Any) -> msgspec.msgpack.Decoder[Any]:
        dec = self._decoders.get(tp)
        if dec is None:
            dec = msgspec.msgpack.Decoder(tp)
            self._decoders[tp] = dec
        return dec

    # ------------------------------------------------------------ publish / request

    async def publish(
        self, subject: str, msg: msgspec.Struct, headers: dict[str, str] | None = None
    ) -> None:
        await self.nc.publish(subject, messages.encode(msg), headers=headers)

    async def request(
        self, subject: str, msg: msgspec.Struct, reply_type: type[R], *, timeout: float = 2.0
    ) -> R:
        """Send a request; return the typed reply or raise RemoteError/BusTimeout/NoResponders."""
        try:
            resp = await self.nc.request(subject, messages.encode(msg), timeout=timeout)
        except nats.errors.NoRespondersError as e:
            raise errors.NoResponders(f"no service answers {subject}") from e
        except nats.errors.TimeoutError as e:
            raise errors.BusTimeout(f"no reply on {subject} within {timeout:g}s") from e
        except nats.errors.ConnectionClosedError as e:
            raise errors.Unavailable("bus connection closed") from e
        try:
            reply = self._decoder(reply_type | messages.ErrorReply).decode(resp.data)
        except msgspec.DecodeError as e:
            raise errors.RemoteError(502, f"malformed reply on {subject}: {e}") from e
        if isinstance(reply, messages.ErrorReply):
            raise errors.RemoteError(
                reply.code, reply.message, field=reply.field, details=reply.details
            )
        return reply

    # ------------------------------------------------------------ serving

    def serve(
        self,
        subject: str,
        request_type: type[T],
        handler: Callable[[T], Awaitable[msgspec.Struct]],
        *,
        queue: str = "",
        concurrency: int = 16,
        max_pending: int = 4096,
    ) -> Awaitable[Any]:
        """Answer requests on `subject` (in a queue group when `queue` is set).

        Returns an awaitable giving the subscription once the server has registered it
        (pass it to `unsubscribe` to stop). Up to `concurrency` handlers run at once;
        requests beyond `max_pending`
        queued are dropped by the client (the caller times out and retries elsewhere).
        """
        dec = self._decoder(request_type)

        async def handle(msg: Msg) -> None:
            try:
                req = dec.decode(msg.data)
            except msgspec.ValidationError as e:
                reply: msgspec.Struct = messages.ErrorReply(
                    400, f"invalid request: {e}", field=_field_of(e)
                )
            except msgspec.DecodeError as e:
                reply = messages.ErrorReply(400, f"undecodable request: {e}")
            else:
                try:
                    reply = await handler(req)
                except errors.MeshError as e:
                    reply = messages.ErrorReply(e.code, e.message, field=e.field, details=e.details)
                except Exception as e:
                    log.exception("bus.handler_failed", subject=subject)
                    reply = messages.ErrorReply(500, f"internal error: {type(e).__name__}: {e}")
            if msg.reply:
                with contextlib.suppress(Exception):
                    await msg.respond(messages.encode(reply))

        return self._consume(subject, queue, handle, concurrency, max_pending)

    def subscribe(
        self,
        subject: str,
        msg_type: Any,
        handler: Callable[[Any, str], Awaitable[None]],
        *,
        queue: str = "",
        concurrency: int = 1,
        max_pending: int = 4096,
    ) -> Awaitable[Any]:
        """Consume published messages: `handler(decoded, subject)`. Undecodable messages
        are logged and skipped; a failing handler does not stop the subscription."""
        dec = self._decoder(msg_type)

        async def handle(msg: Msg) -> None:
            try:
                decoded = dec.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                log.warning("bus.undecodable", subject=msg.subject, error=str(e))
                return
            try:
                await handler(decoded, msg.subject)
            except Exception:
                log.exception("bus.subscriber_failed", subject=msg.subject)

        return self._consume(subject, queue, handle, concurrency, max_pending)

    async def _consume(
        self,
        subject: str,
        queue: str,
        handle: Callable[[Msg], Awaitable[None]],
        concurrency: int,
        max_pending: int,
    ) -> Any:
        sub = await self.nc.subscribe(subject, queue=queue, pending_msgs_limit=max_pending)
        self._subs.append(sub)

        async def consumer() -> None:
            if concurrency <= 1:
                async for msg in sub.messages:
                    await handle(msg)
                return
            gate = asyncio.Semaphore(concurrency)
            async with asyncio.TaskGroup() as tg:
                async for msg in sub.messages:
                    await gate.acquire()

                    async def run(m: Msg = msg) -> None:
                        try:
                            await handle(m)
                        finally:
                            gate.release()

                    tg.create_task(run(), name=f"{self.name}:{subject}:handler")

        task = asyncio.create_task(consumer(), name=f"{self.name}:sub:{subject}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await self.nc.flush()
        return sub

    async def unsubscribe(self, sub: Any) -> None:
        """Stop one subscription; its running handlers finish."""
        if sub in self._subs:
            self._subs.remove(sub)
        with contextlib.suppress(Exception):
            await sub.drain()

    async def unsubscribe_all(self) -> None:
        """Stop taking new messages; handlers already running finish."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.drain()
        self._subs.clear()

    # ------------------------------------------------------------ JetStream

    async def ensure_stream(
        self,
        name: str,
        subjects: list[str],
        *,
        max_age_s: float = 24 * 3600,
        max_bytes: int = 1 << 30,
        replicas: int = 1,
        duplicate_window_s: float = 120.0,
    ) -> None:
        """Create the stream if absent; update its limits if it exists."""
        js = self.nc.jetstream()
        cfg = StreamConfig(
            name=name,
            subjects=subjects,
            max_age=max_age_s,
            max_bytes=max_bytes,
            num_replicas=replicas,
            storage=StorageType.FILE,
            duplicate_window=duplicate_window_s,
        )
        try:
            await js.add_stream(cfg)
        except nats.js.errors.BadRequestError:
            await js.update_stream(cfg)


def _field_of(e: msgspec.ValidationError) -> str:
    text = str(e)
    marker = "- at `$."
    if marker in text:
        return text.split(marker, 1)[1].rstrip("`")
    return ""
