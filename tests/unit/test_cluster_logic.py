"""Pure pieces of cluster mode: server ports kept across `up`s, ports handed out once,
and the config snapshot's revision, which every replica must agree on."""

from __future__ import annotations

import json
from pathlib import Path

from mesh import servers
from meshctl.devcluster import _load_ports
from services.config.snapshot import ResourceSnapshot, change_marker_key, resource_key

PREFIX = "/mesh/"


def test_ports_are_kept_for_the_same_node_count(tmp_path: Path) -> None:
    path = tmp_path / "ports.json"
    first = _load_ports(path, 3)
    assert len(first["nats"]) == 3 and len(first["etcd"]) == 3
    path.write_text(json.dumps(first))
    assert _load_ports(path, 3) == first
    # another node count: new ports
    other = _load_ports(path, 1)
    assert len(other["nats"]) == 1


def test_a_damaged_ports_file_means_new_ports(tmp_path: Path) -> None:
    path = tmp_path / "ports.json"
    path.write_text("{not json")
    ports = _load_ports(path, 3)
    assert len({p for node in ports["nats"] + ports["etcd"] for p in node.values()}) == 15


def test_free_port_never_hands_out_a_port_twice_and_avoids_the_ephemeral_range() -> None:
    low, _high = servers._ephemeral_range()
    ports = [servers.free_port() for _ in range(200)]
    assert len(set(ports)) == 200
    assert all(p < low for p in ports)


def _records(*items: tuple[str, int, int]) -> list[tuple[str, bytes, int, int]]:
    body = json.dumps(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "x", "namespace": "default"},
            "spec": {"host": "x"},
        }
    ).encode()
    return [(key, body if "/.changed" not in key else b"{}", c, m) for key, c, m in items]


def test_snapshot_revision_is_the_last_change_not_when_it_was_read() -> None:
    dr = resource_key(PREFIX, "DestinationRule", "default", "x")
    marker = change_marker_key(PREFIX)
    early, late = ResourceSnapshot(PREFIX), ResourceSnapshot(PREFIX)
    # the same resources, read at store revisions 40 and 95 (registry writes in between)
    early.load(_records((dr, 10, 12), (marker, 5, 30)), revision=40)
    late.load(_records((dr, 10, 12), (marker, 5, 30)), revision=95)
    assert early.revision == late.revision == 30  # the delete at 30 counted, via the marker
    assert (early.watch_revision, late.watch_revision) == (40, 95)
    # a change seen by the watch moves both
    early.put(marker, b"{}", 5, 120)
    assert early.revision == 120 and early.watch_revision == 120


def test_an_empty_store_has_revision_one() -> None:
    snap = ResourceSnapshot(PREFIX)
    snap.load([], revision=17)
    assert snap.revision == 1 and snap.watch_revision == 17


def test_proxy_status_table_counts_what_the_fleet_follows() -> None:
    from mesh.messages import ProxyStatus, SubscriptionStatus
    from services.config.status import ProxyStatusTable

    def report(proxy: str, service: str, subjects: list[str], at: float) -> ProxyStatus:
        return ProxyStatus(
            proxy=proxy,
            namespace="default",
            service=service,
            version="v1",
            labels={},
            kind="sidecar",
            subscriptions=[SubscriptionStatus(subject=s, revision=1) for s in subjects],
            sent_at=at,
        )

    table = ProxyStatusTable()
    a = report("a", "web", ["route.db", "inbound.web"], 1.0)
    assert not table.is_known(a)
    table.record(a, now=0.0)
    assert table.is_known(a)
    table.record(report("b", "web", ["route.db", "route.cache"], 1.0), now=0.0)
    assert table.followed_subjects() == {"route.db", "inbound.web", "route.cache"}
    # a's next report follows less: what nobody follows any more is gone
    table.record(report("a", "web", ["route.db"], 2.0), now=0.0)
    assert table.followed_subjects() == {"route.db", "route.cache"}
    table.forget("b")
    assert table.followed_subjects() == {"route.db"}
    assert table.services() == {("default", "web")}
    table.expire(now=100.0)
    assert table.followed_subjects() == set() and table.services() == set()
