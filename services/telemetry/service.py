"""The telemetry service: consumes the `MESH_TELEMETRY` stream; serves Prometheus
metrics, the service graph, traces, access records and a dashboard.

Exactly-once, mesh-wide metrics with N replicas
-----------------------------------------------
- Proxies publish metric deltas as numbered batches (`mesh.telemetry.MetricBatch`,
  reporter + seq) with `Nats-Msg-Id`, so JetStream drops re-sends within its duplicate
  window.
- Every replica pulls from one durable consumer (`telemetry-metrics`, explicit ack):
  each message goes to one replica, and a message not acknowledged (replica crashed,
  stopped, or lost a race) is delivered again. A restarted service resumes where the
  consumer left off, so it catches up on what was published while it was down.
- A replica applies a reporter's batches by one compare-and-set write of that
  reporter's ledger (`ledger.py`) in the JetStream KV bucket `<STREAM>_TOTALS` (history
  1): the ledger holds the reporter's cumulative totals and the batch numbers already
  in them. The message is acknowledged only after that write. A redelivered batch is
  found in the ledger and only acknowledged; two replicas racing on one reporter
  conflict on the write and the loser re-reads. No (reporter, seq) is counted twice.
- Every replica watches the bucket and folds its updates, in order, into mesh-wide
  totals (`MeshMirror`), so every replica's `/metrics` shows the same exact mesh total
  (`istio_*` series, no replica label), which survives restarts of any or all replicas.
  After the bus reconnects, the watch resumes from the last revision folded
  (`watch.py`): a restarted nats-server has lost the watch's consumer.
- The leader folds ledgers of proxies idle past the stream's retention into a
  per-workload archive (see `ledger.py`); every step is a compare-and-set, so a
  deposed leader cannot double count.

The totals live in JetStream, next to the stream they are derived from, and not in
etcd: they change every second per proxy, which would grow etcd's history (and its
quota) with every request; etcd keeps only the election.

Spans and access records are read-only views: every replica reads them through its own
ordered consumer (starting `history-s` back), so any replica answers `/api/traces`
and `/api/access` completely.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from aiohttp import web
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from mesh import errors
from mesh.bus import reconnect_delay
from mesh.service import ControlPlaneService, ServiceConfig
from mesh.telemetry import (
    AccessBatch,
    MetricBatch,
    SpanBatch,
    stream_name,
    valid_reporter,
)
from services.telemetry.api import Views, add_api_routes
from services.telemetry.exporter import ExportStatsCollector, MetricsExporter, OtlpExporter
from services.telemetry.ledger import (
    ArchiveState,
    MeshMirror,
    ReporterState,
    apply_batches,
    archive_key,
    fold,
    fresh_state,
    prune_tombstones,
    reporter_key,
)
from services.telemetry.lookups import BusLookups
from services.telemetry.otlp import ExportQueue
from services.telemetry.otlp_transport import OtlpTransport, transport_for
from services.telemetry.settings import TelemetrySettings
from services.telemetry.timeseries import SeriesRing, detail_snapshot
from services.telemetry.views import AccessEntry, AccessLog, GraphWindow, TraceIndex, edge_snapshot
from services.telemetry.watch import BucketUpdate, BucketWatch

T = TypeVar("T")
# JetStream API calls at start-up are retried this many times (a few seconds of backoff)
JETSTREAM_SETUP_ATTEMPTS = 12

DURABLE = "telemetry-metrics"
# spans for OTLP export: one durable consumer shared by the replicas (exporter.py)
OTLP_DURABLE = "telemetry-otlp"
MAX_ATTEMPTS = 8
SYNC_TIMEOUT_S = 30.0  # folding the bucket's content before serving
# spans and access records: the views' consumers send a heartbeat this often, and
# nats-py recreates one silent for two (after a nats-server restart)
VIEWS_HEARTBEAT_S = 1.0
_metric_decoder = msgspec.msgpack.Decoder(MetricBatch)
_span_decoder = msgspec.msgpack.Decoder(SpanBatch)
_access_decoder = msgspec.msgpack.Decoder(AccessBatch)
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def _valid_token(value: str) -> bool:
    return 0 < len(value) <= 63 and set(value) <= _TOKEN_CHARS


class LedgerTooLarge(errors.MeshError):
    """A reporter sends more series than one ledger value can hold."""

    code = 413


class _TotalsCollector(Collector):
    """Renders the mesh-wide totals in `/metrics`, with Istio's names and labels."""

    def __init__(self, mirror: MeshMirror):
        self.mirror = mirror

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        return self.mirror.total.families()


class TelemetryService(ControlPlaneService):
    name = "telemetry"
    has_leader_work = True

    def __init__(self, config: ServiceConfig):
        super().__init__(config)
        self.settings = TelemetrySettings.from_options(config.options)
        self.mirror = MeshMirror()
        self.views = Views(
            graph=GraphWindow(self.settings.graph_window_s),
            traces=TraceIndex(self.settings.max_traces),
            access=AccessLog(self.settings.access_records),
            series=SeriesRing(max_buckets=int(self.settings.series_buckets)),
            lookups=BusLookups(lambda: self.bus),
            clock=time.time,
        )
        # writes (own, or re-read after a conflict) newer than what the watch delivered
        self._overlay: dict[str, tuple[int, ReporterState | ArchiveState | None]] = {}
        self._apply_gate = asyncio.Semaphore(64)
        self.kv: KeyValue
        self._pull: Any = None
        self._watch: BucketWatch
        r = self.registry
        self.batches = Counter(
            "meshwork_telemetry_batches_total",
            "Metric batches taken from the stream by this replica, by outcome",
            ["outcome"],
            registry=r,
        )
        self.requests_applied = Counter(
            "meshwork_telemetry_requests_applied_total",
            "istio_requests_total increments this replica applied",
            registry=r,
        )
        self.conflicts = Counter(
            "meshwork_telemetry_ledger_conflicts_total",
            "Ledger writes that lost a compare-and-set race and were retried",
            registry=r,
        )
        self.records = Counter(
            "meshwork_telemetry_records_total",
            "Spans and access records read, by kind",
            ["kind"],
            registry=r,
        )
        self.apply_seconds = Histogram(
            "meshwork_telemetry_apply_seconds",
            "Time to apply one fetched set of batches",
            registry=r,
        )
        self.retired = Counter(
            "meshwork_telemetry_reporters_retired_total",
            "Idle reporter ledgers folded into archives",
            registry=r,
        )
        Gauge(
            "meshwork_telemetry_reporters", "Reporter ledgers in the mesh-wide totals", registry=r
        ).set_function(lambda: len(self.mirror.reporters))
        Gauge(
            "meshwork_telemetry_series", "Series in the mesh-wide totals", registry=r
        ).set_function(lambda: len(self.mirror.total))
        Gauge("meshwork_telemetry_traces", "Traces held for /api/traces", registry=r).set_function(
            lambda: len(self.views.traces)
        )
        r.register(_TotalsCollector(self.mirror))
        self.exporter: OtlpExporter | None = None
        self.metrics_exporter: MetricsExporter | None = None
        self._otlp_pull: Any = None
        s = self.settings
        if s.otlp_endpoint:
            queue = ExportQueue(
                capacity=s.otlp_buffer_spans,
                batch_spans=s.otlp_batch_spans,
                max_attempts=s.otlp_max_attempts,
                backoff_cap_s=s.otlp_backoff_cap_s,
                jitter=lambda: random.uniform(0.8, 1.2),
            )
            self.exporter = OtlpExporter(self._otlp_transport(), queue, log=self.log)
            self.metrics_exporter = MetricsExporter(
                self._otlp_transport(),
                lambda: self.mirror.total.copy(),
                interval_s=s.otlp_metrics_interval_s,
                log=self.log,
            )
            r.register(ExportStatsCollector(queue, self.metrics_exporter.stats))

    def _otlp_transport(self) -> OtlpTransport:
        s = self.settings
        return transport_for(
            s.otlp_protocol, s.otlp_endpoint, s.otlp_header_pairs, timeout_s=s.otlp_timeout_s
        )

    @property
    def stream(self) -> str:
        return stream_name(self.bus.subjects.prefix)

    def health_details(self) -> dict[str, object]:
        return {
            "reporters": len(self.mirror.reporters),
            "series": len(self.mirror.total),
            "totals_revision": self.mirror.revision,
        }

    def add_routes(self, app: web.Application) -> None:
        add_api_routes(app, self.views)

    # ------------------------------------------------------------ setup

    async def _once_jetstream_answers(
        self, step: str, call: Callable[[], Coroutine[Any, Any, T]]
    ) -> T:
        """`call()`, again (with backoff) while JetStream does not answer: a NATS cluster
        that has just started may still be electing its JetStream leaders."""
        attempt = 0
        while True:
            try:
                return await call()
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                    nats.js.errors.ServiceUnavailableError) as e:  # fmt: skip
                attempt += 1
                if attempt >= JETSTREAM_SETUP_ATTEMPTS:
                    raise
                self.log.warning("telemetry.jetstream_not_ready", step=step, error=repr(e))
                await asyncio.sleep(reconnect_delay(attempt, base=0.2, cap=2.0))

    async def _bucket(self, js: Any, bucket: str) -> KeyValue:
        replicas = self.settings.stream_replicas
        try:
            return await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket, history=1, replicas=replicas, storage=StorageType.FILE
                )
            )
        except nats.js.errors.BadRequestError:
            return await js.key_value(bucket)

    async def setup(self) -> None:
        s = self.settings
        prefix = self.bus.subjects.prefix
        await self._once_jetstream_answers(
            "stream",
            lambda: self.bus.ensure_stream(
                self.stream,
                [self.bus.subjects.telemetry_all],
                max_age_s=s.stream_max_age_s,
                max_bytes=s.stream_max_bytes,
                replicas=s.stream_replicas,
                duplicate_window_s=s.duplicate_window_s,
            ),
        )
        js = self.bus.nc.jetstream()
        bucket = f"{self.stream}_TOTALS"
        self.kv = await self._once_jetstream_answers("bucket", lambda: self._bucket(js, bucket))
        self._watch = BucketWatch(js, bucket)
        await self._sync_mirror(await self._once_jetstream_answers("watch", self._watch.start))
        self.bus.on_reconnect(self._on_reconnect)
        self._pull = await self._once_jetstream_answers(
            "consumer",
            lambda: js.pull_subscribe(
                f"{prefix}.telemetry.metrics.>",
                durable=DURABLE,
                stream=self.stream,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=s.ack_wait_s,
                    max_ack_pending=50_000,
                    deliver_policy=DeliverPolicy.ALL,
                ),
            ),
        )
        if self.exporter is not None:
            self._otlp_pull = await self._once_jetstream_answers(
                "otlp consumer",
                lambda: js.pull_subscribe(
                    f"{prefix}.telemetry.spans.>",
                    durable=OTLP_DURABLE,
                    stream=self.stream,
                    config=ConsumerConfig(
                        ack_policy=AckPolicy.EXPLICIT,
                        ack_wait=s.ack_wait_s,
                        # spans recorded from when export was first configured
                        deliver_policy=DeliverPolicy.NEW,
                    ),
                ),
            )
        self.log.info(
            "telemetry.consuming",
            stream=self.stream,
            durable=DURABLE,
            bucket=bucket,
            reporters=len(self.mirror.reporters),
            otlp=self.exporter is not None,
        )

    async def _sync_mirror(self, revision: int) -> None:
        """Fold the bucket's content up to `revision` (its last one) before serving."""
        deadline = asyncio.get_running_loop().time() + SYNC_TIMEOUT_S
        while self._watch.revision < revision:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                update = await asyncio.wait_for(self._watch.next(), max(remaining, 0.0))
            except TimeoutError:
                # e.g. the last revision was removed meanwhile: serve, keep folding
                self.log.warning(
                    "telemetry.mirror_sync_incomplete",
                    revision=self._watch.revision,
                    expected=revision,
                )
                return
            self._fold_update(update)

    async def _on_reconnect(self) -> None:
        self._watch.restart()

    def _fold_update(self, update: BucketUpdate) -> None:
        key, revision = update.key, update.revision
        overlay = self._overlay.get(key)
        # our own write coming back: reuse the state we wrote rather than decode it
        own = overlay[1] if overlay is not None and overlay[0] == revision else None
        self.mirror.apply(key, revision, update.value, own)
        if overlay is not None and overlay[0] <= revision:
            del self._overlay[key]

    def background(self) -> list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        tasks: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = [
            ("apply", self._apply_loop),
            ("mirror", self._mirror_loop),
            ("views", self._views_loop),
            ("graph", self._graph_loop),
        ]
        if self.exporter is not None:
            tasks += [("otlp-take", self._otlp_take_loop), ("otlp-export", self.exporter.run)]
        return tasks

    async def _otlp_take_loop(self) -> None:
        """Spans from the shared durable consumer into this replica's export queue;
        each message acknowledged once its spans are queued (or counted as dropped)."""
        assert self.exporter is not None
        try:
            while True:
                try:
                    msgs = await self._otlp_pull.fetch(self.settings.fetch_batch, timeout=1.0)
                except TimeoutError:
                    continue
                except nats.errors.Error as e:
                    self.log.warning("otlp.fetch_failed", error=repr(e))
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    try:
                        batch = _span_decoder.decode(msg.data)
                    except (msgspec.DecodeError, msgspec.ValidationError) as e:
                        self.log.warning(
                            "otlp.undecodable", subject=msg.subject, error=str(e)[:300]
                        )
                        with contextlib.suppress(nats.errors.Error):
                            await msg.term()
                        continue
                    self.exporter.offer(batch.spans)
                    with contextlib.suppress(nats.errors.Error):
                        await msg.ack()
        finally:
            with contextlib.suppress(Exception):
                await self._otlp_pull.unsubscribe()

    # ------------------------------------------------------------ the mesh-wide mirror

    async def _mirror_loop(self) -> None:
        try:
            while True:
                self._fold_update(await self._watch.next())
        finally:
            await self._watch.stop()

    async def _graph_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.views.graph.sample(loop.time(), edge_snapshot(self.mirror.total))
            # wall-clock buckets: the charts label them with the time of day
            self.views.series.observe(time.time(), detail_snapshot(self.mirror.total))
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------ applying metric batches

    async def _apply_loop(self) -> None:
        try:
            while True:
                try:
                    msgs = await self._pull.fetch(self.settings.fetch_batch, timeout=1.0)
                except TimeoutError:  # nothing to fetch (nats-py raises both flavours)
                    continue
                except nats.errors.Error as e:
                    self.log.warning("telemetry.fetch_failed", error=repr(e))
                    await asyncio.sleep(0.5)
                    continue
                started = time.perf_counter()
                try:
                    await self._apply_messages(msgs)
                except Exception:
                    # unacknowledged messages come back after ack-wait; keep consuming
                    self.log.exception("telemetry.apply_crashed", messages=len(msgs))
                    await asyncio.sleep(0.5)
                self.apply_seconds.observe(time.perf_counter() - started)
        finally:
            # not left to the connection's drain: a fetch cut short by the shutdown can
            # leave a reply in this subscription's queue that nothing will ever read,
            # and the drain would wait for it until its timeout
            with contextlib.suppress(Exception):
                await self._pull.unsubscribe()

    async def _apply_messages(self, msgs: list[Msg]) -> None:
        by_reporter: dict[str, list[tuple[Msg, MetricBatch]]] = {}
        for msg in msgs:
            try:
                batch = _metric_decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                await self._reject(msg, f"undecodable: {e}")
                continue
            if (
                batch.seq < 1
                or not valid_reporter(batch.reporter)
                or not (_valid_token(batch.namespace) and _valid_token(batch.service))
            ):
                await self._reject(
                    msg, f"invalid reporter/namespace/service in batch from {batch.reporter!r}"
                )
                continue
            by_reporter.setdefault(batch.reporter, []).append((msg, batch))
        async with asyncio.TaskGroup() as tg:
            for reporter, items in by_reporter.items():
                tg.create_task(
                    self._apply_reporter(reporter, items), name=f"telemetry:apply:{reporter}"
                )

    async def _reject(self, msg: Msg, reason: str) -> None:
        self.batches.labels("invalid").inc()
        self.log.warning("telemetry.batch_rejected", subject=msg.subject, reason=reason[:300])
        with contextlib.suppress(nats.errors.Error):
            await msg.term()

    async def _apply_reporter(self, reporter: str, items: list[tuple[Msg, MetricBatch]]) -> None:
        async with self._apply_gate:
            try:
                await self._apply_to_ledger(reporter, [b for _, b in items])
            except LedgerTooLarge as e:
                # retrying cannot help: refuse these batches (counted and logged)
                for msg, _ in items:
                    await self._reject(msg, str(e))
                return
            except (nats.errors.Error, errors.MeshError) as e:
                self.log.warning(
                    "telemetry.apply_failed", reporter=reporter, batches=len(items), error=repr(e)
                )
                for msg, _ in items:
                    with contextlib.suppress(nats.errors.Error):
                        await msg.nak(delay=1.0)
                return
        for msg, _ in items:
            with contextlib.suppress(nats.errors.Error):
                await msg.ack()

    async def _apply_to_ledger(self, reporter: str, batches: list[MetricBatch]) -> None:
        key = reporter_key(reporter)
        first = batches[0]
        for _ in range(MAX_ATTEMPTS):
            revision, state = self._known(key)
            if isinstance(state, ArchiveState):
                raise errors.Conflict(f"{key} holds an archive")
            if state is not None and state.retired:
                # fold it first (if the leader has not yet): its totals must not vanish
                await self._fold(revision, state)
                base = fresh_state(reporter, state.namespace, state.service, state.applied)
            elif state is None:
                floor = self._tombstone_floor(reporter, first.namespace, first.service)
                base = fresh_state(
                    reporter, first.namespace, first.service, [(1, floor)] if floor else []
                )
            else:
                base = state
            result = apply_batches(base, batches, time.time_ns())
            if result.state is None:
                self.batches.labels("duplicate").inc(len(result.duplicates))
                return
            value = result.state.encode()
            if len(value) > self.bus.nc.max_payload - 4096:
                raise LedgerTooLarge(f"ledger {key} would take {len(value)} bytes")
            try:
                new_revision = await self.kv.update(key, value, last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                self.conflicts.inc()
                await self._reread(key)
                continue
            self._overlay[key] = (new_revision, result.state)
            self.batches.labels("applied").inc(len(result.applied))
            if result.duplicates:
                self.batches.labels("duplicate").inc(len(result.duplicates))
            self.requests_applied.inc(result.requests)
            return
        raise errors.Unavailable(f"ledger {key}: still conflicting after {MAX_ATTEMPTS} attempts")

    def _known(self, key: str) -> tuple[int, Any]:
        """The newest (revision, state) we know for a KV key: (0, None) when absent."""
        mirrored: tuple[int, Any] | None = (
            self.mirror.reporters.get(key)
            if key.startswith("r.")
            else self.mirror.archives.get(key)
        )
        overlay = self._overlay.get(key)
        if overlay is not None and (mirrored is None or overlay[0] > mirrored[0]):
            return overlay
        return mirrored or (0, None)

    async def _reread(self, key: str) -> None:
        try:
            entry = await self.kv.get(key)
        except (nats.js.errors.KeyDeletedError, nats.js.errors.KeyNotFoundError) as e:
            # a deleted key keeps its delete marker: the next write must name its revision
            marker = getattr(e, "entry", None)
            self._overlay[key] = (int(marker.revision or 0) if marker is not None else 0, None)
            return
        value = entry.value or b""
        state = ReporterState.decode(value) if key.startswith("r.") else ArchiveState.decode(value)
        self._overlay[key] = (int(entry.revision or 0), state)

    def _tombstone_floor(self, reporter: str, namespace: str, service: str) -> int:
        _, archive = self._known(archive_key(namespace, service))
        if isinstance(archive, ArchiveState):
            done = archive.retired.get(reporter)
            if done is not None:
                return done.high_seq
        return 0

    async def _fold(self, revision: int, ledger: ReporterState) -> None:
        """Make sure the archive holds `ledger` (stored at `revision`)."""
        key = archive_key(ledger.namespace, ledger.service)
        for _ in range(MAX_ATTEMPTS):
            arch_revision, archive = self._known(key)
            folded = fold(archive, ledger, revision, time.time_ns())
            if folded is None:
                return
            try:
                new_revision = await self.kv.update(key, folded.encode(), last=arch_revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                self.conflicts.inc()
                await self._reread(key)
                continue
            self._overlay[key] = (new_revision, folded)
            return
        raise errors.Unavailable(f"archive {key}: still conflicting after {MAX_ATTEMPTS} attempts")

    # ------------------------------------------------------------ leader: retire idle ledgers

    async def leader_work(self, token: int) -> None:
        # the request metrics are exported by the leader only: every replica holds the
        # same mesh-wide totals, and a collector wants one writer per series
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._retire_loop(), name="telemetry:retire")
            if self.metrics_exporter is not None:
                tg.create_task(self.metrics_exporter.run(), name="telemetry:otlp-metrics")

    async def _retire_loop(self) -> None:
        # every step is a compare-and-set on the key it changes, so `token` fencing is
        # not needed: a deposed leader's write fails like any lost race
        while True:
            await asyncio.sleep(self.settings.retire_interval_s)
            try:
                await self.retire_idle(time.time_ns())
            except (nats.errors.Error, errors.MeshError) as e:
                self.log.warning("telemetry.retire_failed", error=repr(e))

    async def retire_idle(self, now_ns: int) -> int:
        """Fold ledgers idle past the retention into their archives; prune old tombstones."""
        cutoff = now_ns - int(self.settings.effective_retire_after_s * 1e9)
        retired = 0
        for key in [
            k for k, (_, s) in self.mirror.reporters.items() if s.updated_ns < cutoff or s.retired
        ]:
            revision, state = self._known(key)
            if not isinstance(state, ReporterState) or (
                state.updated_ns >= cutoff and not state.retired
            ):
                continue
            if not state.retired:
                flagged = replace(state, retired=True)
                try:
                    revision = await self.kv.update(key, flagged.encode(), last=revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
                self._overlay[key] = (revision, flagged)
                state = flagged
            await self._fold(revision, state)
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await self.kv.delete(key, last=revision)
            retired += 1
            self.retired.inc()
            self.log.info(
                "telemetry.reporter_retired", reporter=state.reporter, high_seq=state.high_seq
            )
        live = {s.reporter for _, s in self.mirror.reporters.values()}
        before = now_ns - int(self.settings.tombstone_ttl_s * 1e9)
        for key in list(self.mirror.archives):
            revision, archive = self._known(key)
            if not isinstance(archive, ArchiveState):
                continue
            pruned = prune_tombstones(archive, live, before)
            if pruned is not None:
                with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                    new_revision = await self.kv.update(key, pruned.encode(), last=revision)
                    self._overlay[key] = (new_revision, pruned)
        return retired

    # ------------------------------------------------------------ spans and access records

    async def _views_loop(self) -> None:
        js = self.bus.nc.jetstream()
        prefix = self.bus.subjects.prefix
        since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(
            seconds=self.settings.history_s
        )
        subs = []
        try:
            for kind, cb in (("spans", self._on_spans), ("access", self._on_access)):
                cfg = ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since
                )
                subs.append(
                    await js.subscribe(
                        f"{prefix}.telemetry.{kind}.>",
                        stream=self.stream,
                        cb=cb,
                        ordered_consumer=True,
                        idle_heartbeat=VIEWS_HEARTBEAT_S,
                        config=cfg,
                    )
                )
                # nats-py keeps this config to recreate the consumer (after missed
                # heartbeats, e.g. a nats-server restart) from the next sequence, but
                # leaves the start time in it, which the server refuses: the views
                # would stop for good (fixed in nats.go #1341, not in nats-py 2.16)
                cfg.opt_start_time = None
            await asyncio.Event().wait()
        finally:
            self.views.close_followers()
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _on_spans(self, msg: Msg) -> None:
        try:
            batch = _span_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.log.warning("telemetry.undecodable", subject=msg.subject, error=str(e)[:300])
            return
        for span in batch.spans:
            self.views.traces.add(span)
        self.records.labels("spans").inc(len(batch.spans))

    async def _on_access(self, msg: Msg) -> None:
        try:
            batch = _access_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.log.warning("telemetry.undecodable", subject=msg.subject, error=str(e)[:300])
            return
        for record in batch.records:
            self.views.add_access(AccessEntry(batch.namespace, batch.service, record))
        self.records.labels("access").inc(len(batch.records))
