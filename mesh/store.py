"""etcd access (aetcd): get/put/delete, transactions, leases, and a watch that resumes
from the last revision it saw after a disconnect or an etcd restart.

Keys are strings under a configurable prefix (default `/mesh/`, docs/architecture.md
§4); values are bytes. Every aetcd/gRPC failure is translated here, where it enters, into
`StoreError` (etcd unreachable) — callers never see gRPC types. With several etcd
endpoints, a connection failure moves the client to the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

import aetcd
import aetcd.exceptions as aex
from aetcd import rpc

from mesh import errors
from mesh.logs import get_logger

log = get_logger("store")


@dataclass(frozen=True, slots=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int  # mod_revision of the event (the deletion's revision for deletes)
    create_revision: int = 0
    lease: int = 0


class WatchCompacted(errors.StoreError):
    """The revision to resume from was compacted: the caller must relist and rewatch."""

    def __init__(self, compacted_revision: int):
        super().__init__(f"revision compacted below {compacted_revision}")
        self.compacted_revision = compacted_revision


# ---------------------------------------------------------------- transactions


@dataclass(frozen=True, slots=True)
class Compare:
    key: str
    target: Literal["create", "mod", "version", "value"]
    op: Literal["==", "!=", "<", ">"]
    value: int | bytes


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Get:
    key: str
    prefix: bool = False


Op = Put | Delete | Get


@dataclass(slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    # for each Get op of the branch that ran, its key-values
    gets: list[list[KV]] = field(default_factory=list)


_CMP_OPS = {
    "==": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}


def prefix_range_end(prefix: bytes) -> bytes:
    """The etcd range end that covers every key starting with `prefix`."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def _kv(raw: Any) -> KV:
    return KV(
        key=raw.key.decode(),
        value=bytes(raw.value),
        create_revision=raw.create_revision,
        mod_revision=raw.mod_revision,
        version=raw.version,
        lease=raw.lease,
    )


def _compare_msg(c: Compare) -> Any:
    msg = rpc.Compare(key=c.key.encode(), result=_CMP_OPS[c.op])
    if c.target == "create":
        msg.target = rpc.Compare.CREATE
        msg.create_revision = int(c.value)  # type: ignore[arg-type]
    elif c.target == "mod":
        msg.target = rpc.Compare.MOD
        msg.mod_revision = int(c.value)  # type: ignore[arg-type]
    elif c.target == "version":
        msg.target = rpc.Compare.VERSION
        msg.version = int(c.value)  # type: ignore[arg-type]
    else:
        msg.target = rpc.Compare.VALUE
        msg.value = c.value if isinstance(c.value, bytes) else str(c.value).encode()
    return msg


def _op_msg(op: Op) -> Any:
    if isinstance(op, Put):
        return rpc.RequestOp(
            request_put=rpc.PutRequest(key=op.key.encode(), value=op.value, lease=op.lease)
        )
    if isinstance(op, Delete):
        key = op.key.encode()
        req = rpc.DeleteRangeRequest(key=key, range_end=prefix_range_end(key) if op.prefix else b"")
        return rpc.RequestOp(request_delete_range=req)
    key = op.key.encode()
    return rpc.RequestOp(
        request_range=rpc.RangeRequest(
            key=key, range_end=prefix_range_end(key) if op.prefix else b""
        )
    )


def _endpoint(url: str) -> tuple[str, int]:
    u = urlparse(url if "://" in url else f"http://{url}")
    return u.hostname or "127.0.0.1", u.port or 2379


# what an etcd member answers (as gRPC status UNKNOWN, which aetcd does not map to a
# connection error) when it cannot serve: cut off from its cluster's quorum it waits
# for a leader until the request's deadline. Seen in tests/hosts/ partitions.
_MEMBER_UNAVAILABLE = (
    "context deadline exceeded",
    "etcdserver: no leader",
    "etcdserver: request timed out",
    "etcdserver: leader changed",
    "etcdserver: too many requests",
)


# aetcd's watcher can wait forever: creating a watch and cancelling one both take its
# lock and put on a bounded request queue, and a stream frozen by a partition frees
# neither. An election candidate cancels a watch every TTL (its wait for a vacancy)
# and a deposed leader's work cancels its own, both after their deadline has fired:
# nothing would end such a wait. (Found reading aetcd while chasing tests/hosts/
# faults 2-3, whose stuck registry election had another cause: `_call`.) A watch's
# creation gets the client's timeout and one second; its cancellation and a client's
# close get these; past them the client is given up (docs/architecture.md §2.2).
WATCH_CANCEL_S = 2.0
CLIENT_CLOSE_S = 2.0


async def _bounded(step: Any, timeout: float) -> bool:
    """Run `step` (an awaitable) for at most `timeout`; False if it had to be left
    behind (cancelled, not waited for: what it waits on may never answer)."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        return False
    _retrieve(task)
    return True


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # a failed cancel or close of a client being given up is not news


def interrupted_by_channel_close() -> bool:
    """Is the CancelledError being handled one nobody asked this task for? grpc.aio
    raises CancelledError in every call in flight on a channel that is closed, and one
    Store's client is shared by all its callers: a failover by one (a watch
    interrupted) cut the others' calls. Let through as a cancellation, it ended the
    election loop of a registry replica silently, its task merely "cancelled": no
    replica led for minutes (tests/hosts/ faults 2-3, docs/architecture.md §2.2)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def member_unavailable(message: str) -> bool:
    """Does etcd's error `message` say this member cannot serve now (so another might)?"""
    return any(m in message for m in _MEMBER_UNAVAILABLE)


class Store:
    """An etcd client bound to a key prefix, with failover across endpoints."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str = "/mesh/",
        user: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
    ):
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = list(endpoints)
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._user = user
        self._password = password
        self._timeout = timeout
        self._index = random.randrange(len(self.endpoints))
        self._client: aetcd.Client | None = None
        self._lock = asyncio.Lock()

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    # ------------------------------------------------------------ connection

    async def _get_client(self) -> aetcd.Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                host, port = _endpoint(self.endpoints[self._index])
                client = aetcd.Client(
                    host=host,
                    port=port,
                    username=self._user,
                    password=self._password,
                    timeout=self._timeout,  # type: ignore[arg-type]
                )
                try:
                    await client.connect()
                except aex.ClientError as e:
                    # nothing was sent there: the next caller tries the next endpoint
                    # (else a client whose failover landed on a dead member stays on it)
                    self._index = (self._index + 1) % len(self.endpoints)
                    with contextlib.suppress(Exception):
                        await client.close()
                    raise errors.StoreError(f"cannot connect to etcd at {host}:{port}: {e}") from e
                self._client = client
            return self._client

    async def _connected_client(self) -> aetcd.Client:
        """A client on an endpoint that accepts us: one that refuses the connection is
        skipped for the next (safe for any call, transactions too: nothing was sent)."""
        for _ in range(len(self.endpoints) - 1):
            with contextlib.suppress(errors.StoreError):
                return await self._get_client()
        return await self._get_client()

    async def _failover(self, failed: aetcd.Client | None) -> None:
        async with self._lock:
            if self._client is not failed or failed is None:
                return
            self._client = None
            self._index = (self._index + 1) % len(self.endpoints)
        if not await _bounded(failed.close(), CLIENT_CLOSE_S):
            log.warning("store.close_abandoned", timeout_s=CLIENT_CLOSE_S)

    async def _call(self, fn: Any, *, retries: int | None = None) -> Any:
        """Run `fn(client)`; on a connection failure, move to the next endpoint and retry."""
        attempts = retries if retries is not None else max(2, len(self.endpoints))
        last: Exception | None = None
        for attempt in range(attempts):
            client = await self._connected_client()
            try:
                return await fn(client)
            except (aex.ConnectionFailedError, aex.ConnectionTimeoutError) as e:
                last = e
                await self._failover(client)
                if attempt + 1 < attempts:
                    await asyncio.sleep(0.05 * (attempt + 1))
            except aex.UnauthenticatedError as e:
                # etcd forgets a token unused for --auth-token-ttl (5 min): authenticate
                # again on a fresh connection. Wrong credentials stay an error.
                if "invalid auth token" in str(e) and attempt + 1 < attempts:
                    last = e
                    await self._failover(client)
                    continue
                raise errors.StoreError(f"etcd refused our credentials: {e}") from e
            except aex.ClientError as e:
                if member_unavailable(str(e)):
                    # this member cannot serve (no quorum on its side of a partition):
                    # the next call goes to another one. Not retried here: a write that
                    # timed out on the server may still commit, so it is not sent twice.
                    await self._failover(client)
                raise errors.StoreError(f"etcd request failed: {e}") from e
            except rpc.AioRpcError as e:
                last = e
                await self._failover(client)
            except asyncio.CancelledError:
                if not interrupted_by_channel_close():
                    raise
                # another caller's failover closed this client under our call
                last = errors.StoreError("its connection was closed (failover)")
                await self._failover(client)
                if attempt + 1 < attempts:
                    continue
                raise errors.StoreError(
                    "etcd request interrupted: its connection was closed (failover)"
                ) from None
        raise errors.StoreError(f"etcd unavailable: {last}")

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await _bounded(client.close(), CLIENT_CLOSE_S)

    # ------------------------------------------------------------ key-value

    async def get(self, key: str) -> KV | None:
        async def op(c: aetcd.Client) -> Any:
            return await c.get(key.encode())

        got = await self._call(op)
        return None if got is None else _kv(got)

    async def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """All keys under `prefix`, sorted by key, and the store revision they reflect."""

        async def op(c: aetcd.Client) -> Any:
            return await c.get_prefix(prefix.encode(), sort_order="ascend", sort_target="key")

        got = await self._call(op)
        return [_kv(kv) for kv in got.kvs], got.header.revision

    async def revision(self) -> int:
        """The store's current revision."""

        async def op(c: aetcd.Client) -> Any:
            req = rpc.RangeRequest(key=self.prefix.encode(), limit=1, count_only=True)
            return await c.kvstub.Range(req, timeout=self._timeout, metadata=c.metadata)

        return int((await self._call(op)).header.revision)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write a key; returns the revision of the write."""

        async def op(c: aetcd.Client) -> Any:
            return await c.put(key.encode(), value, lease=lease or None)

        return int((await self._call(op)).header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> tuple[int, int]:
        """Delete a key (or a prefix); returns (number deleted, revision)."""

        async def op(c: aetcd.Client) -> Any:
            k = key.encode()
            req = rpc.DeleteRangeRequest(key=k, range_end=prefix_range_end(k) if prefix else b"")
            return await c.kvstub.DeleteRange(req, timeout=self._timeout, metadata=c.metadata)

        resp = await self._call(op)
        return int(resp.deleted), int(resp.header.revision)

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """One atomic transaction: `success` ops if every comparison holds, else `failure`."""
        request = rpc.TxnRequest(
            compare=[_compare_msg(c) for c in compare],
            success=[_op_msg(o) for o in success],
            failure=[_op_msg(o) for o in failure],
        )

        async def op(c: aetcd.Client) -> Any:
            return await c.kvstub.Txn(request, timeout=self._timeout, metadata=c.metadata)

        # a transaction is not blindly retried on another endpoint: it may have applied
        resp = await self._call(op, retries=1)
        gets = [
            [_kv(kv) for kv in r.response_range.kvs]
            for r in resp.responses
            if r.WhichOneof("response") == "response_range"
        ]
        return TxnResult(
            succeeded=bool(resp.succeeded), revision=int(resp.header.revision), gets=gets
        )

    # ------------------------------------------------------------ leases

    async def grant_lease(self, ttl: int) -> int:
        async def op(c: aetcd.Client) -> Any:
            return await c.lease(ttl)

        return int((await self._call(op)).id)

    async def keepalive(self, lease_id: int) -> int:
        """Refresh a lease once; returns its TTL. Raises NotFound when it has expired."""

        async def op(c: aetcd.Client) -> Any:
            return await c.refresh_lease(lease_id)

        reply = await self._call(op)
        if reply is None or reply.TTL <= 0:
            raise errors.NotFound(f"lease {lease_id:x} has expired")
        return int(reply.TTL)

    async def revoke_lease(self, lease_id: int) -> None:
        async def op(c: aetcd.Client) -> Any:
            try:
                await c.revoke_lease(lease_id)
            except aex.ClientError as e:
                if "not found" not in str(e):
                    raise

        await self._call(op)

    # ------------------------------------------------------------ watch

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Yield every change under `prefix` from `start_revision` on, forever.

        After a disconnect or an etcd restart the watch is re-created from the last
        revision seen, so no event is missed and none is delivered twice (events of a
        multi-key transaction share a revision: those already delivered are skipped).
        Raises WatchCompacted when that revision is gone: relist and watch again.
        """
        resume_from = start_revision
        seen_at_last: set[str] = set()
        last_rev = 0
        backoff = 0
        while True:
            client: aetcd.Client | None = None
            try:
                client = await self._connected_client()
                try:
                    async with asyncio.timeout(self._timeout + 1):
                        watch = await client.watch_prefix(
                            prefix.encode(), start_revision=resume_from
                        )
                except TimeoutError:
                    raise errors.StoreError(
                        f"etcd did not create a watch within {self._timeout + 1:g}s"
                    ) from None
                backoff = 0
                try:
                    async for ev in watch:
                        rev = ev.kv.mod_revision
                        key = ev.kv.key.decode()
                        if rev == last_rev and key in seen_at_last:
                            continue
                        if rev != last_rev:
                            last_rev, seen_at_last = rev, set()
                        seen_at_last.add(key)
                        resume_from = rev
                        yield WatchEvent(
                            kind="put" if ev.kind == "PUT" else "delete",
                            key=key,
                            value=bytes(ev.kv.value),
                            revision=rev,
                            create_revision=ev.kv.create_revision,
                            lease=ev.kv.lease,
                        )
                finally:
                    # bounded, also when cancelled: the caller's timeout fired already
                    if not await _bounded(watch.cancel(), WATCH_CANCEL_S):
                        log.warning(
                            "store.watch_cancel_abandoned", prefix=prefix, timeout_s=WATCH_CANCEL_S
                        )
                        await self._failover(client)
                # the iterator ended without error: the stream was shut down; re-create it
            except aex.RevisionCompactedError as e:
                raise WatchCompacted(e.compacted_revision) from e
            except asyncio.CancelledError:
                if not interrupted_by_channel_close():
                    raise
                backoff += 1
                log.warning(
                    "store.watch_interrupted", prefix=prefix, resume_from=resume_from,
                    error="its connection was closed (failover)",
                )  # fmt: skip
                if client is not None:
                    await self._failover(client)
                await asyncio.sleep(min(2.0, 0.05 * 2**backoff) * random.uniform(0.5, 1.0))
            except (aex.ClientError, rpc.AioRpcError, errors.StoreError) as e:
                backoff += 1
                log.warning(
                    "store.watch_interrupted", prefix=prefix, resume_from=resume_from, error=str(e)
                )
                if client is not None:
                    await self._failover(client)
                await asyncio.sleep(min(2.0, 0.05 * 2**backoff) * random.uniform(0.5, 1.0))
