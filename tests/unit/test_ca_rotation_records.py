"""Stored workload rotations (services/ca/rotations.py): which ones require a
certificate to be renewed, and which ones are old enough to drop."""

from __future__ import annotations

import pytest

from mesh.ca_messages import RotationRecord
from services.ca import rotations

REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"
RATINGS = "spiffe://cluster.local/ns/default/sa/ratings"


def record(target: str, at: float, reason: str = "r") -> RotationRecord:
    return RotationRecord(target=target, requested_at=at, reason=reason, spread_s=1.0)


@pytest.mark.parametrize(
    ("target", "requested_at", "issued_at", "renew"),
    [
        (REVIEWS, 110.0, 100.0, True),  # this identity, after the certificate
        ("all", 110.0, 100.0, True),  # every identity, after the certificate
        (REVIEWS, 90.0, 100.0, False),  # before: the certificate is already newer
        ("all", 90.0, 100.0, False),
        (REVIEWS, 100.0, 100.0, False),  # the same instant: signed after the request
        (RATINGS, 110.0, 100.0, False),  # another identity
    ],
)
def test_a_stored_rotation_requires_renewal_only_of_older_certificates_it_names(
    target: str, requested_at: float, issued_at: float, renew: bool
) -> None:
    assert rotations.requires_renewal(record(target, requested_at), REVIEWS, issued_at) is renew


def test_notices_for_a_certificate_are_those_that_apply_oldest_first() -> None:
    stored = [
        record("all", 130.0, "third"),
        record(RATINGS, 120.0, "other identity"),
        record(REVIEWS, 110.0, "second"),
        record("all", 90.0, "before issuance"),
        record(REVIEWS, 105.0, "first"),
    ]
    got = rotations.notices_for(stored, REVIEWS, 100.0)
    assert [r.reason for r in got] == ["first", "second", "third"]
    assert rotations.notices_for(stored, REVIEWS, 130.0) == []


def test_rotations_older_than_the_longest_certificate_lifetime_are_dropped() -> None:
    stored = [
        ("k-old", record("all", 1000.0 - 3601.0)),
        ("k-edge", record("all", 1000.0 - 3600.0)),
        ("k-new", record(REVIEWS, 990.0)),
        ("k-garbage", None),
    ]
    assert rotations.expired_keys(stored, 1000.0, 3600.0) == ["k-old", "k-garbage"]


def test_records_round_trip_and_key_names_sort_by_time() -> None:
    r = record(REVIEWS, 1765000000.25, "key leak")
    assert rotations.decode_record(rotations.encode_record(r)) == r
    assert rotations.decode_record(b"not json") is None
    names = [rotations.record_name(t) for t in (9.5, 10.0, 1765000000.25)]
    assert names == sorted(names)
    assert len({rotations.record_name(10.0) for _ in range(20)}) == 20
