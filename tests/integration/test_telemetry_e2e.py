"""Telemetry end to end: real sidecars (mTLS, registry, config, CA) record every request
and connection, publish to JetStream, and the telemetry service adds it up.

What a user would notice: `istio_requests_total` for an edge rises by exactly the
requests sent, on both reporters, with Istio's labels, through replicas and outages of
the telemetry service; a request through three services is one trace; the bus going
down does not fail requests; the admin endpoint and the example consumer show it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh import __version__ as mesh_version
from mesh.servers import NatsServer, free_port
from mesh.telemetry import DURATION_BUCKETS_MS
from services.telemetry import TelemetryService
from tests.support import (
    ForwardingApp,
    MeshHarness,
    eventually,
    replace_app,
    running,
    service_config,
)

ROOT = Path(__file__).resolve().parents[2]
REVIEWS_HOST = "reviews.default.svc.cluster.local"
EDGE = {"source_workload": "productpage-v1", "destination_workload": "reviews-v2"}
BODY = b"x" * 100


# ---------------------------------------------------------------- helpers


def outbound(sc: Any) -> str:
    return f"http://127.0.0.1:{sc.ports['outbound']}"


def admin(sc: Any) -> str:
    return f"http://127.0.0.1:{sc.ports['admin']}"


def http(service: TelemetryService) -> str:
    return f"http://127.0.0.1:{service.http_port}"


async def families(url: str) -> dict[str, Any]:
    """Prometheus text at `url`, parsed by prometheus_client's own parser."""
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        return {f.name: f for f in text_string_to_metric_families(await r.text())}


def samples(fams: dict[str, Any], family: str, name: str, **labels: str) -> list[Any]:
    fam = fams.get(family)
    if fam is None:
        return []
    return [
        s
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def total(fams: dict[str, Any], family: str, name: str, **labels: str) -> float:
    return sum(s.value for s in samples(fams, family, name, **labels))


def edge_requests(fams: dict[str, Any], reporter: str, **labels: str) -> float:
    return total(
        fams, "istio_requests", "istio_requests_total", reporter=reporter, **EDGE, **labels
    )


async def edge_totals_are(url: str, expected: float) -> bool:
    fams = await families(url)
    return (
        edge_requests(fams, "source") == expected and edge_requests(fams, "destination") == expected
    )


async def applied_requests(service: TelemetryService, at_least: float) -> bool:
    """The service applied batches counting at least this many requests (both reporters)."""
    fams = await families(http(service) + "/metrics")
    applied = "meshwork_telemetry_requests_applied"
    return total(fams, applied, f"{applied}_total") >= at_least


async def send(session: aiohttp.ClientSession, client: Any, k: int) -> list[int]:
    """K POSTs productpage -> reviews through the client sidecar; the response body sizes."""
    sizes = []
    for _ in range(k):
        async with session.post(
            "http://reviews:9080/reviews/1", data=BODY, proxy=outbound(client)
        ) as r:
            body = await r.read()
            assert r.status == 200, body
            sizes.append(len(body))
    return sizes


@contextlib.asynccontextmanager
async def telemetry_service(nats_url: str, etcd_url: str, prefix: str, replica: str = "tel-0"):
    async with running(
        TelemetryService(service_config(nats_url, etcd_url, prefix, replica=replica))
    ) as svc:
        assert isinstance(svc, TelemetryService)
        yield svc


@pytest.fixture
async def mesh(nats_server, etcd_server, prefix) -> AsyncIterator[MeshHarness]:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as h:
        yield h


async def pair(mesh: MeshHarness, **settings: Any) -> tuple[Any, Any]:
    """reviews v2 (an echo app) and productpage v1 (the test is its app)."""
    reviews = await mesh.sidecar("reviews", "v2", **settings)
    client = await mesh.sidecar("productpage", "v1", app=False, **settings)
    return reviews, client


# ---------------------------------------------------------------- tests


async def test_exactly_k_requests_on_both_reporters_with_istio_labels(
    mesh: MeshHarness, nats_server, etcd_server, prefix
) -> None:
    k = 23
    async with telemetry_service(nats_server.url, etcd_server.url, prefix) as tel:
        reviews, client = await pair(mesh)
        async with aiohttp.ClientSession() as session:
            sizes = await send(session, client, k)
            # a local reply is recorded too, with its flags
            async with session.get("http://nosuch:9080/", proxy=outbound(client)) as r:
                assert r.status == 502 and r.headers["x-mesh-response-flags"] == "NR"
        await eventually(lambda: edge_totals_are(http(tel) + "/metrics", k), timeout=15)
        fams = await families(http(tel) + "/metrics")

    (src,) = samples(fams, "istio_requests", "istio_requests_total", reporter="source", **EDGE)
    (dst,) = samples(fams, "istio_requests", "istio_requests_total", reporter="destination", **EDGE)
    common = {
        "source_workload": "productpage-v1",
        "source_workload_namespace": "default",
        "source_principal": "spiffe://cluster.local/ns/default/sa/productpage",
        "source_app": "productpage",
        "source_version": "v1",
        "source_cluster": "Kubernetes",
        "destination_cluster": "Kubernetes",
        "destination_workload": "reviews-v2",
        "destination_workload_namespace": "default",
        "destination_principal": "spiffe://cluster.local/ns/default/sa/reviews",
        "destination_service": REVIEWS_HOST,
        "destination_service_name": "reviews",
        "destination_service_namespace": "default",
        "destination_app": "reviews",
        "destination_version": "v2",
        "request_protocol": "http",
        "response_code": "200",
        "response_flags": "-",
    }
    assert src.labels == {**common, "reporter": "source", "connection_security_policy": "unknown"}
    # the server's sidecar knows the caller from its client certificate (mTLS)
    assert dst.labels == {
        **common,
        "reporter": "destination",
        "connection_security_policy": "mutual_tls",
    }
    for reporter in ("source", "destination"):
        labels = {"reporter": reporter, **EDGE}
        durations = "istio_request_duration_milliseconds"
        assert total(fams, durations, durations + "_count", **labels) == k
        assert total(fams, durations, durations + "_sum", **labels) > 0
        buckets = {
            s.labels["le"]: s.value
            for s in samples(fams, durations, durations + "_bucket", **labels)
        }
        assert len(buckets) == len(DURATION_BUCKETS_MS) + 1 and buckets["+Inf"] == k
        # request and response bodies, counted as they streamed through
        assert total(fams, "istio_request_bytes", "istio_request_bytes_sum", **labels) == k * len(
            BODY
        )
        assert total(fams, "istio_response_bytes", "istio_response_bytes_sum", **labels) == sum(
            sizes
        )
    nr = samples(
        fams, "istio_requests", "istio_requests_total", reporter="source", response_flags="NR"
    )
    assert [(s.labels["response_code"], s.value) for s in nr] == [("502", 1.0)]

    # each sidecar's admin endpoint shows its own side
    client_stats = await families(admin(client) + "/stats/prometheus")
    assert edge_requests(client_stats, "source") == k
    server_stats = await families(admin(reviews) + "/stats/prometheus")
    assert edge_requests(server_stats, "destination") == k


async def test_two_replicas_count_once_and_a_restarted_service_catches_up(
    mesh: MeshHarness, nats_server, etcd_server, prefix
) -> None:
    k = 30
    args = (nats_server.url, etcd_server.url, prefix)
    async with aiohttp.ClientSession() as session:
        async with (
            telemetry_service(*args, replica="tel-a") as a,
            telemetry_service(*args, replica="tel-b") as b,
        ):
            _, client = await pair(mesh)
            await send(session, client, k)
            for svc in (a, b):
                await eventually(lambda s=svc: edge_totals_are(http(s) + "/metrics", k), 15)
            await asyncio.sleep(1.5)  # a re-sent or late batch must not count twice
            for svc in (a, b):
                assert await edge_totals_are(http(svc) + "/metrics", k)
        # the whole telemetry service is down; the sidecars keep publishing to the stream
        await send(session, client, k)
        await asyncio.sleep(1.5)
    async with telemetry_service(*args, replica="tel-c") as c:
        await eventually(lambda: edge_totals_are(http(c) + "/metrics", 2 * k), timeout=20)
        await asyncio.sleep(1.5)
        assert await edge_totals_are(http(c) + "/metrics", 2 * k)


async def test_request_through_three_services_is_one_trace(
    mesh: MeshHarness, nats_server, etcd_server, prefix
) -> None:
    async with telemetry_service(nats_server.url, etcd_server.url, prefix) as tel:
        # only A decides to sample; B and C follow the decision that arrives with the request
        await mesh.sidecar("svc-c", "v1", trace_sampling=0)
        b = await mesh.sidecar("svc-b", "v1", trace_sampling=0)
        await replace_app(mesh, b, ForwardingApp("http://svc-c/hello", outbound(b)))
        a = await mesh.sidecar("svc-a", "v1", app=False, trace_sampling=100)
        async with (
            aiohttp.ClientSession() as session,
            session.get("http://svc-b/start", proxy=outbound(a)) as r,
        ):
            assert r.status == 200
            answer = await r.json()
        assert answer["next_status"] == 200
        b_saw, c_saw = answer["headers"], answer["next"]["headers"]
        trace_id = b_saw["traceparent"].split("-")[1]
        # C's app got the same trace (W3C and B3), and no sidecar-to-sidecar metadata
        assert c_saw["traceparent"].split("-")[1] == trace_id
        assert c_saw["traceparent"].endswith("-01") and c_saw["x-b3-sampled"] == "1"
        assert c_saw["x-b3-traceid"] == trace_id
        assert not any(h.lower() == "x-meshwork-peer" for h in [*b_saw, *c_saw])

        async with aiohttp.ClientSession() as session:

            async def whole_trace() -> Any:
                async with session.get(f"{http(tel)}/api/traces/{trace_id}") as r:
                    tree = await r.json() if r.status == 200 else None
                    return tree if tree and tree["spans"] == 4 else None

            tree = await eventually(whole_trace, timeout=15)
            assert len(tree["roots"]) == 1
            chain = [tree["roots"][0]]
            while chain[-1]["children"]:
                assert len(chain[-1]["children"]) == 1
                chain.append(chain[-1]["children"][0])
            assert [(n["service"], n["kind"]) for n in chain] == [
                ("svc-a", "client"), ("svc-b", "server"), ("svc-b", "client"), ("svc-c", "server"),
            ]  # fmt: skip
            assert tree["services"] == ["svc-a", "svc-b", "svc-c"]

            # access records carry the trace id, on both reporters
            async def access() -> Any:
                async with session.get(f"{http(tel)}/api/access?service=svc-b") as r:
                    records = (await r.json())["records"]
                    return records if len(records) == 2 else None

            records = await eventually(access, timeout=10)
            assert {r["trace_id"] for r in records} == {trace_id}
            assert sorted(r["reporter"] for r in records) == ["destination", "source"]


async def test_requests_succeed_while_the_bus_is_down(
    own_nats: NatsServer, etcd_server, prefix
) -> None:
    async with (
        MeshHarness(own_nats.url, etcd_server.url, prefix) as mesh,
        telemetry_service(own_nats.url, etcd_server.url, prefix) as tel,
        aiohttp.ClientSession() as session,
    ):
        _, client = await pair(mesh)
        await send(session, client, 5)
        await eventually(lambda: edge_totals_are(http(tel) + "/metrics", 5), timeout=15)

        statuses: list[int] = []
        stop = asyncio.Event()

        async def flow() -> None:
            while not stop.is_set():
                async with session.get("http://reviews:9080/", proxy=outbound(client)) as r:
                    await r.read()
                    statuses.append(r.status)

        flowing = asyncio.create_task(flow())
        try:
            await eventually(lambda: len(statuses) >= 20, timeout=10)
            own_nats.kill()
            at_kill = len(statuses)
            await eventually(lambda: len(statuses) >= at_kill + 100, timeout=20)
            # the sidecars noticed: telemetry waits, requests do not
            await eventually(lambda: not client.bus.connected, timeout=5)
            during = len(statuses)
            await eventually(lambda: len(statuses) >= during + 50, timeout=20)
            await asyncio.sleep(1.5)  # the outage outlasts a telemetry flush (every second)
        finally:
            stop.set()
            await flowing
            await asyncio.to_thread(own_nats.restart)
        assert statuses and set(statuses) == {200}, statuses
        sent = 5 + len(statuses)
        # counted in the proxy the whole time...
        stats = await families(admin(client) + "/stats/prometheus")
        assert edge_requests(stats, "source") == sent
        # ...and nothing lost: once the bus is back, the batches are applied (~2 s; the
        # clients reconnect with a jittered backoff of up to 5 s)...
        await eventually(lambda: applied_requests(tel, 2 * sent), timeout=15)
        # ...and promptly in the mesh-wide totals: the service's watch of its ledgers
        # resumes as soon as it reconnects (it took 10-20 s, waiting for heartbeats)
        await eventually(lambda: edge_totals_are(http(tel) + "/metrics", sent), timeout=5)
        # spans and access records published after the restart still reach the views
        async with session.get("http://reviews:9080/after-restart", proxy=outbound(client)) as r:
            assert r.status == 200

        async def access_after_restart() -> bool:
            url = f"{http(tel)}/api/access?service=reviews&limit=1000"
            async with session.get(url) as r:
                records = (await r.json())["records"]
            return any(rec["path"] == "/after-restart" for rec in records)

        await eventually(access_after_restart, timeout=10)


async def test_tcp_connections_counted_on_both_sides(mesh: MeshHarness) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data + data)  # answers twice what it got
            await writer.drain()
        writer.close()

    app = await asyncio.start_server(echo, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    server = await mesh.sidecar("cache", "v1", app=False, tcp_ports=[app_port])
    local = free_port()
    client = await mesh.sidecar(
        "client", "v1", app=False, tcp_upstreams=[f"cache:{app_port}={local}"]
    )
    payload = b"ping" * 5_000
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", local)
        writer.write(payload)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(-1), 5) == payload * 2
        writer.close()

    def tcp(fams: dict[str, Any], metric: str, reporter: str) -> float:
        return total(fams, metric, metric + "_total", reporter=reporter)

    for sc, reporter in ((client, "source"), (server, "destination")):

        async def closed(sc: Any = sc, reporter: str = reporter) -> Any:
            fams = await families(admin(sc) + "/stats/prometheus")
            return fams if tcp(fams, "istio_tcp_connections_closed", reporter) == 3 else None

        fams = await eventually(closed, timeout=10)
        assert tcp(fams, "istio_tcp_connections_opened", reporter) == 3
        # "received" is the request direction, "sent" the response direction
        assert tcp(fams, "istio_tcp_received_bytes", reporter) == 3 * len(payload)
        assert tcp(fams, "istio_tcp_sent_bytes", reporter) == 3 * 2 * len(payload)
        (labels,) = {
            json.dumps(s.labels, sort_keys=True)
            for s in samples(
                fams, "istio_tcp_connections_opened", "istio_tcp_connections_opened_total"
            )
        }
        got = json.loads(labels)
        # the destination names the caller too: the registry knows the instance
        # behind the certificate (it used to say "unknown")
        assert got["source_workload"] == "client-v1"
        assert got["source_app"] == "client"
        assert got["source_version"] == "v1"
        assert got["source_principal"] == "spiffe://cluster.local/ns/default/sa/client"
        assert got["destination_workload"] == "cache-v1"
        assert got["destination_service"] == "cache.default.svc.cluster.local"
        assert got["request_protocol"] == "tcp"
        assert got["source_cluster"] == got["destination_cluster"] == "Kubernetes"
        # Istio's build gauge, on every proxy
        (build,) = samples(fams, "istio_build", "istio_build")
        assert build.labels == {"component": "proxy", "tag": mesh_version} and build.value == 1
    app.close()


async def test_example_consumer_prints_the_sidecars_records(
    mesh: MeshHarness, nats_server, etcd_server, prefix
) -> None:
    k = 4
    async with telemetry_service(nats_server.url, etcd_server.url, prefix) as tel:
        _, client = await pair(mesh)
        async with aiohttp.ClientSession() as session:
            await send(session, client, k)
        await eventually(lambda: edge_totals_are(http(tel) + "/metrics", k), timeout=15)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(ROOT / "examples" / "telemetry_consumer.py"), "--nats",
         mesh.nats_url, "--prefix", prefix, "--kind", "access", "--count", str(2 * k),
         "--timeout", "10"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2 * k
    assert {(r["reporter"], r["method"], r["status"]) for r in lines} == {
        ("source", "POST", 200),
        ("destination", "POST", 200),
    }
    assert all(r["path"] == "/reviews/1" and r["bytes_received"] == len(BODY) for r in lines)
