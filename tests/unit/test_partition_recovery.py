"""Pure rules that let the mesh ride out a partition (docs/architecture.md §2.2), each
found by the multi-host fault suite (tests/hosts/):

- a sidecar's heartbeats: a lost one is retried at once, and enough attempts fit in
  the lease's TTL that one or two lost with a cut NATS route lapse nothing;
- the registry's liveness key outlives a leader handover, so a handover is not taken
  for an outage of the whole registry;
- the config leader publishes again what a proxy's status shows it missed (a publish
  lost with a NATS route cut by a partition, the proxy's own connection intact);
- nats-server notices a dead route (to another server) within a registration's TTL.
"""

from __future__ import annotations

import dataclasses

import pytest

from mesh.messages import ProxyStatus, SubscriptionStatus
from mesh.servers import (
    NATS_CLIENT_PING_INTERVAL_S,
    NATS_CLIENT_PING_MAX,
    NATS_ROUTE_PING_INTERVAL_S,
    NATS_ROUTE_PING_MAX,
    nats_client_liveness_conf,
    nats_route_liveness_conf,
)
from proxy.registration import (
    HEARTBEAT_RETRY_S,
    heartbeat_delay,
    heartbeat_interval,
    heartbeat_timeout,
)
from proxy.settings import SidecarSettings
from services.config.status import MISSED_AFTER_S, REPUBLISH_EVERY_S, missed_subjects
from services.registry.service import alive_ttl_s

DEFAULT_TTL = next(
    f.default for f in dataclasses.fields(SidecarSettings) if f.name == "register_ttl"
)


@pytest.mark.parametrize("ttl", [3, 5, DEFAULT_TTL, 30, 300])
def test_three_heartbeat_attempts_end_before_the_lease_can_lapse(ttl: int) -> None:
    # (TTLs under 3 s, which only tests use, leave room for fewer)
    # the last success at 0: the next on schedule, then two retries, each waiting out
    # its timeout (an answer lost with a dead route never comes)
    t = heartbeat_delay(ttl, failures=0) + heartbeat_timeout(ttl)
    for failures in (1, 2):
        t += heartbeat_delay(ttl, failures) + heartbeat_timeout(ttl)
    assert t <= ttl, (ttl, t)


def test_a_failed_heartbeat_is_retried_at_once_and_a_success_waits_a_third_of_the_ttl() -> None:
    assert heartbeat_delay(DEFAULT_TTL, failures=0) == heartbeat_interval(DEFAULT_TTL)
    assert heartbeat_interval(DEFAULT_TTL) == pytest.approx(DEFAULT_TTL / 3)
    assert heartbeat_delay(DEFAULT_TTL, failures=1) == HEARTBEAT_RETRY_S
    assert heartbeat_delay(DEFAULT_TTL, failures=5) == HEARTBEAT_RETRY_S


@pytest.mark.parametrize("election_ttl", [1, 2, 5, 10])
def test_the_registry_liveness_key_outlives_a_leader_handover(election_ttl: int) -> None:
    # a handover: the deposed leader's election lease runs out (its TTL), then a
    # candidate wins; the new leader must still find the key
    assert alive_ttl_s(election_ttl) > election_ttl
    assert alive_ttl_s(election_ttl) >= 2 * election_ttl


def test_nats_notices_a_dead_route_well_within_a_registration_ttl() -> None:
    detected_within = NATS_ROUTE_PING_INTERVAL_S * (NATS_ROUTE_PING_MAX + 1)
    assert detected_within + heartbeat_interval(DEFAULT_TTL) < DEFAULT_TTL
    assert nats_route_liveness_conf() == '  ping_interval: "1s"\n  ping_max: 2\n'


def test_nats_drops_a_cut_off_clients_connection_soon_but_not_a_frozen_leaders() -> None:
    """A dead client's queue subscriptions swallow the requests they are picked for
    until the server drops it (tests/hosts/ fault 2): within 15 s, one or two of
    `meshctl`'s 10 s attempts. A process frozen past its election lease (5 s by
    default) keeps its connection twice that long, so its refusals still arrive."""
    from mesh.service import ServiceConfig

    election_ttl = ServiceConfig(nats=[], etcd=[]).election_ttl
    dropped_at_most = NATS_CLIENT_PING_INTERVAL_S * (NATS_CLIENT_PING_MAX + 1)
    kept_at_least = NATS_CLIENT_PING_INTERVAL_S * NATS_CLIENT_PING_MAX
    assert dropped_at_most <= 15
    assert kept_at_least >= 2 * election_ttl
    assert nats_client_liveness_conf() == 'ping_interval: "5s"\nping_max: 2\n'


def report(**revisions: int) -> ProxyStatus:
    return ProxyStatus(
        proxy="client-0",
        namespace="default",
        service="client",
        subscriptions=[SubscriptionStatus(subject=s, revision=r) for s, r in revisions.items()],
        sent_at=1.0,
    )


LATEST = {"route": 7, "inbound": 5, "meshwide": 3}
PUBLISHED_AT = {"route": 100.0, "inbound": 100.0, "meshwide": 50.0}


def test_a_subject_behind_a_publish_long_past_is_missed() -> None:
    now = 100.0 + MISSED_AFTER_S
    got = missed_subjects(report(route=6, inbound=5, meshwide=3), LATEST, PUBLISHED_AT, now, {})
    assert got == ["route"]


def test_a_report_right_after_a_publish_may_not_have_applied_it_yet() -> None:
    now = 100.0 + MISSED_AFTER_S / 2
    assert missed_subjects(report(route=6), LATEST, PUBLISHED_AT, now, {}) == []


def test_synced_newer_unknown_and_rejected_subjects_are_not_missed() -> None:
    now = 200.0
    assert missed_subjects(report(route=7, inbound=9, other=1), LATEST, PUBLISHED_AT, now, {}) == []
    rejected = ProxyStatus(
        proxy="client-0",
        namespace="default",
        service="client",
        subscriptions=[
            SubscriptionStatus(subject="route", revision=6, state="NACK", rejected_revision=7)
        ],
        sent_at=1.0,
    )
    assert missed_subjects(rejected, LATEST, PUBLISHED_AT, now, {}) == []


def test_a_subject_is_published_again_at_most_every_few_seconds() -> None:
    now = 200.0
    behind = report(route=6, inbound=4)
    recently = {"route": now - REPUBLISH_EVERY_S / 2, "inbound": now - REPUBLISH_EVERY_S}
    assert missed_subjects(behind, LATEST, PUBLISHED_AT, now, recently) == ["inbound"]
