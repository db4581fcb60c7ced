"""`TelemetryPublisher`: one round of batches sent at once, a failed kind re-sent
while the others are acknowledged; and `collect`, what an Envoy sidecar in stats mode
reads from Envoy before each periodic flush (docs/architecture.md §7), in the same
wakeup."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors

from mesh import telemetry as wire
from mesh.subjects import Subjects
from proxy.telemetry.publisher import TelemetryPublisher
from proxy.telemetry.recorder import TelemetryRecorder
from tests.unit.test_telemetry_core import recorder, request


class OfflineBus:
    """A bus that is not connected: `flush` folds what was recorded and sends nothing."""

    subjects = Subjects()
    connected = False


class RecordingPublisher(TelemetryPublisher):
    def __init__(self, events: list[str], **kw: Any) -> None:
        recorder = TelemetryRecorder(
            reporter_id="reviews-v1-a", namespace="default", service="reviews", instance="a"
        )
        super().__init__(recorder, OfflineBus(), interval=0.01, **kw)  # type: ignore[arg-type]
        self.events = events

    async def flush(self) -> int:
        self.events.append("flush")
        return await super().flush()


async def _run_until(publisher: TelemetryPublisher, events: list[str], flushes: int) -> None:
    task = asyncio.create_task(publisher.run())
    for _ in range(500):
        if events.count("flush") >= flushes:
            break
        await asyncio.sleep(0.005)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def test_collect_runs_before_each_periodic_flush_not_the_final_one() -> None:
    events: list[str] = []

    async def collect() -> None:
        events.append("collect")

    publisher = RecordingPublisher(events, collect=collect)
    await _run_until(publisher, events, 3)
    periodic, final = events[:-1], events[-1]
    assert final == "flush"  # on cancel: flushed, not collected
    assert periodic[:6] == ["collect", "flush"] * 3


async def test_a_failing_or_hanging_collect_does_not_stop_the_flushes() -> None:
    events: list[str] = []
    calls = 0

    async def collect() -> None:
        nonlocal calls
        calls += 1
        events.append("collect")
        if calls == 1:
            raise RuntimeError("a bug in the reader")
        if calls == 2:
            await asyncio.sleep(60)  # bounded by publish_timeout

    publisher = RecordingPublisher(events, collect=collect, publish_timeout=0.05)
    await _run_until(publisher, events, 3)
    assert events[:6] == ["collect", "flush"] * 3


class FakeJetStream:
    """Holds each publish until every batch of the round is in flight (so a publisher
    sending them one after another would time out), and fails the subjects named."""

    def __init__(self, in_flight: int, failing: set[str]) -> None:
        self.round = asyncio.Barrier(in_flight)
        self.failing = failing
        self.sent: list[tuple[str, str]] = []

    async def publish(self, subject: str, payload: bytes, **kw: Any) -> None:
        await asyncio.wait_for(self.round.wait(), 1.0)
        self.sent.append((subject.split(".")[2], kw["headers"][wire.MSG_ID_HEADER]))
        if subject.split(".")[2] in self.failing:
            raise nats.errors.TimeoutError


class ConnectedBus:
    subjects = Subjects()
    connected = True

    def __init__(self, js: FakeJetStream) -> None:
        self.js = js
        self.nc = self

    def jetstream(self) -> FakeJetStream:
        return self.js


async def test_a_round_sends_every_kind_at_once_and_resends_only_the_failed_one() -> None:
    rec = recorder()
    rec.record_request(request())  # a metrics batch and an access batch
    js = FakeJetStream(in_flight=2, failing={"access"})
    publisher = TelemetryPublisher(rec, ConnectedBus(js))  # type: ignore[arg-type]
    assert await publisher.flush() == 1
    assert sorted(js.sent) == [
        ("access", f"access:{rec.reporter_id}:1"),
        ("metrics", f"metrics:{rec.reporter_id}:1"),
    ]
    assert (rec.published["metrics"], rec.published["access"], rec.publish_failures) == (1, 0, 1)
    js.round, js.failing, js.sent = asyncio.Barrier(1), set(), []
    assert await publisher.flush() == 1  # the same access batch, same id: deduplicated
    assert js.sent == [("access", f"access:{rec.reporter_id}:1")]
    assert rec.published["access"] == 1
