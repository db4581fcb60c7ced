"""TCP relays to mesh services go through a `Cluster` per (service, subset, port)
(`Destination.tcp_cluster`, `proxy.tcp.ServiceClusterEndpoints`): the DestinationRule's
load balancer, outlier detection and `tcp.maxConnections` apply, as on Envoy's
`outbound|<port>|<subset>|<fqdn>` TCP clusters. Pure: no sockets."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from mesh.compiled import (
    ConnectionPool,
    ConsistentHash,
    LoadBalancer,
    OutlierDetection,
    PortPolicy,
    RouteTable,
    Subset,
    TrafficPolicy,
)
from mesh.hosts import ServiceRef
from mesh.messages import Endpoint, EndpointSet
from proxy.destinations import Destination
from proxy.resilience import LocalOrigin
from proxy.tcp import ServiceClusterEndpoints, _relay_ended

REF = ServiceRef("default", "redis")
PORT = 6379


def endpoint(instance: str, version: str = "v1", *ports: int) -> Endpoint:
    return Endpoint(
        instance=instance,
        address=f"{instance}:15006",
        version=version,
        tcp_listeners={str(p): f"{instance}:{40000 + p % 1000}" for p in ports or (PORT,)},
    )


def destination(
    *eps: Endpoint, policy: TrafficPolicy = TrafficPolicy(), subsets: tuple[Subset, ...] = ()
) -> Destination:
    table = RouteTable(
        namespace="default",
        service="redis",
        host="redis.default.svc.cluster.local",
        revision=1,
        traffic_policy=policy,
        subsets=subsets,
    )
    endpoints = EndpointSet(namespace="default", service="redis", revision=1, endpoints=list(eps))
    return Destination(REF, table=table, endpoints=endpoints)


def picks(dest: Destination, n: int, source_ip: str = "", subset: str = "") -> Counter[str]:
    rand = random.Random(5)
    cluster = dest.tcp_cluster(subset, rand, PORT)
    assert cluster is not None
    choice = ServiceClusterEndpoints(dest, cluster, subset, PORT, rand, source_ip)
    seen: Counter[str] = Counter()
    for _ in range(n):
        ep = choice.choose(frozenset())
        assert ep is not None
        seen[ep.instance] += 1
    return seen


def test_endpoints_are_the_subsets_instances_with_a_listener_for_the_port() -> None:
    dest = destination(
        endpoint("a", "v1"),
        endpoint("b", "v2"),
        endpoint("c", "v1", 5432),  # no listener for 6379
        subsets=(Subset(name="v1", labels={"version": "v1"}),),
    )
    rand = random.Random(1)
    whole = dest.tcp_cluster("", rand, PORT)
    v1 = dest.tcp_cluster("v1", rand, PORT)
    assert whole is not None and v1 is not None
    assert [ep.instance for ep in whole.balancer.endpoints] == ["a", "b"]
    assert [ep.instance for ep in v1.balancer.endpoints] == ["a"]
    assert dest.tcp_cluster("v9", rand, PORT) is None  # unknown subset: NC
    # no route table yet: the whole service under the default policy, no subsets
    bare = Destination(REF, endpoints=dest.endpoints)
    cluster = bare.tcp_cluster("", rand, PORT)
    assert cluster is not None and [ep.instance for ep in cluster.balancer.endpoints] == [
        "a",
        "b",
    ]
    assert bare.tcp_cluster("v1", rand, PORT) is None


def test_round_robin_by_default() -> None:
    assert picks(destination(endpoint("a"), endpoint("b")), 10) == Counter(a=5, b=5)


def test_port_level_settings_give_the_ports_policy() -> None:
    hashed = TrafficPolicy(
        load_balancer=LoadBalancer(consistent_hash=ConsistentHash(use_source_ip=True))
    )
    policy = TrafficPolicy(port_level=(PortPolicy(port=PORT, traffic_policy=hashed),))
    dest = destination(
        endpoint("a", "v1", PORT, 5432), endpoint("b", "v1", PORT, 5432), policy=policy
    )
    rand = random.Random(1)
    on_port = dest.tcp_cluster("", rand, PORT)
    other = dest.tcp_cluster("", rand, 5432)
    assert on_port is not None and other is not None and on_port is not other
    assert on_port.policy == hashed
    assert other.policy == policy


def test_consistent_hash_on_the_clients_ip() -> None:
    hashed = TrafficPolicy(
        load_balancer=LoadBalancer(consistent_hash=ConsistentHash(use_source_ip=True))
    )
    eps = [endpoint(name) for name in "abcd"]
    dest = destination(*eps, policy=hashed)
    # one client IP: every connection to the same endpoint
    assert len(picks(dest, 20, source_ip="10.1.2.3")) == 1
    # several clients spread over the endpoints
    spread = {next(iter(picks(dest, 1, source_ip=f"10.1.2.{i}"))) for i in range(40)}
    assert len(spread) > 1


def test_least_request_counts_open_relayed_connections() -> None:
    policy = TrafficPolicy(load_balancer=LoadBalancer(simple="LEAST_REQUEST"))
    dest = destination(endpoint("a"), endpoint("b"), policy=policy)
    rand = random.Random(2)
    cluster = dest.tcp_cluster("", rand, PORT)
    assert cluster is not None
    choice = ServiceClusterEndpoints(dest, cluster, "", PORT, rand, "")
    first = choice.choose(frozenset())
    assert first is not None
    cluster.balancer.on_request_start(first.instance)  # a relayed connection is open
    # with two endpoints the idle one is always chosen
    others = {choice.choose(frozenset()).instance for _ in range(10)}  # type: ignore[union-attr]
    assert others == {"b" if first.instance == "a" else "a"}
    _relay_ended(cluster, cluster.balancer, first.instance)
    assert {choice.choose(frozenset()).instance for _ in range(20)} == {"a", "b"}  # type: ignore[union-attr]


def test_connect_failures_eject_the_endpoint() -> None:
    detection = OutlierDetection(
        consecutive_5xx_errors=2, max_ejection_percent=100, base_ejection_time_ms=30_000
    )
    dest = destination(
        endpoint("a"), endpoint("b"), policy=TrafficPolicy(outlier_detection=detection)
    )
    rand = random.Random(1)
    cluster = dest.tcp_cluster("", rand, PORT)
    assert cluster is not None
    choice = ServiceClusterEndpoints(dest, cluster, "", PORT, rand, "")
    dead = next(ep for ep in cluster.balancer.endpoints if ep.instance == "a")
    # a success between failures resets the count (CONNECT_SUCCESS)
    choice.connected(dead, False)
    choice.connected(dead, True)
    choice.connected(dead, False)
    assert cluster.ejected(time.monotonic()) == frozenset()
    choice.connected(dead, False)  # two in a row: a gateway failure each (503 unsplit)
    assert cluster.ejected(time.monotonic()) == {"a"}
    assert {choice.choose(frozenset()).instance for _ in range(6)} == {"b"}  # type: ignore[union-attr]
    # split: connect failures count as local-origin failures instead
    split = OutlierDetection(
        consecutive_local_origin_failures=1,
        split_external_local_origin_errors=True,
        max_ejection_percent=100,
    )
    dest2 = destination(endpoint("a"), endpoint("b"), policy=TrafficPolicy(outlier_detection=split))
    cluster2 = dest2.tcp_cluster("", rand, PORT)
    assert cluster2 is not None
    cluster2.report("b", LocalOrigin.CONNECT_FAILED, time.monotonic())
    assert cluster2.ejected(time.monotonic()) == {"b"}


def test_max_connections_counts_open_relays_and_survives_changes() -> None:
    limited = TrafficPolicy(connection_pool=ConnectionPool(max_connections=1))
    dest = destination(endpoint("a"), endpoint("b"), policy=limited)
    rand = random.Random(1)
    cluster = dest.tcp_cluster("", rand, PORT)
    assert cluster is not None
    assert cluster.breaker.try_acquire_connection()
    assert not cluster.breaker.try_acquire_connection()  # the second: UO
    # new endpoints (the cache resets the balancers): the same cluster, still full
    assert dest.endpoints is not None
    dest.endpoints = EndpointSet(
        namespace="default", service="redis", revision=2, endpoints=[endpoint("c")]
    )
    dest.balancers = {}
    again = dest.tcp_cluster("", rand, PORT)
    assert again is cluster
    assert [ep.instance for ep in again.balancer.endpoints] == ["c"]
    assert not again.breaker.try_acquire_connection()
    _relay_ended(cluster, cluster.balancer, "a")
    assert again.breaker.try_acquire_connection()
    assert again.breaker.overflows


@pytest.mark.parametrize("tried", [frozenset({"a"}), frozenset({"a", "b"})])
def test_tried_endpoints_are_avoided_while_others_remain(tried: frozenset[str]) -> None:
    dest = destination(endpoint("a"), endpoint("b"))
    rand = random.Random(1)
    cluster = dest.tcp_cluster("", rand, PORT)
    assert cluster is not None
    choice = ServiceClusterEndpoints(dest, cluster, "", PORT, rand, "")
    chosen = {choice.choose(tried).instance for _ in range(4)}  # type: ignore[union-attr]
    # everything tried: a repeat (Envoy's tcp_proxy retries a host too)
    assert chosen == ({"b"} if len(tried) == 1 else {"a", "b"})


def test_endpoints_changed_during_a_connect_are_seen_by_the_next_attempt() -> None:
    dest = destination(endpoint("a"))
    rand = random.Random(1)
    cluster = dest.tcp_cluster("", rand, PORT)
    assert cluster is not None
    choice = ServiceClusterEndpoints(dest, cluster, "", PORT, rand, "")
    first = choice.choose(frozenset())
    assert first is not None and first.instance == "a"
    dest.endpoints = EndpointSet(
        namespace="default", service="redis", revision=2, endpoints=[endpoint("z")]
    )
    dest.balancers = {}
    second = choice.choose(frozenset({"a"}))
    assert second is not None and second.instance == "z"
