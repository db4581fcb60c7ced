"""Endpoint choice for one (destination, subset): subset filtering and the simple
load-balancing algorithms of a DestinationRule, behind one small interface.

A `Balancer` is built from an endpoint list and rebuilt when the list changes (pass
the old one as `previous` to keep LEAST_REQUEST's in-flight counts). Randomness comes
from an injected `random.Random`, so tests are deterministic.
"""

from __future__ import annotations

import abc
import random
from collections.abc import Iterable, Mapping, Sequence

from mesh.compiled import ConsistentHash, LoadBalancer, RouteTable, Subset
from mesh.messages import Endpoint

from .request import HashContext
from .ring_hash import HashRing, cookie_to_set, hash64, request_key

_NOTHING: frozenset[str] = frozenset()


def resolve_subset(table: RouteTable, name: str) -> Subset | None:
    """The DestinationRule subset a route names, its traffic policy already merged.

    "" (no subset) is the whole service under the destination-level policy. An
    unknown name gives None: Envoy has no such cluster, the caller answers 503 (NC).
    """
    if not name:
        return Subset(name="", traffic_policy=table.traffic_policy)
    for subset in table.subsets:
        if subset.name == name:
            return subset
    return None


def _has_labels(endpoint: Endpoint, labels: Mapping[str, str]) -> bool:
    have = endpoint.labels
    for key, want in labels.items():
        value = have.get(key)
        # `meshctl sidecar --version v2` registers the version as a field of its own;
        # subsets select it as the `version` label, as on Kubernetes.
        if value is None and key == "version":
            value = endpoint.version or None
        if value != want:
            return False
    return True


def subset_endpoints(
    endpoints: Iterable[Endpoint], subset_labels: Mapping[str, str]
) -> list[Endpoint]:
    """The endpoints carrying every label of the subset. Starting ones (their app not
    listening yet) are left out. Draining endpoints are left out unless all the
    matching ones are draining: then they are kept, because a draining instance still
    answers and an empty set would fail every request."""
    if subset_labels:
        selected = [ep for ep in endpoints if _has_labels(ep, subset_labels)]
    else:
        selected = list(endpoints)
    live = [ep for ep in selected if ep.status != "starting"]
    serving = [ep for ep in live if ep.status != "draining"]
    return serving if serving else live


class Balancer(abc.ABC):
    """Chooses an endpoint per request attempt.

    `exclude` holds instance ids already tried by this request's earlier attempts; they
    are skipped unless nothing else is left, when a repeat beats failing outright.
    """

    __slots__ = ("_rand", "endpoints")

    def __init__(self, endpoints: Sequence[Endpoint], rand: random.Random) -> None:
        self.endpoints: tuple[Endpoint, ...] = tuple(endpoints)
        self._rand = rand

    @abc.abstractmethod
    def choose(
        self, ctx: HashContext | None = None, exclude: frozenset[str] = _NOTHING
    ) -> Endpoint | None:
        """The endpoint for this attempt, or None when there are no endpoints."""

    # Only LEAST_REQUEST keeps per-endpoint accounting; the other algorithms ignore
    # these calls so the I/O layer can make them unconditionally.
    def on_request_start(self, instance: str) -> None:  # noqa: B027
        """An attempt to `instance` started."""

    def on_request_end(self, instance: str) -> None:  # noqa: B027
        """An attempt to `instance` finished (any outcome)."""

    def cookie_to_set(self, ctx: HashContext) -> str | None:
        """A Set-Cookie value to add to the response (sticky sessions), if any."""
        return None

    def _candidates(self, exclude: frozenset[str]) -> Sequence[Endpoint]:
        if not exclude:
            return self.endpoints
        allowed = [ep for ep in self.endpoints if ep.instance not in exclude]
        return allowed if allowed else self.endpoints


class RoundRobinBalancer(Balancer):
    """Each endpoint in turn, from a random starting point so that many proxies
    configured at once do not all send their first request to the same endpoint."""

    __slots__ = ("_next",)

    def __init__(self, endpoints: Sequence[Endpoint], rand: random.Random) -> None:
        super().__init__(endpoints, rand)
        self._next = rand.randrange(len(self.endpoints)) if self.endpoints else 0

    def choose(
        self, ctx: HashContext | None = None, exclude: frozenset[str] = _NOTHING
    ) -> Endpoint | None:
        endpoints = self.endpoints
        n = len(endpoints)
        if n == 0:
            return None
        for _ in range(n):
            i = self._next
            self._next = i + 1 if i + 1 < n else 0
            if not exclude or endpoints[i].instance not in exclude:
                return endpoints[i]
        # Every endpoint was excluded: keep rotating over all of them.
        i = self._next
        self._next = i + 1 if i + 1 < n else 0
        return endpoints[i]


class RandomBalancer(Balancer):
    __slots__ = ()

    def choose(
        self, ctx: HashContext | None = None, exclude: frozenset[str] = _NOTHING
    ) -> Endpoint | None:
        candidates = self._candidates(exclude)
        if not candidates:
            return None
        return candidates[self._rand.randrange(len(candidates))]


class LeastRequestBalancer(Balancer):
    """Envoy's LEAST_REQUEST with equal weights: sample two endpoints at random and
    take the one with fewer requests in flight (the first sampled on a tie).

    The two samples are distinct endpoints (Envoy samples with replacement), so with two
    endpoints the idle one is always chosen; with many, the result is the same
    power-of-two-choices load spreading.
    """

    __slots__ = ("_active",)

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        rand: random.Random,
        active: dict[str, int] | None = None,
    ) -> None:
        super().__init__(endpoints, rand)
        # instance -> attempts in flight; only instances with some in flight have an
        # entry, so the dict never outgrows the traffic. Shared with the balancer this
        # one replaces, so attempts started there are still counted (and ended) here.
        self._active: dict[str, int] = active if active is not None else {}

    def choose(
        self, ctx: HashContext | None = None, exclude: frozenset[str] = _NOTHING
    ) -> Endpoint | None:
        candidates = self._candidates(exclude)
        n = len(candidates)
        if n <= 1:
            return candidates[0] if n else None
        i = self._rand.randrange(n)
        j = self._rand.randrange(n - 1)
        if j >= i:
            j += 1
        first, second = candidates[i], candidates[j]
        active = self._active
        if active.get(second.instance, 0) < active.get(first.instance, 0):
            return second
        return first

    def on_request_start(self, instance: str) -> None:
        self._active[instance] = self._active.get(instance, 0) + 1

    def on_request_end(self, instance: str) -> None:
        count = self._active.get(instance, 0)
        if count > 1:
            self._active[instance] = count - 1
        else:
            self._active.pop(instance, None)

    def active_requests(self, instance: str) -> int:
        return self._active.get(instance, 0)


class RingHashBalancer(Balancer):
    """DestinationRule `consistentHash`: the same key reaches the same endpoint for as
    long as that endpoint exists; a request without the key gets a random endpoint."""

    __slots__ = ("_policy", "_ring")

    def __init__(
        self, endpoints: Sequence[Endpoint], rand: random.Random, policy: ConsistentHash
    ) -> None:
        super().__init__(endpoints, rand)
        self._policy = policy
        self._ring = HashRing([ep.instance for ep in self.endpoints], policy.minimum_ring_size)

    def choose(
        self, ctx: HashContext | None = None, exclude: frozenset[str] = _NOTHING
    ) -> Endpoint | None:
        endpoints = self.endpoints
        if not endpoints:
            return None
        key = request_key(self._policy, ctx)
        if key is None:
            candidates = self._candidates(exclude)
            return candidates[self._rand.randrange(len(candidates))]
        key_hash = hash64(key.encode())
        if not exclude or all(ep.instance in exclude for ep in endpoints):
            return endpoints[self._ring.lookup(key_hash)]
        return endpoints[self._ring.lookup(key_hash, lambda i: endpoints[i].instance in exclude)]

    def cookie_to_set(self, ctx: HashContext) -> str | None:
        return cookie_to_set(self._policy, ctx)


def build_balancer(
    endpoints: Sequence[Endpoint],
    policy: LoadBalancer,
    rand: random.Random,
    previous: Balancer | None = None,
) -> Balancer:
    """The balancer a DestinationRule's `loadBalancer` asks for (ROUND_ROBIN when
    unset). `consistentHash` takes precedence over `simple`, as in Istio."""
    if policy.consistent_hash is not None:
        return RingHashBalancer(endpoints, rand, policy.consistent_hash)
    if policy.simple == "LEAST_REQUEST":
        active = previous._active if isinstance(previous, LeastRequestBalancer) else None
        return LeastRequestBalancer(endpoints, rand, active)
    if policy.simple == "RANDOM":
        return RandomBalancer(endpoints, rand)
    return RoundRobinBalancer(endpoints, rand)
