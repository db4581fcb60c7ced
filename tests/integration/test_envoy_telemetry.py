"""Telemetry from a real Envoy: its gRPC access logs (the translator's loggers) reach
the sidecar's access-log service on a Unix socket, which feeds the same recorder as the
Python data plane; from there the publisher takes them to JetStream and the telemetry
service counts them.

What a user would notice: every request and connection through Envoy counted exactly
once, with Envoy's response flags (UF for a refused endpoint, UH for none, NR for no
route), Istio's labels on both reporters (the caller's identity from its certificate
on the inbound side, the chosen endpoint's workload on the outbound side), a sampled
request's hops in `/api/traces`, and the counts exact in the telemetry service's
`/metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import random
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from mesh import identity
from mesh import telemetry as wire
from mesh.bus import Bus
from mesh.messages import Endpoint, EndpointSet
from mesh.servers import free_port
from proxy.envoy.access_log_convert import AccessLogConverter, LocalProxy, peer_metadata_filter
from proxy.envoy.access_log_service import AccessLogIngest, AccessLogServer, AccessLogServerError
from proxy.envoy.translate.access_log import http_access_log, tcp_access_log
from proxy.telemetry import TelemetryPublisher, TelemetryRecorder, own_workload
from services.ca import issuing
from services.telemetry import TelemetryService
from tests.envoy_support import envoy_binary
from tests.support import eventually, running, service_config

TD = "cluster.local"
ALS_CLUSTER = "meshwork_access_log"
RATINGS = "ratings.default.svc.cluster.local"
DETAILS = "details.default.svc.cluster.local"
EMPTY = "empty.default.svc.cluster.local"
REVIEWS = "reviews.default.svc.cluster.local"
REVIEWS_ID = identity.spiffe_id(TD, "default", "reviews")
PRODUCTPAGE_ID = identity.spiffe_id(TD, "default", "productpage")
RATINGS_ID = identity.spiffe_id(TD, "default", "ratings")
PRODUCTPAGE_PEER = "workload=productpage-v1;namespace=default;app=productpage;version=v1"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"

# what the test sends, and what each must be counted as
N_OK, N_UF, N_UH, N_NR, N_DIRECT, N_INBOUND, N_TCP = 7, 3, 2, 2, 1, 4, 2
N_HTTP = N_OK + N_UF + N_UH + N_NR + N_DIRECT + N_INBOUND


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    root: str
    reviews: tuple[str, str]  # cert, key (PEM): the inbound listener's
    productpage: tuple[Path, Path]  # the caller's, as files for ssl


def make_pki(directory: Path) -> Pki:
    now = dt.datetime.now(dt.UTC)
    root_key = identity.generate_key()
    root = issuing.create_root(root_key, TD, now, dt.timedelta(days=1))
    issuer = issuing.Issuer(cert=root, key=root_key)

    def workload(spiffe: str) -> tuple[str, str]:
        key = identity.generate_key()
        cert = issuing.sign_workload(key.public_key(), spiffe, issuer, now, dt.timedelta(hours=1))
        return identity.cert_pem(cert).decode(), identity.private_key_pem(key).decode()

    cert, key = workload(PRODUCTPAGE_ID)
    cert_file, key_file = directory / "pp.crt", directory / "pp.key"
    cert_file.write_text(cert)
    key_file.write_text(key)
    return Pki(identity.cert_pem(root).decode(), workload(REVIEWS_ID), (cert_file, key_file))


# ---------------------------------------------------------------- Envoy's bootstrap


def _typed(name: str, type_url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": "type.googleapis.com/" + type_url, **body}}


def _static_cluster(name: str, *ports: int) -> dict[str, Any]:
    endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        for p in ports
    ]
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    }
    return cluster


def _hcm(
    log_name: str, routes: list[dict[str, Any]], filters: tuple[dict[str, Any], ...] = ()
) -> dict[str, Any]:
    return _typed(
        "envoy.filters.network.http_connection_manager",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        {
            "stat_prefix": log_name,
            "route_config": {
                "name": log_name,
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
            },
            "http_filters": [
                *filters,
                _typed(
                    "envoy.filters.http.router",
                    "envoy.extensions.filters.http.router.v3.Router",
                    {},
                ),
            ],
            # the translator's logger, as every translated HCM carries it
            "access_log": http_access_log(log_name, ALS_CLUSTER),
        },
    )


def _listener(name: str, port: int, filters: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": filters, **extra}
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [chain],
    }


def bootstrap(
    *, als_socket: Path, app_port: int, dead_port: int, ports: dict[str, int], pki: Pki
) -> dict[str, Any]:
    def route(prefix: str, cluster: str) -> dict[str, Any]:
        return {"match": {"prefix": prefix}, "route": {"cluster": cluster}}

    outbound_routes = [
        route("/ok", f"outbound|0|v1|{RATINGS}"),
        route("/refused", f"outbound|0||{DETAILS}"),
        route("/empty", f"outbound|0||{EMPTY}"),
        {"match": {"prefix": "/teapot"}, "direct_response": {"status": 418}},
    ]  # anything else: no route (404 NR)
    downstream_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"inline_string": pki.reviews[0]},
                        "private_key": {"inline_string": pki.reviews[1]},
                    }
                ],
                "validation_context": {"trusted_ca": {"inline_string": pki.root}},
            },
        },
    }
    tcp_proxy = _typed(
        "envoy.filters.network.tcp_proxy",
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        {
            "stat_prefix": "outbound_tcp",
            "cluster": f"outbound|5432||{RATINGS}",
            "access_log": tcp_access_log("outbound_tcp", ALS_CLUSTER),
        },
    )
    als = _static_cluster(ALS_CLUSTER)
    als["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"pipe": {"path": str(als_socket)}}}}
    ]
    als["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return {
        "node": {"id": "reviews-v2-0", "cluster": "reviews"},
        "static_resources": {
            "listeners": [
                _listener("outbound_http", ports["outbound"], [_hcm("outbound", outbound_routes)]),
                _listener(
                    "inbound_http",
                    ports["inbound"],
                    [_hcm("inbound", [route("/", "inbound|9080||")], (peer_metadata_filter(),))],
                    transport_socket=downstream_tls,
                ),
                _listener("outbound_tcp", ports["tcp"], [tcp_proxy]),
            ],
            "clusters": [
                als,
                _static_cluster(f"outbound|0|v1|{RATINGS}", app_port),
                _static_cluster(f"outbound|0||{DETAILS}", dead_port),
                _static_cluster(f"outbound|0||{EMPTY}"),
                _static_cluster("inbound|9080||", app_port),
                _static_cluster(f"outbound|5432||{RATINGS}", app_port),
            ],
        },
    }


# ---------------------------------------------------------------- the sidecar's side


def endpoints_of(app_port: int) -> dict[str, EndpointSet]:
    """What the registry says about the destinations Envoy was given."""
    ratings = Endpoint(
        instance="ratings-v1-0",
        address=f"127.0.0.1:{app_port}",
        labels={"app": "ratings", "version": "v1"},
        identity=RATINGS_ID,
        version="v1",
        tcp_listeners={"5432": f"127.0.0.1:{app_port}"},
    )
    return {
        RATINGS: EndpointSet(
            namespace="default", service="ratings", revision=1, endpoints=[ratings]
        )
    }


def new_recorder() -> TelemetryRecorder:
    return TelemetryRecorder(
        reporter_id=wire.new_reporter_id("reviews-v2-0", random.getrandbits(32)),
        namespace="default",
        service="reviews",
        instance="reviews-v2-0",
    )


@dataclass
class Running:
    server: AccessLogServer
    recorder: TelemetryRecorder
    ports: dict[str, int]
    pki: Pki
    peer_headers_seen: list[str]  # paths where the app got `x-meshwork-peer`


@pytest.fixture
def workdir() -> Iterator[Path]:
    # a short path: a Unix socket's path is limited to ~107 bytes
    path = Path(tempfile.mkdtemp(prefix="als-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def envoy_with_access_logs(workdir: Path) -> AsyncIterator[Running]:
    """An app, the sidecar's access-log service and recorder, and Envoy logging to it."""
    envoy = envoy_binary()
    app = web.Application()

    peer_headers_seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        if "x-meshwork-peer" in request.headers:
            peer_headers_seen.append(request.path)
        return web.Response(body=b"x" * 50)

    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    app_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", app_port).start()

    local = LocalProxy(
        workload=own_workload(
            service="reviews",
            namespace="default",
            version="v2",
            labels={"app": "reviews", "version": "v2"},
            identity=REVIEWS_ID,
        ),
        service_host=REVIEWS,
        namespace="default",
        service="reviews",
        instance="reviews-v2-0",
    )
    recorder = new_recorder()
    converter = AccessLogConverter(local, endpoints=endpoints_of(app_port).get)
    socket_path = workdir / "als.sock"
    server = AccessLogServer(socket_path, AccessLogIngest(converter, recorder))
    await server.start()

    ports = {"outbound": free_port(), "inbound": free_port(), "tcp": free_port()}
    pki = make_pki(workdir)
    config = workdir / "envoy.json"
    config.write_text(
        json.dumps(
            bootstrap(
                als_socket=socket_path,
                app_port=app_port,
                dead_port=free_port(),
                ports=ports,
                pki=pki,
            )
        )
    )
    log = (workdir / "envoy.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        envoy, "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn",
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        # static listeners start together; a probe of the TCP relay would be a connection
        http_ports = (ports["outbound"], ports["inbound"])
        await eventually(
            lambda: all(_listening(p) for p in http_ports) or proc.returncode is not None, 30
        )
        assert proc.returncode is None, (workdir / "envoy.log").read_text()
        yield Running(server, recorder, ports, pki, peer_headers_seen)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
        log.close()
        await server.stop()
        await runner.cleanup()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def send_traffic(env: Running) -> None:
    """Every kind of request the test counts, through Envoy."""
    outbound = f"http://127.0.0.1:{env.ports['outbound']}"
    sampled = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
    async with aiohttp.ClientSession() as s:

        async def get(path: str, host: str, expected: int, **headers: str) -> None:
            async with s.get(outbound + path, headers={"Host": host, **headers}) as r:
                await r.read()
                assert r.status == expected, path

        for i in range(N_OK):
            await get(f"/ok/{i}", "ratings:9080", 200, **(sampled if i == 0 else {}))
        for _ in range(N_UF):
            await get("/refused", "details", 503)
        for _ in range(N_UH):
            await get("/empty", "empty", 503)
        for _ in range(N_NR):
            await get("/nowhere", "ratings", 404)
        for _ in range(N_DIRECT):
            await get("/teapot", "ratings", 418)

        tls = ssl.create_default_context(cadata=env.pki.root)
        tls.check_hostname = False  # SPIFFE certificates name no host
        tls.load_cert_chain(*env.pki.productpage)
        inbound = f"https://127.0.0.1:{env.ports['inbound']}"
        for i in range(N_INBOUND):
            headers = {"Host": "reviews:9080", "x-meshwork-peer": PRODUCTPAGE_PEER}
            if i == 0:
                headers.update(sampled)
            async with s.get(f"{inbound}/reviews/{i}", headers=headers, ssl=tls) as r:
                await r.read()
                assert r.status == 200

    for _ in range(N_TCP):
        reader, writer = await asyncio.open_connection("127.0.0.1", env.ports["tcp"])
        writer.write(b"GET /tcp HTTP/1.1\r\nHost: ratings\r\nConnection: close\r\n\r\n")
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
        await writer.wait_closed()


def counter(recorder: TelemetryRecorder, name: str, **labels: str) -> float:
    return sum(
        value
        for (n, key), value in recorder.totals().counters.items()
        if n == name and all(dict(key).get(k) == v for k, v in labels.items())
    )


async def all_logged(env: Running) -> None:
    """Envoy flushes its access logs every second: wait until every entry arrived."""
    counts = env.server.counts
    await eventually(lambda: counts.http >= N_HTTP and counts.tcp >= N_TCP, timeout=20)
    assert (counts.http, counts.tcp, counts.failed) == (N_HTTP, N_TCP, 0)


# ---------------------------------------------------------------- tests


async def test_envoy_access_logs_become_exact_records_with_flags_and_labels(
    workdir: Path,
) -> None:
    async with envoy_with_access_logs(workdir) as env:
        await send_traffic(env)
        await all_logged(env)
        rec = env.recorder
        total = wire.REQUESTS_TOTAL
        assert counter(rec, total) == N_HTTP
        assert counter(rec, total, reporter="source") == N_HTTP - N_INBOUND
        ok = {
            "reporter": "source",
            "source_workload": "reviews-v2",
            "source_principal": REVIEWS_ID,
            "destination_workload": "ratings-v1",
            "destination_principal": RATINGS_ID,
            "destination_service": RATINGS,
            "destination_version": "v1",
            "response_code": "200",
            "response_flags": "-",
            "connection_security_policy": "unknown",
        }
        assert counter(rec, total, **ok) == N_OK
        refused = {"response_code": "503", "response_flags": "UF", "destination_service": DETAILS}
        assert counter(rec, total, **refused) == N_UF
        empty = {"response_code": "503", "response_flags": "UH", "destination_service": EMPTY}
        assert counter(rec, total, **empty) == N_UH
        no_route = {"response_code": "404", "response_flags": "NR", "destination_service": RATINGS}
        assert counter(rec, total, **no_route) == N_NR
        assert counter(rec, total, response_code="418", response_flags="-") == N_DIRECT
        inbound = {
            "reporter": "destination",
            "source_workload": "productpage-v1",
            "source_workload_namespace": "default",
            "source_principal": PRODUCTPAGE_ID,
            "source_app": "productpage",
            "destination_workload": "reviews-v2",
            "destination_service": REVIEWS,
            "connection_security_policy": "mutual_tls",
            "response_code": "200",
        }
        assert counter(rec, total, **inbound) == N_INBOUND
        assert env.peer_headers_seen == []  # moved into metadata before the app

        tcp = {"reporter": "source", "destination_workload": "ratings-v1", "response_flags": "-"}
        assert counter(rec, wire.TCP_OPENED, **tcp) == N_TCP
        assert counter(rec, wire.TCP_CLOSED, **tcp) == N_TCP
        assert counter(rec, wire.TCP_RECEIVED_BYTES, **tcp) == N_TCP * len(
            b"GET /tcp HTTP/1.1\r\nHost: ratings\r\nConnection: close\r\n\r\n"
        )
        assert counter(rec, wire.TCP_SENT_BYTES, **tcp) > N_TCP * 50

        batches = {out.kind: wire.decode(out.payload) for out in rec.outgoing()}
        access = batches["access"]
        assert isinstance(access, wire.AccessBatch) and len(access.records) == N_HTTP
        refused_records = [r for r in access.records if r.response_flags == "UF"]
        assert len(refused_records) == N_UF
        assert all(r.status == 503 and r.path == "/refused" for r in refused_records)
        assert all(r.request_id for r in access.records)  # Envoy's x-request-id
        spans = batches["spans"]
        assert isinstance(spans, wire.SpanBatch)
        assert sorted(s.kind for s in spans.spans) == ["client", "server"]
        assert {s.trace_id for s in spans.spans} == {TRACE_ID}


async def test_envoy_requests_counted_exactly_by_the_telemetry_service(
    workdir: Path, nats_server: Any, etcd_server: Any, prefix: str
) -> None:
    async with running(
        TelemetryService(service_config(nats_server.url, etcd_server.url, prefix))
    ) as svc:
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        try:
            async with envoy_with_access_logs(workdir) as env:
                publisher = TelemetryPublisher(env.recorder, bus)
                await send_traffic(env)
                await all_logged(env)
                await publisher.flush()
                assert env.recorder.outgoing() == [], "every batch stored by the stream"
            base = f"http://127.0.0.1:{svc.http_port}"

            async def scraped() -> dict[str, Any] | None:
                async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
                    fams = {f.name: f for f in text_string_to_metric_families(await r.text())}
                fam = fams.get("istio_requests")
                seen = sum(s.value for s in fam.samples if s.name.endswith("_total")) if fam else 0
                return fams if seen >= N_HTTP else None

            fams = await eventually(scraped, timeout=15)

            def count(family: str, name: str, **labels: str) -> float:
                return sum(
                    s.value
                    for s in fams[family].samples
                    if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
                )

            total = "istio_requests_total"
            assert count("istio_requests", total) == N_HTTP
            assert count("istio_requests", total, response_flags="UF") == N_UF
            assert count("istio_requests", total, response_flags="UH") == N_UH
            assert count("istio_requests", total, response_flags="NR") == N_NR
            assert (
                count(
                    "istio_requests",
                    total,
                    reporter="destination",
                    source_workload="productpage-v1",
                    source_principal=PRODUCTPAGE_ID,
                    connection_security_policy="mutual_tls",
                )
                == N_INBOUND
            )
            assert (
                count(
                    "istio_request_duration_milliseconds",
                    "istio_request_duration_milliseconds_count",
                    destination_workload="ratings-v1",
                    response_code="200",
                )
                == N_OK
            )
            assert (
                count("istio_tcp_connections_closed", "istio_tcp_connections_closed_total") == N_TCP
            )

            async def trace() -> Any:
                async with (
                    aiohttp.ClientSession() as s,
                    s.get(f"{base}/api/traces/{TRACE_ID}") as r,
                ):
                    return await r.json() if r.status == 200 else None

            tree = await eventually(trace, timeout=10)
            # one client span (outbound hop) and one server span (inbound hop)
            assert (tree["spans"], tree["services"]) == (2, ["reviews"])
            assert sorted(root["kind"] for root in tree["roots"]) == ["client", "server"]

            async def access() -> Any:
                async with (
                    aiohttp.ClientSession() as s,
                    s.get(f"{base}/api/access?limit=1000") as r,
                ):
                    records = (await r.json())["records"]
                    return records if len(records) >= N_HTTP else None

            records = await eventually(access, timeout=10)
            assert len(records) == N_HTTP
            assert sum(1 for r in records if r.get("response_flags") == "UF") == N_UF
        finally:
            await bus.close()


async def test_wait_quiet_lets_envoy_stop_without_losing_entries(workdir: Path) -> None:
    """Envoy drops the entries it buffered when it exits (measured: all of them when
    stopped right after the traffic): waiting for a quiet access-log stream first
    loses none."""
    async with envoy_with_access_logs(workdir) as env:
        await send_traffic(env)
        assert await env.server.wait_quiet()
        counts = env.server.counts
        assert (counts.http, counts.tcp) == (N_HTTP, N_TCP)


async def test_a_second_service_on_the_same_socket_is_refused(workdir: Path) -> None:
    """Two sidecars must never share an access-log socket; a stale one is replaced."""
    path = workdir / "als.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # left by a process that died: nobody listens
    stale.close()

    def server() -> AccessLogServer:
        converter = AccessLogConverter(
            LocalProxy(
                workload=own_workload(
                    service="reviews", namespace="default", version="", labels={}, identity=""
                ),
                service_host=REVIEWS,
                namespace="default",
                service="reviews",
                instance="reviews-0",
            )
        )
        return AccessLogServer(path, AccessLogIngest(converter, new_recorder()))

    async with server():
        assert path.stat().st_mode & 0o777 == 0o600
        with pytest.raises(AccessLogServerError, match=str(path)):
            await server().start()
    assert not path.exists()
