"""`TelemetryPublisher`: the I/O shell that moves a recorder's batches to JetStream.

Every second it publishes what the recorder has cut to the subjects
`<prefix>.telemetry.<kind>.<ns>.<svc>`, with `Nats-Msg-Id` set. A batch that was not
acknowledged is re-sent unchanged with the same id (JetStream drops the duplicate; the
telemetry service applies a reporter's batch number once), so a request is counted
exactly once mesh-wide.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js

from mesh import telemetry as wire
from mesh.bus import Bus
from mesh.logs import get_logger

from .recorder import TelemetryRecorder
from .records import Outgoing

log = get_logger("proxy.telemetry")


class TelemetryPublisher:
    """Publishes a recorder's batches every `interval` seconds; never raises into the
    data path and never holds a request: the recorder only buffers.

    `before_flush` runs (synchronously) before each flush: the TCP relays use it to
    report the bytes of connections still open, so long-lived connections show traffic
    while it flows, not only when they close.

    `collect` is awaited before each periodic flush (bounded by `publish_timeout`; not
    before the final flush on cancel): an Envoy sidecar in stats mode reads Envoy's
    request counters there, so the read and the publish share one wakeup a second and
    the counts leave as soon as they are read (docs/architecture.md §7).
    """

    MAX_ROUNDS = 8  # batches per kind per flush, when a backlog drains after an outage

    def __init__(
        self,
        recorder: TelemetryRecorder,
        bus: Bus,
        *,
        interval: float = 1.0,
        publish_timeout: float = 2.0,
        before_flush: Callable[[], None] | None = None,
        collect: Callable[[], Awaitable[None]] | None = None,
    ):
        self.recorder = recorder
        self.bus = bus
        self.interval = interval
        self.publish_timeout = publish_timeout
        self.before_flush = before_flush
        self.collect = collect
        self._stream = wire.stream_name(bus.subjects.prefix)
        self._subjects = {
            kind: bus.subjects.telemetry(kind, recorder.namespace, recorder.service)
            for kind in wire.KINDS
        }
        self._unavailable_logged = False

    async def run(self) -> None:
        """Flush every `interval` until cancelled; then one last flush, bounded."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                if self.collect is not None:
                    await self._collect()
                try:
                    await self.flush()
                except Exception as e:  # a telemetry bug must not take the sidecar down
                    log.exception("telemetry.flush_crashed", error=repr(e))
        except asyncio.CancelledError:
            try:
                await asyncio.wait_for(self.flush(), self.publish_timeout)
            except (TimeoutError, asyncio.CancelledError):
                pass
            except Exception as e:
                log.exception("telemetry.flush_crashed", error=repr(e))
            raise

    async def _collect(self) -> None:
        assert self.collect is not None
        try:
            await asyncio.wait_for(self.collect(), self.publish_timeout)
        except TimeoutError:
            log.warning("telemetry.collect_timeout", timeout_s=self.publish_timeout)
        except Exception as e:  # a telemetry bug must not take the sidecar down
            log.exception("telemetry.collect_crashed", error=repr(e))

    async def flush(self) -> int:
        """Publish what is ready; returns the number of batches stored. Each round
        sends one batch of each kind at once (a round is one write to the bus and one
        wakeup for the acknowledgements, not one per kind); a failed batch ends the
        flush after its round, and is re-sent next time."""
        if self.before_flush is not None:
            self.before_flush()
        # aggregate what was recorded, even when nothing can be sent: the metrics keep
        # accumulating while the bus is down, the requests' list does not
        self.recorder.fold()
        if not self.bus.connected:
            return 0
        js = self.bus.nc.jetstream()
        stored = 0
        for _ in range(self.MAX_ROUNDS):
            batch = self.recorder.outgoing()
            if not batch:
                break
            results = await asyncio.gather(
                *(self._publish(js, out) for out in batch), return_exceptions=True
            )
            failed = False
            for out, result in zip(batch, results, strict=True):
                if isinstance(result, nats.errors.Error | TimeoutError | OSError):
                    failed = True
                    self.recorder.publish_failed(out.kind)
                    if not self._unavailable_logged:
                        log.warning(
                            "telemetry.publish_failed",
                            kind=out.kind,
                            msg_id=out.msg_id,
                            error=repr(result),
                        )
                        self._unavailable_logged = True
                elif isinstance(result, BaseException):
                    raise result  # a bug: run() logs it, the batch is re-sent next time
                else:
                    self.recorder.acknowledge(out.kind)
                    stored += 1
            if failed:
                return stored
            if self._unavailable_logged:
                log.info("telemetry.publish_resumed", reporter=self.recorder.reporter_id)
                self._unavailable_logged = False
        return stored

    async def _publish(self, js: nats.js.JetStreamContext, out: Outgoing) -> None:
        await js.publish(
            self._subjects[out.kind],
            out.payload,
            timeout=self.publish_timeout,
            stream=self._stream,
            headers={wire.MSG_ID_HEADER: out.msg_id},
        )
