"""Sidecars routing per applied YAML, live, with real NATS, etcd, registry and config service."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

import aiohttp
import pytest

from tests.support import (
    MeshHarness,
    destination_rule_yaml,
    eventually,
    ingress_gateway_yaml,
    route_all_yaml,
)

SUBSETS = destination_rule_yaml("reviews")

SPLIT_80_20 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 80
    - destination: {host: reviews, subset: v2}
      weight: 20
"""

ALL_V2 = route_all_yaml("reviews", "v2")

MATCHES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers: {end-user: {exact: jason}}
    route:
    - destination: {host: reviews, subset: v2}
  - match:
    - uri: {prefix: /v2api/}
    rewrite: {uri: /api/}
    route:
    - destination: {host: reviews, subset: v2}
  - match:
    - uri: {exact: /moved}
    redirect: {uri: /new-home}
  - match:
    - uri: {prefix: /static}
    directResponse: {status: 418, body: {string: "teapot"}}
  - route:
    - destination: {host: reviews, subset: v1}
    headers:
      response:
        set: {x-routed-by: meshwork}
"""


@pytest.fixture
async def mesh(nats_server, etcd_server, prefix):
    async with MeshHarness(nats_server.url, etcd_server.url, prefix) as h:
        yield h


def outbound(sc) -> str:
    return f"http://127.0.0.1:{sc.ports['outbound']}"


async def get_json(session: aiohttp.ClientSession, sc, url: str, **kw):
    async with session.get(url, proxy=outbound(sc), **kw) as r:
        return (
            r.status,
            (await r.json() if r.content_type == "application/json" else await r.text()),
            r.headers,
        )


async def versions(
    session, client, n: int, url: str = "http://reviews:9080/", **kw
) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, body, _ = await get_json(session, client, url, **kw)
        assert status == 200, body
        seen[body["version"]] += 1
    return seen


async def until_synced(mesh: MeshHarness, revision: int) -> None:
    async def synced() -> bool:
        entries = [e for e in await mesh.proxy_status() if ".config.route." in e.subject]
        return bool(entries) and all(
            e.state == "SYNCED" and e.applied_revision >= revision for e in entries
        )

    await eventually(synced, timeout=10)


async def test_weighted_split_and_live_change(mesh: MeshHarness) -> None:
    client = await mesh.sidecar("productpage")
    await mesh.sidecar("reviews", "v1")
    await mesh.sidecar("reviews", "v2")
    async with aiohttp.ClientSession() as session:
        # no VirtualService: both versions get traffic
        await eventually(lambda: _both_versions(session, client), timeout=10)
        await mesh.apply(SUBSETS)
        reply = await mesh.apply(SPLIT_80_20)
        await until_synced(mesh, reply.revision)
        seen = await versions(session, client, 1000)
        # 80/20 split: binomial sd is ~12.6 for 1000 draws; allow 5 sd
        assert abs(seen["v1"] - 800) <= 63, seen
        reply = await mesh.apply(ALL_V2)
        await until_synced(mesh, reply.revision)
        assert await versions(session, client, 50) == Counter({"v2": 50})


async def _both_versions(session, client) -> bool:
    seen = await versions(session, client, 20)
    return set(seen) == {"v1", "v2"}


async def test_header_uri_redirect_direct_response(mesh: MeshHarness) -> None:
    client = await mesh.sidecar("productpage")
    await mesh.sidecar("reviews", "v1")
    await mesh.sidecar("reviews", "v2")
    async with aiohttp.ClientSession() as session:
        await versions(session, client, 1)  # the client now follows reviews
        await mesh.apply(SUBSETS)
        reply = await mesh.apply(MATCHES)
        await until_synced(mesh, reply.revision)
        assert await versions(session, client, 10, headers={"end-user": "jason"}) == Counter(
            {"v2": 10}
        )
        assert await versions(session, client, 10, headers={"end-user": "bob"}) == Counter(
            {"v1": 10}
        )
        status, body, headers = await get_json(session, client, "http://reviews:9080/plain")
        assert status == 200 and body["version"] == "v1" and headers["x-routed-by"] == "meshwork"
        _status, body, _ = await get_json(
            session, client, "http://reviews.default.svc.cluster.local/v2api/items?x=1"
        )
        assert (body["version"], body["path"]) == ("v2", "/api/items?x=1")
        async with session.get(
            "http://reviews/moved", proxy=outbound(client), allow_redirects=False
        ) as r:
            assert r.status == 301 and r.headers["location"] == "http://reviews/new-home"
        async with session.get("http://reviews/static/x.css", proxy=outbound(client)) as r:
            assert r.status == 418 and await r.text() == "teapot"
        # origin-form with Host works too (plain requests routed by Host)
        async with session.get(
            f"{outbound(client)}/plain", headers={"Host": "reviews.default"}
        ) as r:
            assert (await r.json())["version"] == "v1"


async def test_unknown_host_and_no_endpoints(mesh: MeshHarness) -> None:
    client = await mesh.sidecar("productpage")
    await mesh.apply(SUBSETS)  # names reviews, but no instance runs
    async with aiohttp.ClientSession() as session:
        async with session.get("http://nosuchservice/", proxy=outbound(client)) as r:
            assert r.status == 502 and r.headers["x-mesh-response-flags"] == "NR"
        async with session.get("http://reviews/", proxy=outbound(client)) as r:
            assert r.status == 503 and r.headers["x-mesh-response-flags"] == "UH"


async def test_route_change_under_continuous_traffic_has_no_failures(mesh: MeshHarness) -> None:
    client = await mesh.sidecar("productpage")
    await mesh.sidecar("reviews", "v1")
    await mesh.sidecar("reviews", "v2")
    await mesh.apply(SUBSETS)
    failures: list[object] = []
    seen: Counter[str] = Counter()
    stop = asyncio.Event()

    async def load() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                try:
                    status, body, _ = await get_json(session, client, "http://reviews/")
                    if status != 200:
                        failures.append((status, body))
                    else:
                        seen[body["version"]] += 1
                except Exception as e:  # any transport error is a failure too
                    failures.append(e)

    tasks = [asyncio.create_task(load()) for _ in range(4)]
    for text in (SPLIT_80_20, ALL_V2, SPLIT_80_20, ALL_V2):
        await mesh.apply(text)
        await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*tasks)
    assert failures == []
    assert sum(seen.values()) > 100 and seen["v2"] > 0


async def test_restarted_proxy_fetches_current_config(mesh: MeshHarness) -> None:
    await mesh.sidecar("reviews", "v1")
    await mesh.sidecar("reviews", "v2")
    await mesh.apply(SUBSETS)
    await mesh.apply(ALL_V2)
    # a proxy started after the change gets the current config on its first request
    client = await mesh.sidecar("productpage")
    async with aiohttp.ClientSession() as session:
        assert await versions(session, client, 10) == Counter({"v2": 10})


async def test_invalid_resource_keeps_previous_config_serving(mesh: MeshHarness) -> None:
    from mesh import errors

    client = await mesh.sidecar("productpage")
    await mesh.sidecar("reviews", "v1")
    await mesh.sidecar("reviews", "v2")
    await mesh.apply(SUBSETS)
    await mesh.apply(ALL_V2)
    bad = ALL_V2.replace("subset: v2}", "subset: v1}\n      weight: 120")
    with pytest.raises(errors.RemoteError) as e:
        await mesh.apply(bad, "bad.yaml")
    assert any("spec.http[0].route[0].weight" in d for d in e.value.details)
    async with aiohttp.ClientSession() as session:
        assert await versions(session, client, 10) == Counter({"v2": 10})


async def test_proxy_status_reports_synced(mesh: MeshHarness) -> None:
    client = await mesh.sidecar("productpage")
    await mesh.sidecar("reviews", "v1")
    async with aiohttp.ClientSession() as session:
        await versions(session, client, 1)
    reply = await mesh.apply(SUBSETS)
    await until_synced(mesh, reply.revision)
    entries = await mesh.proxy_status()
    routes = [e for e in entries if ".config.route." in e.subject]
    assert [e.proxy for e in routes] == [client.settings.instance]
    assert routes[0].subject.endswith(".config.route.default.reviews")
    # every sidecar follows its own service's inbound policy too
    inbound = sorted(
        e.subject.rsplit(".", 1)[1] for e in entries if ".config.inbound." in e.subject
    )
    assert inbound == ["productpage", "reviews"]
    admin = f"http://127.0.0.1:{client.ports['admin']}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{admin}/ready") as r:
            assert r.status == 200
        async with session.get(f"{admin}/config_dump") as r:
            dump = await r.json()
        assert dump["destinations"]["default/reviews"]["route_table"]["revision"] >= reply.revision
        async with session.get(f"{admin}/clusters") as r:
            clusters = (await r.json())["clusters"]
        assert [e["version"] for c in clusters if c["subset"] == "v1" for e in c["endpoints"]] == [
            "v1"
        ]
        async with session.get(f"{admin}/stats/prometheus") as r:
            stats = await r.text()
        assert 'meshwork_proxy_requests_total{listener="outbound",response_code="200"' in stats


async def test_malformed_request_rejected_before_upstream(mesh: MeshHarness) -> None:
    client = await mesh.sidecar("productpage")
    server = await mesh.sidecar("reviews", "v1")
    port = server.ports["inbound"]
    bad = (
        b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n"
    )
    for target in (port, client.ports["outbound"]):
        reply = await asyncio.to_thread(_raw_exchange, target, bad)
        assert reply.startswith(b"HTTP/1.1 400"), reply[:80]
    assert server.echo.requests == 0


def _raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:  # the proxy closed the connection
                return b"".join(chunks)
            chunks.append(chunk)


GATEWAY = ingress_gateway_yaml(
    "bookinfo-gateway",
    "bookinfo",
    """\
  - match:
    - uri: {prefix: /reviews}
    route:
    - destination: {host: reviews, subset: v2}
""",
)


async def test_gateway_routes_by_bound_virtual_services(mesh: MeshHarness) -> None:
    from mesh.servers import free_port

    await mesh.sidecar("reviews", "v1")
    await mesh.sidecar("reviews", "v2")
    await mesh.apply(SUBSETS)
    port = free_port()
    gateway = await mesh.sidecar(
        "ingressgateway",
        "",
        app=False,
        gateway=True,
        gateway_port=port,
        labels={"istio": "ingressgateway"},
    )
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        # nothing bound yet: no route
        async with session.get(f"{url}/reviews/1") as r:
            assert r.status == 404 and r.headers["x-mesh-response-flags"] == "NR"
        await mesh.apply(GATEWAY)

        async def routed() -> bool:
            async with session.get(
                f"{url}/reviews/1", headers={"Host": "bookinfo.example.com"}
            ) as r:
                return r.status == 200 and (await r.json())["version"] == "v2"

        await eventually(routed, timeout=10)
        async with session.get(f"{url}/other") as r:
            assert r.status == 404
    entries = await mesh.proxy_status()
    gw = [e for e in entries if e.proxy == gateway.settings.instance]
    assert gw and gw[0].state == "SYNCED" and ".config.gateway." in gw[0].subject


async def test_tcp_relay_between_sidecars(mesh: MeshHarness) -> None:
    from mesh.servers import free_port

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    app = await asyncio.start_server(echo, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    await mesh.sidecar("cache", "v1", app=False, tcp_ports=[app_port])
    local = free_port()
    await mesh.sidecar("client", "v1", app=False, tcp_upstreams=[f"cache:{app_port}={local}"])

    async def roundtrip() -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", local)
        payload = b"ping" * 10_000
        writer.write(payload)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
        return got == payload

    assert await eventually(roundtrip, timeout=10)
    app.close()
