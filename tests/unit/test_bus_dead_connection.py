"""A sidecar whose NATS node is cut off from its cluster must move to another node
before its registration expires (found by tests/hosts/ fault 2: with 20 s to notice a
dead connection and a 10 s TTL, healthy endpoints were deregistered and clients got
503 "no healthy upstream")."""

from __future__ import annotations

import dataclasses

from mesh import bus
from proxy.settings import SidecarSettings


def test_a_dead_nats_connection_is_noticed_well_within_a_registration_ttl() -> None:
    ttl = next(f.default for f in dataclasses.fields(SidecarSettings) if f.name == "register_ttl")
    assert isinstance(ttl, int)
    heartbeat_every = ttl / 3  # proxy/registration.py: heartbeats at a third of the TTL
    connect_to_a_dead_server = 2.0  # Bus.connect's connect_timeout: one dead server tried
    # the last heartbeat before the cut, then noticing, then reconnecting elsewhere
    assert (
        heartbeat_every + bus.dead_connection_detected_within_s() + connect_to_a_dead_server < ttl
    )
