"""PeerAuthentication and AuthorizationPolicy through the config service, against real
nats-server and etcd: applied, fetched compiled (`kind: inbound`), pushed live on
`<prefix>.config.inbound.<ns>.<svc>`, refused with their path when invalid, and
tracked by proxy-status like route subjects."""

from __future__ import annotations

import asyncio
import time

import pytest

from mesh import errors
from mesh.bus import Bus
from mesh.compiled import InboundPolicy
from mesh.messages import (
    ApplyReply,
    ApplyRequest,
    DeleteReply,
    DeleteRequest,
    FetchRequest,
    GetResourcesReply,
    GetResourcesRequest,
    ProxyStatus,
    ProxyStatusEntry,
    ProxyStatusReply,
    ProxyStatusRequest,
    ResourceDocument,
    ResourceRef,
    SubscriptionStatus,
)
from mesh.resources import load_yaml
from services.config import ConfigService
from tests.support import eventually, running, service_config

POLICIES = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/productpage"]}
    to:
    - operation: {methods: [GET], ports: ["9080"]}
"""

MESH_WIDE = """
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh-root}
spec:
  mtls: {mode: PERMISSIVE}
"""

INVALID = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  targetRefs: [{kind: Gateway, name: ingress}]
  rules:
  - from:
    - source:
        namespaces: ["default"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings, namespace: default}
spec:
  rules:
  - when:
    - key: experimental.envoy.filters.network.mysql_proxy[db.table]
      values: ["www.example.com"]
"""


def docs(text: str, source: str = "policy.yaml") -> list[ResourceDocument]:
    return [
        ResourceDocument(source=source, index=i, body=b)
        for i, b in enumerate(load_yaml(text, source))
    ]


async def apply(bus: Bus, text: str, source: str = "policy.yaml") -> ApplyReply:
    return await bus.request(
        bus.subjects.config_apply, ApplyRequest(documents=docs(text, source)), ApplyReply
    )


async def fetch_inbound(bus: Bus, service: str = "reviews") -> InboundPolicy:
    return await bus.request(
        bus.subjects.config_fetch,
        FetchRequest(kind="inbound", namespace="default", name=service),
        InboundPolicy,
    )


async def report(bus: Bus, service: str, subscriptions: list[SubscriptionStatus]) -> None:
    """What a sidecar of `service` sends on `mesh.proxy.status`."""
    await bus.publish(
        bus.subjects.proxy_status,
        ProxyStatus(
            proxy=f"{service}-v1-0",
            namespace="default",
            service=service,
            labels={"app": service, "version": "v1"},
            subscriptions=subscriptions,
            sent_at=time.time(),
        ),
    )


@pytest.fixture
async def config_bus(nats_server, etcd_server, prefix):
    config = service_config(
        nats_server.url, etcd_server.url, prefix, **{"root-namespace": "mesh-root"}
    )
    async with running(ConfigService(config)) as svc:
        bus = await Bus.connect([nats_server.url], name="test", prefix=prefix)
        yield bus, svc
        await bus.close()


async def test_applied_policies_are_fetched_compiled(config_bus) -> None:
    bus, _svc = config_bus
    reply = await apply(bus, POLICIES + "---\n" + MESH_WIDE)
    assert [(r.ref.kind, r.ref.name, r.action) for r in reply.results] == [
        ("PeerAuthentication", "default", "created"),
        ("AuthorizationPolicy", "reviews-viewer", "created"),
        ("PeerAuthentication", "default", "created"),
    ]
    policy = await fetch_inbound(bus)
    assert (policy.namespace, policy.service) == ("default", "reviews")
    assert policy.revision >= reply.revision
    # the root namespace is the service's setting: mesh-root's policy is mesh-wide
    assert [(p.namespace, p.scope, p.mode) for p in policy.peer_authentication] == [
        ("default", "namespace", "STRICT"),
        ("mesh-root", "mesh", "PERMISSIVE"),
    ]
    # create revisions come from etcd: both were created by the same transaction
    assert {p.create_revision for p in policy.peer_authentication} == {reply.revision}
    (viewer,) = policy.authorization
    assert (viewer.name, viewer.action, viewer.selector) == (
        "reviews-viewer", "ALLOW", {"app": "reviews"},
    )  # fmt: skip
    rule = viewer.rules[0]
    assert rule.sources[0].principals == ("cluster.local/ns/default/sa/productpage",)
    assert (rule.operations[0].methods, rule.operations[0].ports) == (("GET",), ("9080",))

    # `meshctl get pa` / `get ap`
    got = await bus.request(
        bus.subjects.config_get, GetResourcesRequest(kind="ap"), GetResourcesReply
    )
    assert [r.ref.name for r in got.resources] == ["reviews-viewer"]
    got = await bus.request(
        bus.subjects.config_get, GetResourcesRequest(kind="pa", namespace="mesh-root"),
        GetResourcesReply,
    )  # fmt: skip
    assert got.resources[0].body["spec"] == {"mtls": {"mode": "PERMISSIVE"}}


async def test_inbound_policy_is_pushed_on_apply_and_delete(config_bus, prefix) -> None:
    bus, _svc = config_bus
    pushed: list[tuple[str, InboundPolicy]] = []

    async def on_inbound(policy: InboundPolicy, subject: str) -> None:
        pushed.append((subject, policy))

    subject = f"{prefix}.config.inbound.default.reviews"
    assert bus.subjects.inbound("default", "reviews") == subject
    await bus.subscribe(subject, InboundPolicy, on_inbound)
    # a sidecar of reviews reports: the leader now publishes reviews' inbound policy
    await report(bus, "reviews", [])
    await eventually(lambda: pushed, timeout=15)
    assert pushed[-1][1].authorization == () and pushed[-1][1].peer_authentication == ()

    reply = await apply(bus, POLICIES)
    await eventually(lambda: pushed[-1][1].authorization)
    subject_seen, policy = pushed[-1]
    assert subject_seen == subject
    assert policy.revision >= reply.revision
    assert [a.name for a in policy.authorization] == ["reviews-viewer"]
    assert [p.mode for p in policy.peer_authentication] == ["STRICT"]
    count = len(pushed)

    # re-applying the same documents, or a policy for another namespace: no publish
    await apply(bus, POLICIES)
    await apply(bus, MESH_WIDE.replace("mesh-root", "elsewhere"))
    await asyncio.sleep(0.5)  # well past the leader's coalescing window
    assert len(pushed) == count

    deleted = await bus.request(
        bus.subjects.config_delete,
        DeleteRequest(refs=[ResourceRef(kind="ap", namespace="default", name="reviews-viewer")]),
        DeleteReply,
    )
    assert [r.name for r in deleted.deleted] == ["reviews-viewer"]
    await eventually(lambda: not pushed[-1][1].authorization)
    after = pushed[-1][1]
    assert [p.mode for p in after.peer_authentication] == ["STRICT"]
    assert after.revision >= deleted.revision
    assert after.prev_revision == policy.revision


async def test_proxy_status_tracks_inbound_subjects(config_bus) -> None:
    bus, _svc = config_bus
    subject = bus.subjects.inbound("default", "ratings")
    await report(bus, "ratings", [SubscriptionStatus(subject=subject, revision=0)])
    applied = await apply(bus, POLICIES.replace("reviews", "ratings"))

    async def entry() -> ProxyStatusEntry | None:
        reply = await bus.request(
            bus.subjects.config_proxy_status, ProxyStatusRequest(), ProxyStatusReply
        )
        return next((e for e in reply.entries if e.subject == subject), None)

    async def published() -> int:
        row = await entry()
        return row.latest_revision if row and row.latest_revision >= applied.revision else 0

    async def state_is(want: str) -> bool:
        row = await entry()
        return row is not None and row.state == want

    latest = await eventually(published, timeout=15)
    await report(bus, "ratings", [SubscriptionStatus(subject=subject, revision=latest)])
    await eventually(lambda: state_is("SYNCED"))
    await report(bus, "ratings", [SubscriptionStatus(subject=subject, revision=latest - 1)])
    await eventually(lambda: state_is("STALE"))


async def test_invalid_policy_is_refused_with_its_path_and_nothing_stored(config_bus) -> None:
    bus, _svc = config_bus
    with pytest.raises(errors.RemoteError) as e:
        await apply(bus, POLICIES + "---\n" + INVALID, "bad.yaml")
    assert e.value.code == 400
    assert e.value.details == [
        "bad.yaml: document 2: spec.targetRefs[0].kind: a policy can target a Service "
        '(group "") or a Gateway (group gateway.networking.k8s.io), got kind '
        "'Gateway' in group ''",
        "bad.yaml: document 3: spec.rules[0].when[0].key "
        "'experimental.envoy.filters.network.mysql_proxy[db.table]' is not "
        "supported (supported keys: request.headers[<name>], request.auth.claims[<name>], "
        "source.principal, source.namespace, source.ip, remote.ip, destination.ip, "
        "destination.port, connection.sni, "
        "request.auth.principal, request.auth.audiences, request.auth.presenter)",
    ]
    assert e.value.field == "spec.targetRefs[0].kind"
    got = await bus.request(bus.subjects.config_get, GetResourcesRequest(), GetResourcesReply)
    assert got.resources == []
    policy = await fetch_inbound(bus)
    assert policy.authorization == () and policy.peer_authentication == ()
