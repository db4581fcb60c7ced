"""OTLP export, the I/O shell: takes spans from the `MESH_TELEMETRY` stream and sends
them to the configured collector (`otlp_transport.py`: OTLP/HTTP protobuf or JSON, or
OTLP/gRPC); `otlp.py` decides what to send, when to retry and what to drop. The
leader also exports the request metrics periodically (`MetricsExporter`).

Exactly once per span across replicas: every replica pulls spans from one durable
consumer (`telemetry-otlp`, explicit ack), so each stream message goes to one replica,
which acknowledges it once its spans are in its export queue; an acknowledged message
is never delivered again, and proxies' re-sends of a batch are dropped by JetStream's
duplicate window (`Nats-Msg-Id`). A replica that dies loses what its queue held (at
most `otlp-buffer-spans`); it never sends a span another replica sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh.telemetry import MetricTotals, Span
from services.telemetry.otlp import Batch, ExportQueue, export_request
from services.telemetry.otlp_metrics import metrics_request
from services.telemetry.otlp_transport import OtlpTransport, Outcome


class OtlpExporter:
    """Spans: batches from the export queue, one in flight, retried with backoff."""

    def __init__(self, transport: OtlpTransport, queue: ExportQueue, *, log: Any):
        self.transport = transport
        self.queue = queue
        self.log = log
        self._wake = asyncio.Event()

    def offer(self, spans: list[Span]) -> None:
        dropped = self.queue.offer(spans)
        if dropped:
            self.log.warning("otlp.buffer_full", dropped=dropped, buffered=len(self.queue))
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                now = time.monotonic()
                batch = self.queue.next_batch(now)
                if batch is None:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.queue.wait_s(now))
                    continue
                await self._send(batch)
        finally:
            await self.transport.close()

    async def _send(self, batch: Batch) -> None:
        result = await self.transport.send("traces", export_request(batch.spans))
        if result.outcome is Outcome.OK:
            self.queue.succeeded(batch)
            if result.rejected:
                self.log.warning("otlp.partially_rejected", spans=result.rejected)
        elif result.outcome is Outcome.RETRY:
            self._retry(batch, result.detail)
        else:
            self.queue.rejected(batch)
            self.log.warning("otlp.rejected", error=result.detail, spans=len(batch.spans))

    def _retry(self, batch: Batch, error: str) -> None:
        delay = self.queue.failed(batch, time.monotonic())
        if delay is None:
            self.log.warning(
                "otlp.dropped_after_retries", error=error, spans=len(batch.spans),
                attempts=batch.attempt,
            )  # fmt: skip
        else:
            self.log.info(
                "otlp.export_failed", error=error, attempt=batch.attempt, retry_in_s=round(delay, 2)
            )


@dataclass
class MetricsExportStats:
    exports: int = 0  # requests the collector took
    failures: int = 0  # requests that failed (superseded by the next export)
    data_points: int = 0  # data points in the last export taken


class MetricsExporter:
    """The request metrics, every `interval_s`: the current mesh-wide cumulative
    totals, sent whole. Runs in the leader only, so the collector gets one writer per
    series. A failed export is not retried: the next one carries the same totals and
    newer (cumulative temporality), so nothing is lost but freshness."""

    def __init__(
        self,
        transport: OtlpTransport,
        totals: Callable[[], MetricTotals],
        *,
        interval_s: float,
        log: Any,
        clock_ns: Callable[[], int] = time.time_ns,
    ):
        self.transport = transport
        self.totals = totals
        self.interval_s = interval_s
        self.log = log
        self.clock_ns = clock_ns
        self.stats = MetricsExportStats()
        self.start_ns = 0

    async def run(self) -> None:
        self.start_ns = self.clock_ns()
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                try:
                    await self.export_once()
                except Exception as e:  # a bug here must not end the leader's other work
                    self.stats.failures += 1
                    self.log.error("otlp.metrics_export_error", error=type(e).__name__)
        finally:
            await self.transport.close()

    async def export_once(self) -> None:
        totals = self.totals()
        if not len(totals):
            return
        request = metrics_request(totals, self.start_ns or self.clock_ns(), self.clock_ns())
        result = await self.transport.send("metrics", request)
        if result.outcome is Outcome.OK:
            self.stats.exports += 1
            self.stats.data_points = len(totals)
            if result.rejected:
                self.log.warning("otlp.metrics_partially_rejected", points=result.rejected)
        else:
            self.stats.failures += 1
            self.log.warning(
                "otlp.metrics_export_failed", error=result.detail, outcome=result.outcome.value
            )


class ExportStatsCollector(Collector):
    """`meshwork_telemetry_otlp_spans_total{outcome}`, the queue's length and the
    metrics exports of this replica (while it leads)."""

    def __init__(self, queue: ExportQueue, metrics: MetricsExportStats | None = None):
        self.queue = queue
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        s = self.queue.stats
        spans = CounterMetricFamily(
            "meshwork_telemetry_otlp_spans",
            "Spans this replica exported over OTLP, or dropped, by outcome",
            labels=["outcome"],
        )
        for outcome, value in (
            ("exported", s.exported),
            ("dropped_buffer_full", s.dropped_full),
            ("dropped_retries", s.dropped_retries),
            ("dropped_rejected", s.dropped_rejected),
            ("dropped_invalid", s.dropped_invalid),
        ):
            spans.add_metric([outcome], value)
        failures = CounterMetricFamily(
            "meshwork_telemetry_otlp_failures", "Failed OTLP export attempts (each retried)"
        )
        failures.add_metric([], s.failures)
        buffered = GaugeMetricFamily(
            "meshwork_telemetry_otlp_buffered_spans", "Spans waiting for OTLP export"
        )
        buffered.add_metric([], len(self.queue))
        out: list[Metric] = [spans, failures, buffered]
        if self.metrics is not None:
            exports = CounterMetricFamily(
                "meshwork_telemetry_otlp_metric_exports",
                "OTLP metrics exports this replica sent, by outcome",
                labels=["outcome"],
            )
            exports.add_metric(["ok"], self.metrics.exports)
            exports.add_metric(["failed"], self.metrics.failures)
            out.append(exports)
        return out
