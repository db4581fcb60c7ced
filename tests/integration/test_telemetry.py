"""The telemetry pipeline against real nats-server (JetStream) and etcd: proxies'
recorders and publishers -> the MESH_TELEMETRY stream -> telemetry replicas."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mesh.bus import Bus
from mesh.servers import NatsServer
from mesh.service import ControlPlaneService
from mesh.telemetry import MSG_ID_HEADER, new_reporter_id, stream_name
from meshctl import telemetry_cmds
from proxy.telemetry import (
    RequestRecord,
    Sampler,
    TelemetryPublisher,
    TelemetryRecorder,
    Workload,
    finish_span,
    start_span,
)
from services.telemetry import TelemetryService
from tests.support import eventually, running, service_config

ROOT = Path(__file__).resolve().parents[2]
PRODUCTPAGE = Workload(
    "productpage-v1",
    "default",
    "spiffe://cluster.local/ns/default/sa/productpage",
    "productpage",
    "v1",
)
REVIEWS = Workload(
    "reviews-v2", "default", "spiffe://cluster.local/ns/default/sa/reviews", "reviews", "v2"
)
REVIEWS_HOST = "reviews.default.svc.cluster.local"
ALWAYS = Sampler(1.0)


class Proxy:
    """What a sidecar runs for telemetry: one recorder, one publisher."""

    def __init__(self, bus: Bus, service: str, instance: str, **kw: Any):
        self.recorder = TelemetryRecorder(
            reporter_id=new_reporter_id(instance, random.getrandbits(32)),
            namespace="default",
            service=service,
            instance=instance,
            **kw,
        )
        self.publisher = TelemetryPublisher(self.recorder, bus)

    async def flush(self) -> None:
        await self.publisher.flush()
        assert self.recorder.outgoing() == [], "every batch must be stored by the stream"


def request(reporter: str, duration: float, **kw: Any) -> RequestRecord:
    return RequestRecord(
        reporter=reporter, source=PRODUCTPAGE, destination=REVIEWS, destination_service=REVIEWS_HOST,
        method="GET", authority="reviews:9080", path="/reviews/1", status=200, duration_ms=duration,
        response_bytes=250, security_policy="mutual_tls" if reporter == "destination" else "unknown", **kw,
    )  # fmt: skip


async def send(sources: list[Proxy], destination: Proxy, k: int, flush_every: int = 5) -> None:
    """K requests productpage -> reviews, reported by both sides, in many batches."""
    for i in range(k):
        src = sources[i % len(sources)]
        src.recorder.record_request(request("source", 2.0 + i % 40))
        destination.recorder.record_request(request("destination", 1.0 + i % 40))
        if (i + 1) % flush_every == 0:
            await src.flush()
            await destination.flush()
    for p in [*sources, destination]:
        await p.flush()


async def scrape(base: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
        assert r.status == 200
        return {f.name: f for f in text_string_to_metric_families(await r.text())}


def edge_requests(families: dict[str, Any], reporter: str) -> float:
    fam = families.get("istio_requests")
    if fam is None:
        return 0.0
    return sum(
        s.value
        for s in fam.samples
        if s.name == "istio_requests_total"
        and s.labels["reporter"] == reporter
        and s.labels["source_workload"] == "productpage-v1"
        and s.labels["destination_workload"] == "reviews-v2"
    )


def own_counter(families: dict[str, Any], name: str, **labels: str) -> float:
    fam = families.get(name.removesuffix("_total"))
    if fam is None:
        return 0.0
    return sum(
        s.value
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def http(service: ControlPlaneService) -> str:
    return f"http://127.0.0.1:{service.http_port}"


async def totals_are(base: str, expected: float) -> bool:
    families = await scrape(base)
    return (
        edge_requests(families, "source") == expected
        and edge_requests(families, "destination") == expected
    )


async def test_requests_counted_exactly_with_durations(nats_server, etcd_server, prefix) -> None:
    k = 37
    async with running(
        TelemetryService(service_config(nats_server.url, etcd_server.url, prefix))
    ) as svc:
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        src, dst = (
            Proxy(bus, "productpage", "productpage-v1-0"),
            Proxy(bus, "reviews", "reviews-v2-0"),
        )
        await send([src], dst, k)
        base = http(svc)
        await eventually(lambda: totals_are(base, k), timeout=10)
        families = await scrape(base)
        durations = families["istio_request_duration_milliseconds"]
        src_samples = [s for s in durations.samples if s.labels.get("reporter") == "source"]
        count = next(s.value for s in src_samples if s.name.endswith("_count"))
        total = next(s.value for s in src_samples if s.name.endswith("_sum"))
        buckets = {s.labels["le"]: s.value for s in src_samples if s.name.endswith("_bucket")}
        assert count == k
        assert total == pytest.approx(sum(2.0 + i % 40 for i in range(k)))
        # source durations are 2..38 ms: none <= 1 ms, 4 (2..5) <= 5 ms, all <= 50 ms
        assert (buckets["1.0"], buckets["5.0"], buckets["50.0"], buckets["+Inf"]) == (0, 4, k, k)
        dst_labels = next(
            s.labels for s in durations.samples if s.labels.get("reporter") == "destination"
        )
        assert dst_labels["connection_security_policy"] == "mutual_tls"
        assert dst_labels["destination_service_name"] == "reviews"
        # the graph shows the edge once the sampler has two points
        async with aiohttp.ClientSession() as s:

            async def edge() -> Any:
                async with s.get(base + "/api/graph?window=60") as r:
                    return (await r.json())["edges"]

            edges = await eventually(edge, timeout=5)
        assert edges[0]["source"] == "productpage-v1" and edges[0]["destination"] == "reviews-v2"
        assert edges[0]["success_rate"] == 1.0 and edges[0]["reporter"] == "source"
        await bus.close()


async def test_replicas_count_once_and_a_restart_catches_up(
    nats_server, etcd_server, prefix
) -> None:
    k = 60

    def config(replica: str) -> Any:
        return service_config(nats_server.url, etcd_server.url, prefix, replica=replica)

    bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
    sources = [Proxy(bus, "productpage", f"productpage-v1-{i}") for i in range(4)]
    dst = Proxy(bus, "reviews", "reviews-v2-0")
    async with (
        running(TelemetryService(config("tel-a"))) as a,
        running(TelemetryService(config("tel-b"))) as b,
    ):
        await send(sources, dst, k, flush_every=2)
        await eventually(lambda: totals_are(http(a), k), timeout=15)
        await eventually(lambda: totals_are(http(b), k), timeout=5)
        await asyncio.sleep(1.0)  # nothing arrives late and counts twice
        assert await totals_are(http(a), k) and await totals_are(http(b), k)
        applied = [
            own_counter(await scrape(http(x)), "meshwork_telemetry_requests_applied_total")
            for x in (a, b)
        ]
        assert sum(applied) == 2 * k, applied
    # the whole service is down while proxies keep publishing
    await send(sources, dst, k, flush_every=3)
    async with running(TelemetryService(config("tel-c"))) as c:
        await eventually(lambda: totals_are(http(c), 2 * k), timeout=15)
        await asyncio.sleep(1.0)
        assert await totals_are(http(c), 2 * k)
    await bus.close()


async def test_shutdown_is_prompt_and_leaves_nothing_behind(
    nats_server, etcd_server, prefix
) -> None:
    """What SIGTERM does (`stop()`), while batches flow: the service is gone in well
    under the connection's drain timeout (5 s), and leaves no exception unretrieved."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
    try:
        svc = TelemetryService(service_config(nats_server.url, etcd_server.url, prefix))
        task = asyncio.create_task(svc.run(), name="test:telemetry")
        await eventually(lambda: svc.ready, timeout=20)
        src, dst = Proxy(bus, "productpage", "pp-0"), Proxy(bus, "reviews", "reviews-0")
        await send([src], dst, 10)
        await eventually(lambda: totals_are(http(svc), 10), timeout=10)
        await asyncio.sleep(1.5)  # the service is waiting on a fetch from the stream
        started = time.monotonic()
        svc.stop()
        await asyncio.wait_for(task, 15)
        took = time.monotonic() - started
        del task
        gc.collect()  # what nobody retrieved is reported when it is collected
        await asyncio.sleep(0.1)
    finally:
        loop.set_exception_handler(previous)
        await bus.close()
    assert took < 2.0, f"shutdown took {took:.1f}s"
    assert not unhandled, unhandled


async def test_resent_batches_are_not_double_counted(nats_server, etcd_server, prefix) -> None:
    k = 11
    async with running(
        TelemetryService(service_config(nats_server.url, etcd_server.url, prefix))
    ) as svc:
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        src = Proxy(bus, "productpage", "productpage-v1-0")
        for i in range(k):
            src.recorder.record_request(request("source", float(i)))
        batch = next(o for o in src.recorder.outgoing() if o.kind == "metrics")
        js = bus.nc.jetstream()
        subject = bus.subjects.telemetry("metrics", "default", "productpage")
        first = await js.publish(subject, batch.payload, headers={MSG_ID_HEADER: batch.msg_id})
        again = await js.publish(subject, batch.payload, headers={MSG_ID_HEADER: batch.msg_id})
        assert not first.duplicate and again.duplicate  # JetStream drops the re-send
        # a re-send JetStream cannot recognise (another msg id) is caught by the ledger
        other = await js.publish(
            subject, batch.payload, headers={MSG_ID_HEADER: batch.msg_id + "-retry"}
        )
        assert not other.duplicate
        base = http(svc)

        async def settled() -> bool:
            families = await scrape(base)
            return (
                own_counter(families, "meshwork_telemetry_batches_total", outcome="duplicate") == 1
            )

        await eventually(settled, timeout=10)
        families = await scrape(base)
        assert edge_requests(families, "source") == k
        assert own_counter(families, "meshwork_telemetry_batches_total", outcome="applied") == 1
        await bus.close()


async def test_idle_ledgers_fold_into_archive_without_changing_totals(
    nats_server, etcd_server, prefix
) -> None:
    k = 9
    async with running(
        TelemetryService(service_config(nats_server.url, etcd_server.url, prefix))
    ) as svc:
        assert isinstance(svc, TelemetryService)
        base = http(svc)
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        src, dst = (
            Proxy(bus, "productpage", "productpage-v1-0"),
            Proxy(bus, "reviews", "reviews-v2-0"),
        )
        for i in range(k):
            src.recorder.record_request(request("source", float(i)))
            dst.recorder.record_request(request("destination", float(i)))
        old_batch = next(o for o in src.recorder.outgoing() if o.kind == "metrics")
        await src.flush()
        await dst.flush()
        await eventually(lambda: totals_are(base, k), timeout=10)
        # as if both proxies had been gone for longer than the stream keeps messages
        assert await svc.retire_idle(time.time_ns() + 10**13) == 2
        await eventually(
            lambda: not svc.mirror.reporters and len(svc.mirror.archives) == 2, timeout=5
        )
        assert await totals_are(base, k)
        # a very late re-send of an archived batch is recognised by the archive's tombstone
        js = bus.nc.jetstream()
        subject = bus.subjects.telemetry("metrics", "default", "productpage")
        await js.publish(subject, old_batch.payload, headers={MSG_ID_HEADER: "late-resend"})

        async def duplicate_seen() -> bool:
            families = await scrape(base)
            return (
                own_counter(families, "meshwork_telemetry_batches_total", outcome="duplicate") == 1
            )

        await eventually(duplicate_seen, timeout=10)
        assert await totals_are(base, k)
        # the same proxy comes back: its new batches count on top of the archive
        src.recorder.record_request(request("source", 1.0))
        dst.recorder.record_request(request("destination", 1.0))
        await src.flush()
        await dst.flush()
        await eventually(lambda: totals_are(base, k + 1), timeout=10)
        await bus.close()


async def test_trace_across_three_services_and_access_records(
    nats_server, etcd_server, prefix, capsys
) -> None:
    async with running(
        TelemetryService(service_config(nats_server.url, etcd_server.url, prefix))
    ) as svc:
        base = http(svc)
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        a, b, c = (Proxy(bus, name, f"{name}-0") for name in ("svc-a", "svc-b", "svc-c"))

        def span_args(service: str, host: str) -> dict[str, Any]:
            return {
                "name": f"{host}:80/*",
                "service": service,
                "namespace": "default",
                "instance": f"{service}-0",
            }

        t0 = time.time_ns()
        # A's sidecar sends to B; B's sidecar receives; B's app calls C (forwarding the
        # trace headers it got); B's sidecar sends to C; C's sidecar receives
        a_client, to_b = start_span(
            [], "client", sampler=ALWAYS, now_ns=t0, **span_args("svc-a", "svc-b")
        )
        b_server, to_b_app = start_span(
            to_b, "server", now_ns=t0 + 1_000_000, **span_args("svc-b", "svc-b")
        )
        b_client, to_c = start_span(
            to_b_app, "client", now_ns=t0 + 2_000_000, **span_args("svc-b", "svc-c")
        )
        c_server, _ = start_span(
            to_c, "server", now_ns=t0 + 3_000_000, **span_args("svc-c", "svc-c")
        )
        for proxy, ctx, end in (
            (c, c_server, 5), (b, b_client, 6), (b, b_server, 7), (a, a_client, 8),
        ):  # fmt: skip
            span = finish_span(ctx, status_code=200, end_ns=t0 + end * 1_000_000)
            assert span is not None
            proxy.recorder.record_span(span)
        for i in range(3):
            a.recorder.record_request(
                request("source", 4.0, request_id=f"req-{i}", trace_id=a_client.trace_id)
            )
        for p in (a, b, c):
            await p.flush()

        async with aiohttp.ClientSession() as s:

            async def whole_trace() -> Any:
                async with s.get(f"{base}/api/traces/{a_client.trace_id}") as r:
                    tree = await r.json() if r.status == 200 else None
                    return tree if tree and tree["spans"] == 4 else None

            tree = await eventually(whole_trace, timeout=10)
            assert len(tree["roots"]) == 1
            chain = [tree["roots"][0]]
            while chain[-1]["children"]:
                assert len(chain[-1]["children"]) == 1
                chain.append(chain[-1]["children"][0])
            assert [(n["service"], n["kind"]) for n in chain] == [
                ("svc-a", "client"), ("svc-b", "server"), ("svc-b", "client"), ("svc-c", "server"),
            ]  # fmt: skip
            assert tree["duration_ms"] == 8.0 and tree["services"] == ["svc-a", "svc-b", "svc-c"]
            async with s.get(f"{base}/") as r:
                assert r.status == 200 and "/ui/app.js" in await r.text()
            async with s.get(f"{base}/ui/app.js") as r:
                assert r.status == 200 and "/api/events" in await r.text()
            async with s.get(f"{base}/api/traces/nothex") as r:
                assert r.status == 400
            async with s.get(f"{base}/api/traces?service=svc-c") as r:
                assert [t["trace_id"] for t in (await r.json())["traces"]] == [a_client.trace_id]

            async def access() -> Any:
                async with s.get(f"{base}/api/access?service=svc-a") as r:
                    records = (await r.json())["records"]
                    return records if len(records) == 3 else None

            records = await eventually(access, timeout=10)
            assert [r["request_id"] for r in records] == ["req-0", "req-1", "req-2"]
            assert records[0]["trace_id"] == a_client.trace_id and records[0]["status"] == 200

            # follow=1 streams what arrives after the request
            async with s.get(f"{base}/api/access?service=svc-a&follow=1&limit=0") as r:
                a.recorder.record_request(request("source", 1.0, request_id="req-live"))
                await a.flush()
                line = b""
                while not line.strip():
                    line = await asyncio.wait_for(r.content.readline(), 10)
                assert json.loads(line)["request_id"] == "req-live"

            async def edges() -> Any:
                async with s.get(f"{base}/api/graph") as r:
                    return (await r.json())["edges"]

            await eventually(edges, timeout=5)  # the graph samples the totals every second

        # meshctl, against the same service
        out = await meshctl(capsys, "trace", a_client.trace_id, "--telemetry", base)
        assert out.splitlines()[0].startswith(f"trace {a_client.trace_id}  4 spans")
        assert "svc-c server svc-c:80/*" in out and "└─ " in out
        out = await meshctl(capsys, "logs", "svc-a", "--telemetry", base)
        assert "request_id=req-0" in out and '"GET /reviews/1 HTTP" 200' in out
        out = await meshctl(capsys, "stat", "-o", "json", "--telemetry", base)
        assert json.loads(out)[0]["source"] == "productpage-v1"
        out = await meshctl(capsys, "graph", "--telemetry", base)
        assert '"productpage-v1.default" -> "reviews-v2.default"' in out
        out = await meshctl(capsys, "top", "--count", "1", "--telemetry", base)
        assert "productpage-v1.default" in out and "SUCCESS" in out
        # -o json|yaml on each: the same document either way (meshctl/output.py)
        for argv in (["trace", a_client.trace_id], ["stat"], ["graph"]):
            doc = json.loads(await meshctl(capsys, *argv, "-o", "json", "--telemetry", base))
            assert (
                yaml.safe_load(await meshctl(capsys, *argv, "-o", "yaml", "--telemetry", base))
                == doc
            )
        assert doc["edges"] and doc["nodes"]  # graph
        out = await meshctl(capsys, "graph", "-o", "table", "--telemetry", base)
        assert out.startswith("SOURCE") and "reviews-v2.default" in out
        out = await meshctl(capsys, "logs", "svc-a", "-o", "yaml", "--telemetry", base)
        assert [r["request_id"] for r in yaml.safe_load_all(out)][:3] == ["req-0", "req-1", "req-2"]
        out = await meshctl(capsys, "logs", "svc-a", "-o", "json", "--telemetry", base)
        assert json.loads(out.splitlines()[0])["request_id"] == "req-0"
        out = await meshctl(
            capsys, "top", "--count", "2", "--interval", "0.1", "-o", "json", "--telemetry", base
        )
        refreshes = [json.loads(line) for line in out.splitlines()]
        assert len(refreshes) == 2 and refreshes[0]["edges"][0]["source"] == "productpage-v1"
        await bus.close()


async def meshctl(capsys: Any, *argv: str) -> str:
    parser = argparse.ArgumentParser(prog="meshctl")
    parser.add_argument("--state-dir")
    telemetry_cmds.add_parsers(parser.add_subparsers())
    args = parser.parse_args(argv)
    capsys.readouterr()
    # the CLI blocks on HTTP: run it off the loop that serves the telemetry API
    assert await asyncio.to_thread(args.func, args) == 0
    return str(capsys.readouterr().out)


async def test_publisher_never_blocks_when_the_bus_is_down(own_nats: NatsServer, prefix) -> None:
    bus = await Bus.connect([own_nats.url], name="test", prefix=prefix)
    proxy = Proxy(bus, "productpage", "productpage-v1-0", max_buffered=50)
    proxy.publisher.publish_timeout = 0.5
    # up, but no stream yet (telemetry not deployed): the publish fails, the batch waits
    proxy.recorder.record_request(request("source", 1.0))
    assert await proxy.publisher.flush() == 0 and proxy.recorder.publish_failures >= 1
    own_nats.kill()
    await eventually(lambda: not bus.connected, timeout=5)
    slowest = 0.0
    for i in range(80):
        started = time.perf_counter()
        proxy.recorder.record_request(request("source", 1.0, request_id=str(i)))
        slowest = max(slowest, time.perf_counter() - started)
    started = time.perf_counter()
    assert await proxy.publisher.flush() == 0
    assert time.perf_counter() - started < 0.1
    assert slowest < 0.005
    # 1 access record went into the pending batch, 50 wait, the rest are dropped and counted
    assert proxy.recorder.dropped["access"] == 81 - 1 - 50
    # metrics are not dropped: they accumulate for the next batch that gets through
    assert sum(proxy.recorder.totals().counters.values()) == 81
    await bus.close()


async def test_example_script_prints_records(nats_server, prefix) -> None:
    bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
    await bus.ensure_stream(stream_name(prefix), [bus.subjects.telemetry_all])
    src = Proxy(bus, "productpage", "productpage-v1-0")
    for i in range(3):
        src.recorder.record_request(request("source", 3.0, request_id=f"r{i}"))
    await src.flush()
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(ROOT / "examples" / "consume_telemetry.py"), "--nats", nats_server.url,
         "--prefix", prefix, "--count", "2", "--timeout", "5"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    by_type = {line["type"]: line for line in lines}
    assert by_type["MetricBatch"]["requests"] == 3
    assert by_type["MetricBatch"]["edges"] == ["productpage-v1 -> reviews-v2 [source] 200"]
    assert len(by_type["AccessBatch"]["records"]) == 3
    await bus.close()
