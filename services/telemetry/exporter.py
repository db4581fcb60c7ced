"""OTLP export, the I/O shell: takes spans from the `MESH_TELEMETRY` stream and POSTs
them (OTLP/HTTP, protobuf) to the configured collector; `otlp.py` decides what to
send, when to retry and what to drop.

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
from collections.abc import Iterable
from typing import Any

import aiohttp
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceResponse,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh.telemetry import Span
from services.telemetry.otlp import Batch, ExportQueue, export_request

RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})


class OtlpExporter:
    def __init__(
        self,
        endpoint: str,
        headers: Iterable[tuple[str, str]],
        queue: ExportQueue,
        *,
        timeout_s: float = 10.0,
        log: Any,
    ):
        self.endpoint = endpoint
        self.headers = {**dict(headers), "Content-Type": "application/x-protobuf"}
        self.queue = queue
        self.timeout_s = timeout_s
        self.log = log
        self._wake = asyncio.Event()

    def offer(self, spans: list[Span]) -> None:
        dropped = self.queue.offer(spans)
        if dropped:
            self.log.warning("otlp.buffer_full", dropped=dropped, buffered=len(self.queue))
        self._wake.set()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                now = time.monotonic()
                batch = self.queue.next_batch(now)
                if batch is None:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.queue.wait_s(now))
                    continue
                await self._send(session, batch)

    async def _send(self, session: aiohttp.ClientSession, batch: Batch) -> None:
        body = export_request(batch.spans).SerializeToString()
        try:
            async with session.post(self.endpoint, data=body, headers=self.headers) as r:
                status = r.status
                answer = await r.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            self._retry(batch, f"{type(e).__name__}")
            return
        if 200 <= status < 300:
            self.queue.succeeded(batch)
            rejected = _rejected_spans(answer)
            if rejected:
                self.log.warning("otlp.partially_rejected", spans=rejected)
        elif status in RETRYABLE:
            self._retry(batch, f"HTTP {status}")
        else:
            self.queue.rejected(batch)
            self.log.warning("otlp.rejected", status=status, spans=len(batch.spans))

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


def _rejected_spans(answer: bytes) -> int:
    if not answer:
        return 0
    try:
        return int(ExportTraceServiceResponse.FromString(answer).partial_success.rejected_spans)
    except Exception:  # the collector's answer is advisory; a garbled one changes nothing
        return 0


class ExportStatsCollector(Collector):
    """`meshwork_telemetry_otlp_spans_total{outcome}` and the queue's length."""

    def __init__(self, queue: ExportQueue):
        self.queue = queue

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
        return [spans, failures, buffered]
