"""NATS access: connection with capped, jittered reconnect; typed request/reply; bounded
subscriptions consumed by named tasks; JetStream helpers.

Wire format is MessagePack of the tagged Structs in `mesh.messages`. A request handler
returns its reply Struct or raises `MeshError`, which crosses as an `ErrorReply` and is
raised again on the caller's side as `RemoteError` with the same code.

Signatures (`mesh.signing`): a control-plane bus `sign_with(signer)` signs what it
publishes, and its replies, on the subjects `SignedSubjects` names; a proxy's bus
`require_signatures(keys)` drops what arrives there without a valid signature (counted,
logged once per subject) before decoding it, and a request whose reply fails raises
`SignatureRejected`. Call sites do not change.
"""

from __future__ import annotations

import asyncio
import collections
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
from mesh.signing import SIGNATURE_HEADER, SignatureRejected, SignedSubjects, Signer, TrustedKeys
from mesh.subjects import Subjects

log = get_logger("bus")

# A connection whose server stopped answering (a cut link: no RST, no FIN) is given up
# after PING_INTERVAL_S * (MAX_OUTSTANDING_PINGS + 1) and nats-py moves to another
# server. That must stay well under a registration's TTL (10 s by default): with 5 s
# and 3 (20 s), sidecars on a NATS node cut off from its cluster missed their
# heartbeats, were deregistered while healthy, and clients answered 503 "no healthy
# upstream" (tests/hosts/ fault 2). Costs one PING/PONG a second per connection.
PING_INTERVAL_S = 1
MAX_OUTSTANDING_PINGS = 2


def dead_connection_detected_within_s() -> float:
    """The longest a cut-off connection goes unnoticed."""
    return float(PING_INTERVAL_S * (MAX_OUTSTANDING_PINGS + 1))


T = TypeVar("T", bound=msgspec.Struct)
R = TypeVar("R", bound=msgspec.Struct)

# called with (kind, subject, reason) for each message dropped for its signature
RejectListener = Callable[[str, str, str], None]


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
        self._served: list[Any] = []  # the subscriptions of `serve`, also in _subs
        self._decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
        self._signed = SignedSubjects(subjects.prefix)
        self._signer: Signer | None = None
        self._trusted: TrustedKeys | None = None
        self._on_reject: RejectListener | None = None
        self._reject_logged: set[str] = set()
        # (kind, reason) -> messages dropped for their signature
        self.signature_rejections: collections.Counter[tuple[str, str]] = collections.Counter()

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
        inbox_prefix: str = "_INBOX",
    ) -> Bus:
        """Connect to any of `servers`. With `wait_for_server`, keep trying (with backoff)
        until one answers, instead of failing at once. `inbox_prefix`: where replies to
        this client's requests go (`mesh.bus_permissions`: each role has its own, so
        one role cannot read another's replies)."""
        holder: dict[str, Bus] = {}
        # set when the server refuses our login during the first connect
        refusals: list[asyncio.Future[str]] = []

        async def on_disconnect() -> None:
            if "bus" in holder and holder["bus"].state is not ConnectionState.CLOSED:
                holder["bus"].state = ConnectionState.RECONNECTING
                log.warning("bus.disconnected", name=name)

        async def on_reconnect() -> None:
            if "bus" in holder:
                await holder["bus"]._reconnected()

        async def on_error(e: Exception) -> None:
            text = str(e) or type(e).__name__
            if "authorization violation" in text.lower():
                if "bus" in holder:  # on a reconnect: nats-py keeps trying
                    log.warning("bus.refused", name=name, user=user, error=text)
                elif refusals and not refusals[-1].done():
                    refusals[-1].set_result(text)
            elif "permissions violation" in text.lower():
                # this client's NATS user may not use a subject (mesh.bus_permissions)
                log.warning("bus.permission_denied", name=name, user=user, error=text)
            else:
                log.debug("bus.error", name=name, error=text)

        async def on_closed() -> None:
            if "bus" in holder:
                holder["bus"].state = ConnectionState.CLOSED

        attempt = 0
        while True:
            nc = NATS()
            # nats-py retries a refused login forever (its error callback sees each
            # refusal): wrong or missing credentials do not get better, so stop there
            refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            refusals.append(refused)
            connecting = asyncio.ensure_future(
                nc.connect(
                    servers=list(servers),
                    name=name,
                    user=user,
                    password=password,
                    inbox_prefix=inbox_prefix,
                    connect_timeout=connect_timeout,  # type: ignore[arg-type]
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_to_server_handler=_pick_server,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    error_cb=on_error,
                    closed_cb=on_closed,
                    ping_interval=PING_INTERVAL_S,
                    max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                )
            )
            waiters: set[asyncio.Future[Any]] = {connecting, refused}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                connecting.cancel()
                raise
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
                with contextlib.suppress(Exception):
                    await nc.close()
                raise errors.Forbidden(
                    f"NATS at {', '.join(servers)} refused the credentials"
                    + (f" of user {user!r}" if user else " (none given; the server needs a user)")
                )
            try:
                connecting.result()
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
        # Every step is bounded with asyncio.wait, which (unlike wait_for) does not
        # wait for a cancelled step to finish: nats-py's drain can swallow a
        # cancellation and keep flushing, and shutdown must never hang on the bus.
        await _bounded(self.nc.drain(), DRAIN_TIMEOUT_S, "drain")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_TIMEOUT_S)
        await _bounded(self.nc.close(), CLOSE_TIMEOUT_S, "close")
        self.state = ConnectionState.CLOSED

    # ------------------------------------------------------------ signatures

    def sign_with(self, signer: Signer) -> None:
        """Sign what this bus publishes and replies on the signed subjects (the control
        plane)."""
        self._signer = signer

    def require_signatures(
        self, keys: TrustedKeys, on_reject: RejectListener | None = None
    ) -> None:
        """From now on, drop messages on the signed subjects (and refuse replies to
        signed requests) unless `keys` verifies them; `keys` may change later (a new
        trust bundle). Until `keys` holds a key, only the bootstrap replies (`ca.sign`,
        `ca.bundle.get`) pass, unverified: they bring the first key."""
        self._trusted = keys
        self._on_reject = on_reject

    @property
    def verifying(self) -> bool:
        return self._trusted is not None

    def _signature_headers(
        self, subject: str, payload: bytes, headers: dict[str, str] | None
    ) -> dict[str, str]:
        assert self._signer is not None
        return {**(headers or {}), SIGNATURE_HEADER: self._signer.sign(subject, payload)}

    def _check_signature(self, kind: str, msg: Msg, about: str) -> SignatureRejected | None:
        """None if `msg` may be used; else count it, log once per `about` (the subject,
        or the request subject of a reply), and say why."""
        assert self._trusted is not None
        header = msg.headers.get(SIGNATURE_HEADER) if msg.headers else None
        try:
            self._trusted.verify(msg.subject, msg.data, header)
        except SignatureRejected as e:
            self._rejected(kind, about, e)
            return e
        return None

    def _rejected(self, kind: str, subject: str, e: SignatureRejected) -> None:
        self.signature_rejections[(kind, e.reason)] += 1
        if subject not in self._reject_logged:
            self._reject_logged.add(subject)
            log.warning(
                "bus.signature_rejected", subject=subject, kind=kind, reason=e.reason,
                detail=e.message, note="logged once per subject; counted every time",
            )  # fmt: skip
        if self._on_reject is not None:
            try:
                self._on_reject(kind, subject, e.reason)
            except Exception:  # a metrics hook must not break message handling
                log.exception("bus.reject_listener_failed")

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
        payload = messages.encode(msg)
        if self._signer is not None and self._signed.published_kind(subject):
            headers = self._signature_headers(subject, payload, headers)
        await self.nc.publish(subject, payload, headers=headers)

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
        if self._trusted is not None:
            self._check_reply(subject, resp)
        try:
            reply = self._decoder(reply_type | messages.ErrorReply).decode(resp.data)
        except msgspec.DecodeError as e:
            raise errors.RemoteError(502, f"malformed reply on {subject}: {e}") from e
        if isinstance(reply, messages.ErrorReply):
            raise errors.RemoteError(
                reply.code, reply.message, field=reply.field, details=reply.details
            )
        return reply

    def _check_reply(self, subject: str, resp: Msg) -> None:
        assert self._trusted is not None
        kind = self._signed.reply_kind(subject)
        if kind is None or (not self._trusted.ready and self._signed.bootstrap(subject)):
            return
        rejected = self._check_signature(kind, resp, f"reply to {subject}")
        if rejected is not None:
            raise SignatureRejected(
                rejected.reason, f"the reply to {subject} failed verification: {rejected}"
            )

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

        A subject served outside a queue group is served once per bus: two such
        subscriptions of one connection each receive every request, and nats-server
        (`allow_responses`) then refuses both replies, so the requester gets none.
        Serving it again before `unsubscribe` raises Conflict instead.
        """
        if not queue and any(s.subject == subject and not s.queue for s in self._served):
            raise errors.Conflict(f"{self.name} already serves {subject}")
        dec = self._decoder(request_type)
        signed_replies = self._signed.reply_kind(subject) is not None

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
                data = messages.encode(reply)
                # signed over the requester's reply subject: unique to this request
                headers = (
                    self._signature_headers(msg.reply, data, None)
                    if signed_replies and self._signer is not None
                    else None
                )
                with contextlib.suppress(Exception):
                    await self.nc.publish(msg.reply, data, headers=headers)

        return self._consume(subject, queue, handle, concurrency, max_pending, served=True)

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
            if self._trusted is not None:
                kind = self._signed.published_kind(msg.subject)
                if kind is not None and self._check_signature(kind, msg, msg.subject) is not None:
                    return
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
        *,
        served: bool = False,
    ) -> Any:
        sub = await self.nc.subscribe(subject, queue=queue, pending_msgs_limit=max_pending)
        self._subs.append(sub)
        if served:
            self._served.append(sub)

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
        try:
            # Twice: nats-py writes flush's PING straight to the socket, ahead of the
            # SUB still in its pending buffer, so the first PONG may come back before
            # the server has the subscription; its flusher runs while that PING is in
            # flight, so the second PING leaves after the SUB.
            await self.nc.flush()
            await self.nc.flush()
        except BaseException:
            # the caller never gets `sub` to unsubscribe: do not leave it behind (a
            # reconnect would subscribe it again)
            await self.unsubscribe(sub)
            raise
        return sub

    async def unsubscribe(self, sub: Any) -> None:
        """Stop one subscription for good, whatever the connection is doing: the client
        forgets it at once, so no reconnect subscribes it again, and tells the server
        when connected. Handlers already running finish; messages queued behind them
        are dropped (a requester retries or times out).

        Not nats-py's `drain()`: that forgets the subscription only after a PING/PONG
        round trip, and a reconnect drops the PONG it waits for. The drain then fails
        and the reconnect subscribes again what was meant to be gone: a config leader
        deposed while its connection was cut kept a `config.proxystatus` subscription,
        and once it led again its two subscriptions got no reply through (the server's
        `allow_responses` refuses both replies to a request one connection received
        twice) - docs/architecture.md §2.2."""
        if sub in self._subs:
            self._subs.remove(sub)
        if sub in self._served:
            self._served.remove(sub)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    async def unsubscribe_all(self) -> None:
        """Stop taking new messages; handlers already running finish."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.drain()
        self._subs.clear()
        self._served.clear()

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


DRAIN_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 2.0


async def _bounded(step: Awaitable[object], timeout: float, what: str) -> None:
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        log.warning("bus.shutdown_step_timed_out", step=what, timeout_s=timeout)
        return
    _retrieve(task)


def _retrieve(task: asyncio.Future[object]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a failed drain/close at shutdown is not news
