"""The config service against real nats-server and etcd: apply/get/delete, all-or-nothing,
compiled tables fetched and pushed live."""

from __future__ import annotations

import pytest

from mesh import errors
from mesh.bus import Bus
from mesh.compiled import RouteTable
from mesh.messages import (
    ApplyReply,
    ApplyRequest,
    DeleteReply,
    DeleteRequest,
    FetchRequest,
    GetResourcesReply,
    GetResourcesRequest,
    ProxyStatus,
    ProxyStatusReply,
    ProxyStatusRequest,
    ResourceDocument,
    ResourceRef,
    SubscriptionStatus,
)
from mesh.resources import load_yaml
from mesh.servers import NatsServer
from services.config import ConfigService
from tests.support import eventually, running, service_config

REVIEWS_V1 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""

REVIEWS_SPLIT = """
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

INVALID = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - corsPolicy: {allowOrigins: [{exact: "*"}]}
    route:
    - destination: {host: reviews, subset: v2}
"""


def docs(text: str, source: str = "test.yaml") -> list[ResourceDocument]:
    return [
        ResourceDocument(source=source, index=i, body=b)
        for i, b in enumerate(load_yaml(text, source))
    ]


async def apply(bus: Bus, text: str, source: str = "test.yaml") -> ApplyReply:
    return await bus.request(
        bus.subjects.config_apply, ApplyRequest(documents=docs(text, source)), ApplyReply
    )


async def fetch(bus: Bus, name: str = "reviews") -> RouteTable:
    return await bus.request(
        bus.subjects.config_fetch, FetchRequest(namespace="default", name=name), RouteTable
    )


@pytest.fixture
async def config_bus(nats_server, etcd_server, prefix):
    async with running(
        ConfigService(service_config(nats_server.url, etcd_server.url, prefix))
    ) as svc:
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        yield bus, svc
        await bus.close()


async def test_apply_get_fetch_and_push(config_bus) -> None:
    bus, _svc = config_bus
    pushed: list[RouteTable] = []

    async def on_route(table: RouteTable, _s: str) -> None:
        pushed.append(table)

    await bus.subscribe(bus.subjects.route("default", "reviews"), RouteTable, on_route)
    reply = await apply(bus, REVIEWS_V1)
    assert [(r.ref.kind, r.action) for r in reply.results] == [
        ("VirtualService", "created"), ("DestinationRule", "created"),
    ]  # fmt: skip
    again = await apply(bus, REVIEWS_V1)
    assert {r.action for r in again.results} == {"unchanged"}

    table = await eventually(lambda: fetch(bus))
    assert table.host == "reviews.default.svc.cluster.local"
    assert table.exists and table.has_virtual_service
    assert table.http[0].route[0].destination.subset == "v1"
    assert {s.name: s.labels for s in table.subsets} == {
        "v1": {"version": "v1"},
        "v2": {"version": "v2"},
    }

    # the leader pushes the change on the destination's subject
    await apply(bus, REVIEWS_SPLIT)
    await eventually(lambda: pushed and [w.weight for w in pushed[-1].http[0].route] == [80, 20])
    assert pushed[-1].revision >= table.revision

    got = await bus.request(
        bus.subjects.config_get,
        GetResourcesRequest(kind="vs", namespace="default"),
        GetResourcesReply,
    )
    assert [r.ref.name for r in got.resources] == ["reviews"]
    assert got.resources[0].body["spec"]["http"][0]["route"][1]["weight"] == 20


async def test_invalid_resource_rejected_and_previous_config_kept(config_bus) -> None:
    bus, _svc = config_bus
    await apply(bus, REVIEWS_V1)
    before = await eventually(lambda: fetch(bus))
    with pytest.raises(errors.RemoteError) as e:
        await apply(bus, INVALID, "bad.yaml")
    assert e.value.code == 400
    assert "bad.yaml: document 0: spec.http[0].corsPolicy is not supported" in e.value.details
    after = await fetch(bus)
    assert after.http == before.http


async def test_multi_document_apply_is_all_or_nothing(config_bus) -> None:
    bus, _svc = config_bus
    good_and_bad = REVIEWS_V1 + "---\n" + INVALID.replace("name: reviews", "name: other")
    with pytest.raises(errors.RemoteError) as e:
        await apply(bus, good_and_bad, "mixed.yaml")
    assert any("document 2" in d for d in e.value.details)
    got = await bus.request(bus.subjects.config_get, GetResourcesRequest(), GetResourcesReply)
    assert got.resources == []


async def test_unsupported_kind_rejected(config_bus) -> None:
    bus, _svc = config_bus
    text = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: x}\nspec: {address: 10.0.0.1}\n"
    with pytest.raises(errors.RemoteError) as e:
        await apply(bus, text)
    assert "kind WorkloadEntry is not supported" in "\n".join(e.value.details)


async def test_delete_returns_to_default_route(config_bus) -> None:
    bus, _svc = config_bus
    pushed: list[RouteTable] = []

    async def on_route(table: RouteTable, _s: str) -> None:
        pushed.append(table)

    await bus.subscribe(bus.subjects.route("default", "reviews"), RouteTable, on_route)
    await apply(bus, REVIEWS_V1)
    await eventually(lambda: pushed and pushed[-1].has_virtual_service)
    reply = await bus.request(
        bus.subjects.config_delete,
        DeleteRequest(
            refs=[
                ResourceRef(kind="virtualservice", namespace="default", name="reviews"),
                ResourceRef(kind="vs", namespace="default", name="missing"),
            ]
        ),
        DeleteReply,
    )
    assert [r.name for r in reply.deleted] == ["reviews"]
    assert [r.name for r in reply.not_found] == ["missing"]
    await eventually(lambda: pushed and not pushed[-1].has_virtual_service)
    assert pushed[-1].http == ()


THREE_SERVICES = "".join(
    f"""
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: [{name}]
  http:
  - route:
    - destination: {{host: {name}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}}}
spec: {{host: {name}}}
"""
    for name in ("reviews", "ratings", "details")
)

REVIEWS_TIMEOUT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
    timeout: 3s
"""


def compiled_counts(svc: ConfigService) -> dict[str, float]:
    return {
        kind: svc.registry.get_sample_value("mesh_config_tables_compiled_total", {"kind": kind})
        or 0.0
        for kind in ("route", "gateway", "inbound")
    }


def push_idle(svc: ConfigService) -> bool:
    return svc.pushes.queue_depth == 0 and not svc.pushes.debouncer.in_flight


async def test_one_virtual_service_recompiles_only_the_destinations_it_names(config_bus) -> None:
    bus, svc = config_bus
    pushed: list[RouteTable] = []

    async def on_route(table: RouteTable, _s: str) -> None:
        pushed.append(table)

    await bus.subscribe(bus.subjects.route_all, RouteTable, on_route)
    await eventually(lambda: svc.leading)
    await apply(bus, THREE_SERVICES)
    await eventually(lambda: {t.service for t in pushed} >= {"reviews", "ratings", "details"})
    await eventually(lambda: push_idle(svc))
    before = compiled_counts(svc)
    pushes_before = svc.registry.get_sample_value("mesh_config_push_latency_seconds_count")

    await apply(bus, REVIEWS_TIMEOUT)
    await eventually(lambda: pushed[-1].service == "reviews" and pushed[-1].http[0].timeout_ms)
    await eventually(lambda: push_idle(svc))
    after = compiled_counts(svc)
    # one route table compiled (reviews): not ratings' nor details', no inbound policy
    assert {k: after[k] - before[k] for k in after} == {"route": 1, "gateway": 0, "inbound": 0}
    assert [t.service for t in pushed[-1:]] == ["reviews"]
    assert svc.registry.get_sample_value("mesh_config_tables_compiled_last_push") == 1
    pushes_after = svc.registry.get_sample_value("mesh_config_push_latency_seconds_count")
    assert pushes_before is not None and pushes_after == pushes_before + 1
    assert svc.registry.get_sample_value("mesh_config_push_queue_depth") == 0
    # fetch still answers the new table, and the others are as they were
    assert (await fetch(bus, "reviews")).http[0].timeout_ms == 3000
    assert (await fetch(bus, "ratings")).http[0].timeout_ms == 0


async def test_proxy_status_pages_filters_and_refuses_what_one_message_cannot_carry(
    tmp_path, etcd_server, prefix
) -> None:
    """A fleet's proxy-status table can outgrow one NATS message (10,000 proxies do at
    the default 1 MB): the reply used to vanish (a timeout); now the request names a
    subject or a page, and a reply too large is a clear error."""
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 32768\n")
    nats = NatsServer(tmp_path / "nats", config_file=conf).start()
    try:
        async with running(ConfigService(service_config(nats.url, etcd_server.url, prefix))) as svc:
            bus = await Bus.connect([nats.url], name="test", prefix=prefix)
            await eventually(lambda: svc.leading)
            route = bus.subjects.route("default", "reviews")
            other = bus.subjects.route("default", "ratings")
            for i in range(150):
                await bus.publish(
                    bus.subjects.proxy_status,
                    ProxyStatus(
                        proxy=f"client-{i:03d}",
                        namespace="default",
                        service="client",
                        subscriptions=[
                            SubscriptionStatus(subject=route, revision=1),
                            SubscriptionStatus(subject=other, revision=1),
                        ],
                        sent_at=1.0,
                    ),
                )
            await eventually(lambda: len(svc.status.reports) == 150)

            with pytest.raises(errors.RemoteError) as e:
                await bus.request(
                    bus.subjects.config_proxy_status, ProxyStatusRequest(), ProxyStatusReply
                )
            assert e.value.code == 400 and "300 rows" in e.value.message
            assert "limit, offset" in e.value.message

            one = await bus.request(
                bus.subjects.config_proxy_status,
                ProxyStatusRequest(subject=route, offset=10, limit=50),
                ProxyStatusReply,
            )
            assert one.total == 150 and len(one.entries) == 50
            assert {r.subject for r in one.entries} == {route}
            assert one.entries[0].proxy == "client-010"
            pages = []
            for offset in range(0, 300, 100):
                page = await bus.request(
                    bus.subjects.config_proxy_status,
                    ProxyStatusRequest(offset=offset, limit=100),
                    ProxyStatusReply,
                )
                assert page.total == 300
                pages += page.entries
            assert len({(r.proxy, r.subject) for r in pages}) == 300

            with pytest.raises(errors.RemoteError, match="0 or more"):
                await bus.request(
                    bus.subjects.config_proxy_status,
                    ProxyStatusRequest(limit=-1),
                    ProxyStatusReply,
                )
            await bus.close()
    finally:
        nats.kill()
