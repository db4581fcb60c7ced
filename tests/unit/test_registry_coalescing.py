"""The registry's churn coalescing, with a fake clock: a burst of instance changes
folds into one publish per service holding all of them."""

from __future__ import annotations

from mesh import messages
from mesh.debounce import Debouncer, DebounceSettings
from mesh.messages import Instance
from services.registry.index import EndpointIndex, instance_key
from services.registry.service import PUBLISH_MAX_DELAY_S, PUBLISH_QUIET_S

PREFIX = "/mesh/"


def put(index: EndpointIndex, service: str, i: int, revision: int) -> tuple[str, str] | None:
    inst = Instance(
        namespace="default", service=service, instance=f"{service}-{i}", address=f"10.0.0.{i}:80"
    )
    key = instance_key(PREFIX, "default", service, inst.instance)
    return index.apply("put", key, messages.encode(inst), revision)


def test_a_burst_becomes_one_publish_per_service_with_everything() -> None:
    index = EndpointIndex(PREFIX)
    pending: Debouncer[frozenset[tuple[str, str]]] = Debouncer(
        DebounceSettings(PUBLISH_QUIET_S, PUBLISH_MAX_DELAY_S), frozenset.union
    )
    now = 0.0
    rounds: list[frozenset[tuple[str, str]]] = []
    for i in range(300):  # 300 changes, 2 ms apart: 600 ms of churn
        changed = put(index, ("reviews", "ratings", "details")[i % 3], i, revision=i + 1)
        assert changed is not None
        pending.add(frozenset({changed}), now)
        if (batch := pending.take(now)) is not None:
            rounds.append(batch.request)
            pending.done()
        now += 0.002
    if (batch := pending.take(now + PUBLISH_QUIET_S)) is not None:
        rounds.append(batch.request)
    # the maximum delay bounds how stale a set gets under steady churn: one round per
    # max delay, each publishing every service once
    assert len(rounds) == 3
    assert all(r == {("default", s) for s in ("reviews", "ratings", "details")} for r in rounds)
    assert len(index.endpoint_set("default", "reviews").endpoints) == 100
