"""`--envoy-telemetry stats` end to end (docs/architecture.md §7): two Envoy sidecars
whose Envoys count every request with the stats access logger; their agents read the
counters each second and publish the same Istio series as in the default mode, which
the telemetry service counts exactly (both reporters, Istio's labels); only the failed
requests (and a 1 % sample) become access records."""

from __future__ import annotations

import collections
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from services.telemetry import TelemetryService
from tests.envoy_support import requires_envoy
from tests.support import MeshHarness, eventually, running, service_config

pytestmark = requires_envoy

PRODUCTPAGE_ID = "spiffe://cluster.local/ns/default/sa/productpage"
REVIEWS = "reviews.default.svc.cluster.local"
N_OK = 7
N_ERR = 2  # a host outside the mesh that does not resolve: Envoy's own error answer


async def _get(client: Any, url: str) -> int:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, proxy=f"http://127.0.0.1:{client.ports['outbound']}") as r,
    ):
        await r.read()
        return r.status


async def test_envoy_counts_requests_and_the_telemetry_service_sees_exact_istio_series(
    nats_server: Any, etcd_server: Any, prefix: str
) -> None:
    async with (
        running(TelemetryService(service_config(nats_server.url, etcd_server.url, prefix))) as svc,
        MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh,
    ):
        server = await mesh.sidecar("reviews", "v1", dataplane="envoy", envoy_telemetry="stats")
        client = await mesh.sidecar(
            "productpage", dataplane="envoy", envoy_telemetry="stats", envoy_on_demand=False
        )
        # every answer the client saw is a request its Envoy counted, warm-up included
        statuses: collections.Counter[int] = collections.Counter()

        async def reaches() -> bool:
            try:
                status = await _get(client, "http://reviews:9080/warm-up")
            except aiohttp.ClientError:
                return False
            statuses[status] += 1
            return status == 200

        await eventually(reaches, timeout=20)
        for _ in range(N_OK - 1):
            statuses[await _get(client, "http://reviews:9080/counted")] += 1
        for _ in range(N_ERR):
            statuses[await _get(client, "http://nowhere.invalid:9080/")] += 1
        errors = [status for status in statuses if status != 200]
        assert statuses[200] == N_OK and len(errors) == 1, statuses
        error = errors[0]
        assert statuses[error] == N_ERR, statuses
        base = f"http://127.0.0.1:{svc.http_port}"

        async def scraped() -> dict[str, Any] | None:
            async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
                fams = {f.name: f for f in text_string_to_metric_families(await r.text())}
            fam = fams.get("istio_requests")
            seen = sum(s.value for s in fam.samples if s.name.endswith("_total")) if fam else 0
            # both reporters' 200s, the source's errors, and the failed warm-ups
            return fams if seen >= 2 * N_OK + sum(statuses.values()) - N_OK else None

        fams = await eventually(scraped, timeout=15)

        def count(family: str, name: str, **labels: str) -> float:
            return sum(
                s.value
                for s in fams[family].samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            )

        total = "istio_requests_total"
        ok = dict(
            response_code="200",
            request_protocol="http",
            response_flags="-",
            source_workload="productpage-v1",
            source_principal=PRODUCTPAGE_ID,
            destination_workload="reviews-v1",
            destination_service=REVIEWS,
            destination_version="v1",
        )
        assert count("istio_requests", total, reporter="source", **ok) == N_OK
        assert (
            count(
                "istio_requests",
                total,
                reporter="destination",
                connection_security_policy="mutual_tls",
                **ok,
            )
            == N_OK
        )
        assert (
            count(
                "istio_requests",
                total,
                reporter="source",
                response_code=str(error),
                source_workload="productpage-v1",
            )
            == N_ERR
        )
        assert count("istio_requests", total) == sum(statuses.values()) + N_OK

        # histograms: Envoy merges them one read after the counters, so wait for them
        async def durations() -> bool:
            nonlocal fams
            async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
                fams = {f.name: f for f in text_string_to_metric_families(await r.text())}
            name = "istio_request_duration_milliseconds"
            return (
                name in fams
                and count(name, name + "_bucket", reporter="source", le="+Inf", **ok) == N_OK
            )

        await eventually(durations, timeout=10)

        # access records: the errors are kept (>= 400), the 200s only sampled (1 %)
        async def access() -> Any:
            async with aiohttp.ClientSession() as s, s.get(f"{base}/api/access?limit=1000") as r:
                records = (await r.json())["records"]
            failed = [r for r in records if r.get("status") == error]
            return records if len(failed) >= N_ERR else None

        records = await eventually(access, timeout=10)
        assert sum(1 for r in records if r.get("status") == error) == N_ERR
        # the 200s are sampled at 1 %: of 14 (two reporters), seldom any
        assert sum(1 for r in records if r.get("status") == 200) <= 3, records
        assert server.dataplane.info()["request_stats"]["reads"] >= 1
