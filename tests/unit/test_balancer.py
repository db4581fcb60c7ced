"""Subsets and load balancing (proxy.routing.balancer / .ring_hash)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

import pytest

from mesh.compiled import (
    ConsistentHash,
    HTTPCookie,
    LoadBalancer,
    RouteTable,
    Subset,
    TrafficPolicy,
)
from mesh.messages import Endpoint
from proxy.routing import (
    Balancer,
    HashContext,
    LeastRequestBalancer,
    RandomBalancer,
    RingHashBalancer,
    RoundRobinBalancer,
    build_balancer,
    resolve_subset,
    subset_endpoints,
)


def endpoint(instance: str, status: str = "healthy", **labels: str) -> Endpoint:
    return Endpoint(
        instance=instance,
        address=f"{instance}.pods.local:15006",
        labels=labels,
        status=status,  # type: ignore[arg-type]
    )


def names(chosen: Iterable[Endpoint | None]) -> set[str]:
    return {ep.instance for ep in chosen if ep is not None}


def endpoints(n: int, prefix: str = "reviews") -> list[Endpoint]:
    return [endpoint(f"{prefix}-{i}") for i in range(n)]


def header_hash(name: str = "x-user") -> LoadBalancer:
    return LoadBalancer(consistent_hash=ConsistentHash(http_header_name=name))


POLICIES = {
    "round-robin": LoadBalancer(),
    "least-request": LoadBalancer(simple="LEAST_REQUEST"),
    "random": LoadBalancer(simple="RANDOM"),
    "ring-hash": header_hash(),
}


# ---------------------------------------------------------------- subsets

FLEET = [
    endpoint("v1-a", app="reviews", version="v1"),
    endpoint("v1-b", "draining", app="reviews", version="v1"),
    endpoint("v2-a", app="reviews", version="v2", canary="true"),
    endpoint("v3-a", "draining", app="reviews", version="v3"),
    endpoint("v3-b", "draining", app="reviews", version="v3"),
]


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        pytest.param({"version": "v1"}, ["v1-a"], id="draining endpoint left out"),
        pytest.param({"version": "v2", "canary": "true"}, ["v2-a"], id="all labels must match"),
        pytest.param({"version": "v2", "canary": "false"}, [], id="one label differs"),
        pytest.param({"version": "v3"}, ["v3-a", "v3-b"], id="all draining: all kept"),
        pytest.param({}, ["v1-a", "v2-a"], id="no labels: whole service minus draining"),
        pytest.param({"version": "v9"}, [], id="no such version"),
    ],
)
def test_subset_endpoints(labels: dict[str, str], expected: list[str]) -> None:
    assert [ep.instance for ep in subset_endpoints(FLEET, labels)] == expected


def test_subset_selects_version_registered_as_a_field() -> None:
    eps = [
        Endpoint(instance="a", address="10.0.0.1:1", version="v2"),
        Endpoint(instance="b", address="10.0.0.2:1", version="v1"),
        Endpoint(instance="c", address="10.0.0.3:1", version="v1", labels={"version": "v2"}),
    ]
    assert [ep.instance for ep in subset_endpoints(eps, {"version": "v2"})] == ["a", "c"]


def test_starting_endpoints_get_no_traffic_draining_ones_only_as_a_last_resort() -> None:
    def ep(name: str, status: str) -> Endpoint:
        return Endpoint(instance=name, address=f"10.0.0.{len(name)}:1", status=status)  # type: ignore[arg-type]

    mixed = [ep("a", "healthy"), ep("b", "starting"), ep("c", "draining")]
    assert [e.instance for e in subset_endpoints(mixed, {})] == ["a"]
    assert [e.instance for e in subset_endpoints(mixed[1:], {})] == ["c"]
    # an app that does not listen yet would refuse every request: nothing beats it
    assert subset_endpoints([ep("b", "starting")], {}) == []


def test_resolve_subset() -> None:
    service_policy = TrafficPolicy(load_balancer=LoadBalancer(simple="RANDOM"))
    v2_policy = TrafficPolicy(load_balancer=LoadBalancer(simple="LEAST_REQUEST"))
    table = RouteTable(
        namespace="default",
        service="reviews",
        host="reviews.default.svc.cluster.local",
        revision=3,
        traffic_policy=service_policy,
        subsets=(Subset(name="v2", labels={"version": "v2"}, traffic_policy=v2_policy),),
    )
    whole = resolve_subset(table, "")
    assert whole is not None and whole.labels == {} and whole.traffic_policy == service_policy
    v2 = resolve_subset(table, "v2")
    assert v2 is not None and v2.labels == {"version": "v2"} and v2.traffic_policy == v2_policy
    assert resolve_subset(table, "v3") is None


# ---------------------------------------------------------------- every algorithm


@pytest.mark.parametrize(
    ("policy", "kind"),
    [
        (POLICIES["round-robin"], RoundRobinBalancer),
        (POLICIES["least-request"], LeastRequestBalancer),
        (POLICIES["random"], RandomBalancer),
        (POLICIES["ring-hash"], RingHashBalancer),
        (
            LoadBalancer(simple="RANDOM", consistent_hash=ConsistentHash(use_source_ip=True)),
            RingHashBalancer,
        ),
    ],
)
def test_build_balancer_follows_the_policy(policy: LoadBalancer, kind: type[Balancer]) -> None:
    assert type(build_balancer(endpoints(3), policy, random.Random(1))) is kind


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
def test_no_endpoints_gives_none(policy: LoadBalancer) -> None:
    balancer = build_balancer([], policy, random.Random(1))
    assert balancer.choose(HashContext(headers={"x-user": "u"})) is None


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
def test_retry_skips_endpoints_already_tried(policy: LoadBalancer) -> None:
    balancer = build_balancer(endpoints(3), policy, random.Random(5))
    tried = frozenset({"reviews-0", "reviews-1"})
    for i in range(50):
        ctx = HashContext(headers={"x-user": f"user-{i}"})
        chosen = balancer.choose(ctx, exclude=tried)
        assert chosen is not None and chosen.instance == "reviews-2"


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
def test_retry_reuses_a_tried_endpoint_when_nothing_else_is_left(policy: LoadBalancer) -> None:
    balancer = build_balancer(endpoints(2), policy, random.Random(5))
    everything = frozenset({"reviews-0", "reviews-1"})
    chosen = balancer.choose(HashContext(headers={"x-user": "u"}), exclude=everything)
    assert chosen is not None and chosen.instance in everything


# ---------------------------------------------------------------- round robin


def test_round_robin_cycles_evenly() -> None:
    balancer = build_balancer(endpoints(3), LoadBalancer(), random.Random(3))
    picks = [balancer.choose() for _ in range(300)]
    names = [ep.instance for ep in picks if ep is not None]
    assert Counter(names) == {"reviews-0": 100, "reviews-1": 100, "reviews-2": 100}
    # every window of three consecutive picks visits each endpoint once
    for i in range(0, 300, 3):
        assert len(set(names[i : i + 3])) == 3


def test_round_robin_starts_at_a_random_endpoint() -> None:
    firsts = set()
    for seed in range(30):
        chosen = build_balancer(endpoints(5), LoadBalancer(), random.Random(seed)).choose()
        assert chosen is not None
        firsts.add(chosen.instance)
    assert len(firsts) >= 3


def test_round_robin_exclusion_keeps_the_rotation_fair() -> None:
    balancer = build_balancer(endpoints(4), LoadBalancer(), random.Random(0))
    picks: Counter[str] = Counter()
    for _ in range(300):
        chosen = balancer.choose(exclude=frozenset({"reviews-3"}))
        assert chosen is not None
        picks[chosen.instance] += 1
    assert set(picks) == {"reviews-0", "reviews-1", "reviews-2"}
    assert max(picks.values()) - min(picks.values()) <= 100


# ---------------------------------------------------------------- least request


def test_least_request_prefers_the_idle_endpoint() -> None:
    balancer = build_balancer(endpoints(2), LoadBalancer(simple="LEAST_REQUEST"), random.Random(9))
    for _ in range(3):
        balancer.on_request_start("reviews-0")
    for _ in range(200):
        chosen = balancer.choose()
        assert chosen is not None and chosen.instance == "reviews-1"


def test_least_request_steers_away_from_busy_endpoints() -> None:
    balancer = build_balancer(endpoints(4), LoadBalancer(simple="LEAST_REQUEST"), random.Random(9))
    balancer.on_request_start("reviews-0")
    balancer.on_request_start("reviews-0")
    picks: Counter[str] = Counter()
    for _ in range(4000):
        chosen = balancer.choose()
        assert chosen is not None
        picks[chosen.instance] += 1
    # uniform choice would send it a quarter of the traffic; two distinct samples always
    # include an idle endpoint next to it, so it gets none until its requests finish
    assert picks["reviews-0"] == 0
    assert all(picks[f"reviews-{i}"] > 1000 for i in (1, 2, 3))


def test_least_request_counts_recover_when_requests_end() -> None:
    balancer = build_balancer(endpoints(2), LoadBalancer(simple="LEAST_REQUEST"), random.Random(4))
    balancer.on_request_start("reviews-1")
    balancer.on_request_end("reviews-1")
    balancer.on_request_end("reviews-1")  # a stray end never drives a count negative
    balancer.on_request_start("reviews-0")
    chosen = [balancer.choose() for _ in range(50)]
    assert {ep.instance for ep in chosen if ep is not None} == {"reviews-1"}


def test_least_request_keeps_in_flight_counts_across_endpoint_updates() -> None:
    policy = LoadBalancer(simple="LEAST_REQUEST")
    old = build_balancer(endpoints(2), policy, random.Random(1))
    old.on_request_start("reviews-0")
    new = build_balancer([*endpoints(2), endpoint("reviews-new")], policy, random.Random(2), old)
    assert isinstance(new, LeastRequestBalancer)
    assert new.active_requests("reviews-0") == 1
    old.on_request_end("reviews-0")  # an attempt started before the update ends
    assert new.active_requests("reviews-0") == 0


# ---------------------------------------------------------------- random


def test_random_covers_every_endpoint_evenly() -> None:
    balancer = build_balancer(endpoints(4), LoadBalancer(simple="RANDOM"), random.Random(11))
    picks: Counter[str] = Counter()
    for _ in range(4000):
        chosen = balancer.choose()
        assert chosen is not None
        picks[chosen.instance] += 1
    assert set(picks) == {f"reviews-{i}" for i in range(4)}
    assert all(800 < count < 1200 for count in picks.values())


def test_random_is_reproducible_with_the_same_seed() -> None:
    def run(seed: int) -> list[str]:
        balancer = build_balancer(endpoints(5), LoadBalancer(simple="RANDOM"), random.Random(seed))
        return [ep.instance for ep in (balancer.choose() for _ in range(20)) if ep is not None]

    assert run(42) == run(42)


# ---------------------------------------------------------------- consistent hash


def ring(eps: list[Endpoint], policy: LoadBalancer | None = None, seed: int = 0) -> Balancer:
    return build_balancer(eps, policy or header_hash(), random.Random(seed))


def owner(balancer: Balancer, key: str) -> str:
    chosen = balancer.choose(HashContext(headers={"x-user": key}))
    assert chosen is not None
    return chosen.instance


KEYS = [f"user-{i}" for i in range(10_000)]


def test_same_key_same_endpoint_in_every_proxy() -> None:
    one, other = ring(endpoints(6), seed=1), ring(endpoints(6), seed=99)
    for key in KEYS[:500]:
        first = owner(one, key)
        assert owner(one, key) == first
        assert owner(other, key) == first


@pytest.mark.parametrize("n", [3, 5, 17])
def test_keys_spread_over_every_endpoint(n: int) -> None:
    balancer = ring(endpoints(n))
    shares = Counter(owner(balancer, key) for key in KEYS)
    assert len(shares) == n
    fair = len(KEYS) / n
    assert all(0.6 * fair < count < 1.4 * fair for count in shares.values())


@pytest.mark.parametrize("n", [7, 10, 24])
def test_adding_an_endpoint_moves_only_the_keys_it_takes(n: int) -> None:
    before_ring, after_ring = ring(endpoints(n)), ring([*endpoints(n), endpoint("reviews-new")])
    before = {key: owner(before_ring, key) for key in KEYS}
    after = {key: owner(after_ring, key) for key in KEYS}
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == "reviews-new" for key in moved)
    assert abs(len(moved) / len(KEYS) - 1 / (n + 1)) < 0.5 / (n + 1)


@pytest.mark.parametrize("n", [8, 11, 24])
def test_removing_an_endpoint_moves_only_its_keys(n: int) -> None:
    full = endpoints(n)
    before_ring, after_ring = ring(full), ring(full[:3] + full[4:])
    before = {key: owner(before_ring, key) for key in KEYS}
    after = {key: owner(after_ring, key) for key in KEYS}
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == "reviews-3"}


@pytest.mark.parametrize("n", [2, 3, 5])
def test_small_sets_still_move_a_bounded_share(n: int) -> None:
    # Below minimum_ring_size / 160 endpoints each one's point count depends on n (as
    # in Envoy), so more than the ideal 1/(n+1) moves, but far from a full reshuffle.
    before_ring, after_ring = ring(endpoints(n)), ring([*endpoints(n), endpoint("reviews-new")])
    moved = sum(owner(before_ring, key) != owner(after_ring, key) for key in KEYS)
    assert moved / len(KEYS) < 2 / (n + 1)


def test_request_without_the_key_still_gets_an_endpoint() -> None:
    balancer = ring(endpoints(4), seed=8)
    picks = [balancer.choose(HashContext(headers={})) for _ in range(200)]
    picks += [balancer.choose(None) for _ in range(200)]
    assert None not in picks
    assert len(names(picks)) == 4  # random, not pinned to one endpoint


@pytest.mark.parametrize(
    ("policy", "ctx", "same_as"),
    [
        pytest.param(
            ConsistentHash(http_cookie=HTTPCookie(name="session")),
            HashContext(headers={"cookie": "theme=dark; session=abc123"}),
            HashContext(headers={"cookie": 'session="abc123"'}),
            id="cookie, quoted or not",
        ),
        pytest.param(
            ConsistentHash(use_source_ip=True),
            HashContext(source_ip="192.168.1.20", source_port=50000),
            HashContext(source_ip="192.168.1.20", source_port=61000),
            id="source ip, any port",
        ),
        pytest.param(
            ConsistentHash(http_query_parameter_name="tenant"),
            HashContext(path="/orders?tenant=acme&page=2"),
            HashContext(path="/invoices?page=9&tenant=acme"),
            id="query parameter",
        ),
        pytest.param(
            ConsistentHash(http_header_name="X-User"),
            HashContext(headers={"x-user": "kim"}),
            HashContext(headers={"x-user": "kim", "accept": "*/*"}),
            id="header name from config is case-insensitive",
        ),
    ],
)
def test_hash_key_sources(policy: ConsistentHash, ctx: HashContext, same_as: HashContext) -> None:
    balancer = ring(endpoints(8), LoadBalancer(consistent_hash=policy))
    first = balancer.choose(ctx)
    assert first is not None
    for _ in range(20):
        assert balancer.choose(ctx) == first
        assert balancer.choose(same_as) == first


def test_different_keys_reach_different_endpoints_for_each_key_source() -> None:
    policy = LoadBalancer(consistent_hash=ConsistentHash(http_query_parameter_name="tenant"))
    balancer = ring(endpoints(4), policy)
    reached = names(balancer.choose(HashContext(path=f"/o?tenant=t{i}")) for i in range(200))
    assert len(reached) == 4


def sticky(ttl_ms: int = 3_600_000, path: str = "/") -> LoadBalancer:
    cookie = HTTPCookie(name="route", path=path, ttl_ms=ttl_ms)
    return LoadBalancer(consistent_hash=ConsistentHash(http_cookie=cookie))


def test_sticky_cookie_is_generated_and_pins_later_requests() -> None:
    balancer = ring(endpoints(8), sticky())
    first_visit = HashContext(headers={}, source_ip="10.1.2.3", source_port=40000)
    set_cookie = balancer.cookie_to_set(first_visit)
    assert set_cookie is not None
    name_value, *attributes = set_cookie.split("; ")
    assert name_value.startswith('route="') and name_value.endswith('"')
    assert attributes == ["Max-Age=3600", "Path=/", "HttpOnly"]
    chosen_first = balancer.choose(first_visit)
    # the browser sends the cookie back, from any address
    follow_up = HashContext(headers={"cookie": name_value}, source_ip="10.9.9.9", source_port=1)
    for _ in range(10):
        assert balancer.choose(follow_up) == chosen_first
    assert balancer.cookie_to_set(follow_up) is None


def test_sticky_cookie_values_differ_between_clients() -> None:
    balancer = ring(endpoints(8), sticky(ttl_ms=1500, path=""))
    values = {
        balancer.cookie_to_set(HashContext(source_ip=f"10.0.0.{i}", source_port=5000))
        for i in range(20)
    }
    assert len(values) == 20
    assert all(v is not None and v.endswith("; Max-Age=2; HttpOnly") for v in values)


def test_cookie_without_ttl_is_never_generated() -> None:
    balancer = ring(endpoints(4), sticky(ttl_ms=0))
    assert balancer.cookie_to_set(HashContext(source_ip="10.0.0.1")) is None
    picks = names(balancer.choose(HashContext(source_ip="10.0.0.1")) for _ in range(100))
    assert len(picks) > 1  # no cookie, no key: random


@pytest.mark.parametrize("policy", [POLICIES["round-robin"], header_hash()])
def test_only_cookie_hashing_sets_cookies(policy: LoadBalancer) -> None:
    balancer = build_balancer(endpoints(3), policy, random.Random(1))
    assert balancer.cookie_to_set(HashContext(source_ip="10.0.0.1")) is None


def test_ring_retry_moves_to_the_next_endpoint_on_the_ring_deterministically() -> None:
    balancer, other_proxy = ring(endpoints(6), seed=1), ring(endpoints(6), seed=2)
    for key in KEYS[:100]:
        ctx = HashContext(headers={"x-user": key})
        primary = balancer.choose(ctx)
        assert primary is not None
        retry = balancer.choose(ctx, exclude=frozenset({primary.instance}))
        assert retry is not None and retry != primary
        assert other_proxy.choose(ctx, exclude=frozenset({primary.instance})) == retry
