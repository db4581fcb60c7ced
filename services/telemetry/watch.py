"""`BucketWatch`: follows a JetStream KV bucket from a revision on, and resumes where it
left off when asked (after the bus reconnected).

nats-py's `KeyValue.watch` starts only at each key's latest value, and after a
nats-server restart (which loses its in-memory ordered consumer) it resumes only once
two idle heartbeats (5 s each) went missing: the mesh-wide totals then lagged the
applied batches by 10-20 s. Here the consumer sends a heartbeat every `heartbeat_s`
(nats-py recreates a silent one after two), and `restart()` recreates it at once, from
the revision after the last one handed out; every revision comes out once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from mesh.logs import get_logger

log = get_logger("telemetry.watch")

KV_OPERATION = "KV-Operation"
MARKER_REASON = "Nats-Marker-Reason"  # nats-server 2.11+: TTL / max-age expiry markers
_MARKERS = frozenset({"MaxAge", "Purge", "Remove"})
_RESTART = -1  # queued by `restart()`


@dataclass(frozen=True, slots=True)
class BucketUpdate:
    key: str
    revision: int
    value: bytes | None  # None: deleted or purged


def bucket_update(msg: Msg, prefix: str) -> BucketUpdate | None:
    """The KV update a message of the bucket's stream carries (None: not one)."""
    if not msg.subject.startswith(prefix):
        return None
    headers = msg.headers or {}
    op = headers.get(KV_OPERATION)
    if op is None and MARKER_REASON in headers:
        if headers[MARKER_REASON] not in _MARKERS:
            return None  # a reason from a later server: not an update we understand
        op = "PURGE"
    revision = msg.metadata.sequence.stream
    removed = op in ("DEL", "PURGE")
    return BucketUpdate(msg.subject[len(prefix) :], revision, None if removed else msg.data)


class BucketWatch:
    """Every update of bucket `bucket`, in revision order, through `next()`."""

    def __init__(self, js: Any, bucket: str, *, heartbeat_s: float = 1.0, retry_s: float = 0.5):
        self._js = js
        self.bucket = bucket
        self.heartbeat_s = heartbeat_s
        self.retry_s = retry_s
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._queue: asyncio.Queue[tuple[int, BucketUpdate | None]] = asyncio.Queue()
        self._generation = 0  # messages of an older subscription are dropped
        self._sub: Any = None
        self.revision = 0  # the last revision handed out
        self.restarts = 0

    async def start(self) -> int:
        """Subscribe from the beginning. Returns the bucket's last revision now: a reader
        that has seen it has seen the bucket's content as of now."""
        info = await self._js.stream_info(self._stream)
        await self._subscribe()
        return int(info.state.last_seq)

    def restart(self) -> None:
        """Recreate the consumer from the revision after the last one handed out (its
        server may have lost it); done by the reader, in `next()`."""
        self._queue.put_nowait((_RESTART, None))

    async def next(self) -> BucketUpdate:
        while True:
            generation, update = await self._queue.get()
            if generation == _RESTART:
                await self._resubscribe()
            elif (
                update is not None
                and generation == self._generation
                and update.revision > self.revision
            ):
                self.revision = update.revision
                return update

    async def stop(self) -> None:
        self._generation += 1
        await self._unsubscribe()

    # ------------------------------------------------------------ internals

    async def _subscribe(self) -> None:
        self._generation += 1
        generation = self._generation
        prefix = self._prefix
        put = self._queue.put_nowait

        async def on_message(msg: Msg) -> None:
            put((generation, bucket_update(msg, prefix)))

        if self.revision:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.revision + 1
            )
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        self._sub = await self._js.subscribe(
            f"{prefix}>",
            stream=self._stream,
            cb=on_message,
            ordered_consumer=True,
            idle_heartbeat=self.heartbeat_s,
            config=config,
            inactive_threshold=300.0,
        )

    async def _resubscribe(self) -> None:
        """Until it works: right after a restart, the server may still be loading
        JetStream. Restarts queued meanwhile are one and the same."""
        await self._unsubscribe()
        while True:
            try:
                await self._subscribe()
                break
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as e:
                log.info("telemetry.watch_retry", bucket=self.bucket, error=repr(e))
                await asyncio.sleep(self.retry_s)
        self.restarts += 1
        log.info("telemetry.watch_resumed", bucket=self.bucket, after_revision=self.revision)

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
