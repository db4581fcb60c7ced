"""Pure logic of the core, the registry and the config service: tables, no sockets."""

from __future__ import annotations

import json
import random

import pytest

from mesh import messages
from mesh.bus import reconnect_delay
from mesh.hosts import ServiceRef, canonical_host, host_matches, service_of_host, strip_port
from mesh.messages import Instance, ProxyStatus, SubscriptionStatus
from mesh.store import prefix_range_end
from mesh.subjects import Subjects, parse_service_subject
from services.config.snapshot import ResourceSnapshot, resource_key
from services.config.status import EXPIRE_S, ProxyStatusTable
from services.registry.index import EndpointIndex, instance_key


@pytest.mark.parametrize(
    ("host", "ns", "expected"),
    [
        ("reviews", "default", "reviews.default.svc.cluster.local"),
        ("reviews:9080", "default", "reviews.default.svc.cluster.local"),
        ("reviews.prod", "default", "reviews.prod.svc.cluster.local"),
        ("reviews.prod.svc", "default", "reviews.prod.svc.cluster.local"),
        ("Reviews.Prod.svc.cluster.local.", "x", "reviews.prod.svc.cluster.local"),
        ("api.example.com", "default", "api.example.com"),
        ("*", "default", "*"),
    ],
)
def test_canonical_host(host: str, ns: str, expected: str) -> None:
    assert canonical_host(host, ns) == expected


def test_service_of_host_and_matching() -> None:
    assert service_of_host("reviews.default.svc.cluster.local") == ServiceRef("default", "reviews")
    assert service_of_host("api.example.com") is None
    assert strip_port("[::1]:80") == "::1"
    assert host_matches("*.default.svc.cluster.local", "reviews.default.svc.cluster.local")
    assert not host_matches("*.prod.svc.cluster.local", "reviews.default.svc.cluster.local")


def test_subjects_are_prefixed_and_validated() -> None:
    s = Subjects("mesh2")
    assert s.route("default", "reviews") == "mesh2.config.route.default.reviews"
    assert parse_service_subject(s.route("ns", "svc"), "mesh2.config.route") == ("ns", "svc")
    with pytest.raises(ValueError, match="invalid subject token"):
        s.endpoints("default", "a.b")


def test_reconnect_delay_is_capped_and_jittered() -> None:
    rnd = random.Random(1)
    delays = [reconnect_delay(a, base=0.1, cap=5.0, rnd=rnd) for a in range(30)]
    assert all(0 <= d <= 5.0 for d in delays)
    assert len({round(d, 6) for d in delays}) == len(delays), "jittered, not synchronised"


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"/mesh/") == b"/mesh0"
    assert prefix_range_end(b"a\xff") == b"b"


def _inst(name: str, svc: str = "reviews", status: str = "healthy") -> bytes:
    return messages.encode(
        Instance(
            namespace="default", service=svc, instance=name, address="127.0.0.1:1", status=status
        )  # type: ignore[arg-type]
    )


def test_endpoint_index_folds_events_into_sets() -> None:
    idx = EndpointIndex("/m/")
    changed = idx.load(
        [(instance_key("/m/", "default", "reviews", "r1"), _inst("r1"))], revision=10
    )
    assert changed == {("default", "reviews")}
    assert idx.apply("put", instance_key("/m/", "default", "reviews", "r2"), _inst("r2"), 11) == (
        "default",
        "reviews",
    )
    assert idx.apply("put", "/m/registry/bad-key", b"x", 12) is None
    assert (
        idx.apply("put", instance_key("/m/", "default", "reviews", "r3"), b"not msgpack", 13)
        is None
    )
    s = idx.endpoint_set("default", "reviews", prev_revision=10)
    assert (
        [e.instance for e in s.endpoints] == ["r1", "r2"]
        and s.revision == 11
        and s.prev_revision == 10
    )
    assert idx.apply("delete", instance_key("/m/", "default", "reviews", "r1"), b"", 14) == (
        "default",
        "reviews",
    )
    assert idx.apply("delete", instance_key("/m/", "default", "reviews", "r1"), b"", 15) is None
    # reload drops services that are gone, reporting them as changed
    assert idx.load([], revision=20) == {("default", "reviews")}
    assert idx.endpoint_set("default", "reviews").endpoints == []


def _report(proxy: str, sent_at: float, *subs: SubscriptionStatus) -> ProxyStatus:
    return ProxyStatus(
        proxy=proxy, namespace="default", service="pp", subscriptions=list(subs), sent_at=sent_at
    )


@pytest.mark.parametrize(
    ("sub", "latest", "state"),
    [
        (SubscriptionStatus(subject="s", revision=10), 10, "SYNCED"),
        (SubscriptionStatus(subject="s", revision=12), 10, "SYNCED"),
        (SubscriptionStatus(subject="s", revision=8), 10, "STALE"),
        (SubscriptionStatus(subject="s", revision=0), 10, "NOT SENT"),
        (
            SubscriptionStatus(
                subject="s", revision=8, state="NACK", reason="bad", rejected_revision=10
            ),
            10,
            "REJECTED",
        ),
        (
            SubscriptionStatus(
                subject="s", revision=12, state="NACK", reason="old", rejected_revision=10
            ),
            12,
            "SYNCED",
        ),
    ],
)
def test_proxy_status_states(sub: SubscriptionStatus, latest: int, state: str) -> None:
    table = ProxyStatusTable()
    table.record(_report("p1", 1.0, sub), now=100.0)
    [entry] = table.entries({"s": latest}, now=101.0)
    assert entry.state == state


def test_proxy_status_ignores_late_reports_and_expires() -> None:
    table = ProxyStatusTable()
    table.record(_report("p1", 2.0, SubscriptionStatus(subject="s", revision=5)), now=100.0)
    table.record(_report("p1", 1.0, SubscriptionStatus(subject="s", revision=3)), now=100.5)
    assert table.entries({"s": 5}, now=101)[0].applied_revision == 5
    table.expire(now=100.0 + EXPIRE_S + 1)
    assert table.entries({}, now=200) == []


VS = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "reviews", "namespace": "default"},
    "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]},
}


def test_resource_snapshot_orders_by_creation_and_skips_invalid() -> None:
    snap = ResourceSnapshot("/m/")
    a = resource_key("/m/", "VirtualService", "default", "a")
    b = resource_key("/m/", "VirtualService", "default", "b")
    body_a = json.dumps({**VS, "metadata": {"name": "a", "namespace": "default"}}).encode()
    body_b = json.dumps({**VS, "metadata": {"name": "b", "namespace": "default"}}).encode()
    snap.load([(b, body_b, 5, 5), (a, body_a, 7, 7)], revision=7)
    assert [r.metadata.name for r in snap.resources()] == ["b", "a"]
    assert snap.put(a, b'{"kind": "Nope"}', 7, 8)
    assert [r.metadata.name for r in snap.resources()] == ["b"] and a in snap.skipped
    assert snap.delete(b, 9) and snap.revision == 9 and snap.resources() == []
