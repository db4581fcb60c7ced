"""The JSON API the dashboard's pages read, against a real small mesh: the series of a
service show the 500s of an injected fault with flag FI, traces are searchable, the
access log filters and streams as server-sent events, the instances show their
proxies' sync state, the config page lists the resources in force."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.support import eventually
from tests.support_dashboard import REVIEWS_ABORT_YAML, small_mesh


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as r:
        return r.status, await r.json(content_type=None)


async def test_dashboard_api_against_a_running_mesh(nats_server, etcd_server, prefix) -> None:
    async with (
        small_mesh(nats_server.url, etcd_server.url, prefix) as m,
        aiohttp.ClientSession() as s,
    ):
        sent = await m.send(5)
        assert sent == [200] * 5
        await m.mesh.apply(REVIEWS_ABORT_YAML)

        async def aborted() -> bool:
            sent.extend(await m.send(1))
            return sent[-1] == 500

        await eventually(aborted, timeout=15)
        sent.extend(await m.send(4))
        assert sent[-5:] == [500] * 5
        expected = {("200", "-"): sent.count(200), ("500", "FI"): sent.count(500)}

        async def inbound_has_fault() -> Any:
            status, body = await get(
                s,
                f"{m.url}/api/series?kind=service&name=reviews&namespace=default"
                "&direction=inbound&window=300",
            )
            assert status == 200
            rows = {(r["code"], r["flag"]): r["requests"] for r in body["by_code_flag"]}
            return body if rows == expected else None

        series = await eventually(inbound_has_fault, timeout=20)
        assert series["by_flag"]["FI"] == sent.count(500) and series["summary"]["success_rate"] < 1
        assert series["bucket_s"] == 10 and series["points"]
        assert any(p["codes"].get("500") for p in series["points"])
        assert series["peers"][0]["peer"] == "productpage-v1.default"
        # the caller's outbound view of the same edge
        _, out = await get(
            s, f"{m.url}/api/series?kind=workload&name=productpage-v1&direction=outbound"
        )
        # aborted requests never reached a workload: their destination is the service
        assert {p["peer"]: p["success_rate"] for p in out["peers"]} == {
            "reviews-v2.default": 1.0,
            "reviews.default": 0.0,
        }

        # the graph shows the failing edge; the server side saw the good one over mTLS
        _, graph = await get(s, f"{m.url}/api/graph?window=600")
        edges = {e["to"]: e for e in graph["edges"] if e["from"] == "productpage-v1.default"}
        assert edges["reviews.default"]["success_rate"] == 0.0
        assert edges["reviews.default"]["mtls"] is None  # no server side reported it
        assert edges["reviews-v2.default"]["mtls"] == 1.0

        # server-sent events: the graph now, the same JSON
        async with s.get(f"{m.url}/api/events?window=600") as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            first = await r.content.readuntil(b"\n\n")
        event, data = first.decode().strip().split("\n")
        assert event == "event: graph"
        assert any(e["from"] == "productpage-v1.default" for e in json.loads(data[6:])["edges"])

        # access log filters: status class, flag, path
        _, acc = await get(s, f"{m.url}/api/access?status=5xx&flag=FI&limit=100")
        assert acc["records"] and all(
            r["status"] == 500 and r["response_flags"] == "FI" for r in acc["records"]
        )
        _, acc = await get(s, f"{m.url}/api/access?status=200&path=/reviews/&service=reviews")
        assert len(acc["records"]) == sent.count(200)
        assert all(r["reporter"] == "destination" for r in acc["records"])
        async with s.get(f"{m.url}/api/access/events?flag=FI&limit=1") as r:
            line = (await r.content.readuntil(b"\n\n")).decode()
        assert line.startswith("event: access\n") and '"response_flags":"FI"' in line
        for bad in ("status=abc", "flag=fi!", "path=" + "x" * 2000):
            status, body = await get(s, f"{m.url}/api/access?{bad}")
            assert status == 400 and body["error"].split(":")[0] in bad

        # traces: by id prefix, by service, errors only, minimum duration; then the tree
        trace_id = await m.traced_chain()

        async def found() -> Any:
            _, body = await get(s, f"{m.url}/api/traces?trace_id={trace_id[:12]}")
            return body["traces"] if body["traces"] and body["traces"][0]["spans"] == 4 else None

        (summary,) = await eventually(found, timeout=15)
        assert summary["trace_id"] == trace_id and summary["services"] == [
            "svc-a",
            "svc-b",
            "svc-c",
        ]
        _, by_service = await get(s, f"{m.url}/api/traces?service=svc-c")
        assert trace_id in {t["trace_id"] for t in by_service["traces"]}
        _, errors_only = await get(s, f"{m.url}/api/traces?errors=1")
        assert trace_id not in {t["trace_id"] for t in errors_only["traces"]}
        _, too_slow = await get(s, f"{m.url}/api/traces?min_ms=3600000")
        assert too_slow["traces"] == []
        status, _ = await get(s, f"{m.url}/api/traces?trace_id=xyz")
        assert status == 400

        # instances with health and config sync; the config in force
        async def synced() -> Any:
            status, body = await get(s, f"{m.url}/api/instances?service=reviews")
            assert status == 200, body
            return body if body["instances"] and body["instances"][0]["sync"] == "SYNCED" else None

        inst = await eventually(synced, timeout=15)
        (one,) = inst["instances"]
        assert one["version"] == "v2" and one["health"] == "healthy"
        status, cfg = await get(s, f"{m.url}/api/config")
        assert status == 200
        (vs,) = cfg["kinds"]["VirtualService"]
        assert (
            vs["name"] == "reviews" and vs["spec"]["http"][0]["fault"]["abort"]["httpStatus"] == 500
        )
        assert {p["service"] for p in cfg["proxies"]} >= {"reviews", "productpage"}
        status, body = await get(s, f"{m.url}/api/series?kind=pod&name=x")
        assert status == 400 and "kind" in body["error"]

        # the pages themselves, served without anything from outside
        async with s.get(f"{m.url}/") as r:
            assert r.status == 200 and '<script type="module" src="/ui/app.js">' in await r.text()
        for asset in ("app.js", "graph.js", "svg.js", "style.css"):
            async with s.get(f"{m.url}/ui/{asset}") as r:
                text = await r.text()
                assert r.status == 200 and "http://" not in text.replace(
                    "http://www.w3.org/2000/svg", ""
                )
        await asyncio.sleep(0)


async def test_open_event_streams_end_when_the_service_stops(
    nats_server, etcd_server, prefix
) -> None:
    """A browser left open on the dashboard does not hold the service's shutdown."""
    from services.telemetry import TelemetryService
    from tests.support import running, service_config

    async with running(
        TelemetryService(service_config(nats_server.url, etcd_server.url, prefix, "tel-0"))
    ) as tel:
        url = f"http://127.0.0.1:{tel.http_port}"
        session = aiohttp.ClientSession()
        graph = await session.get(f"{url}/api/events")
        access = await session.get(f"{url}/api/access/events")
        assert (await graph.content.readuntil(b"\n\n")).startswith(b"event: graph")
    try:
        # the service has stopped (`running` waited for it); both streams were ended
        rest = await asyncio.wait_for(graph.content.read(), 5)
        assert b"event: graph" not in rest or rest.endswith(b"\n\n")
        assert await asyncio.wait_for(access.content.read(), 5) == b""
        assert graph.content.at_eof() and access.content.at_eof()
    finally:
        graph.close()
        access.close()
        await session.close()
