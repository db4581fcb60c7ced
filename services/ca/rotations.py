"""Workload rotations kept in etcd (`/mesh/ca/rotations/<requested_at ns>-<random>`,
docs/architecture.md §4): pure decisions about them, no I/O.

`meshctl ca rotate` publishes a `RotateNotice`, which a sidecar disconnected at that
moment never sees. The CA therefore also stores each request; a sidecar asks
(`ca.rotations.get`) at start and after every reconnect which stored rotations
require its certificate to be renewed: those for its identity (or "all") requested
after the certificate was issued. A rotation older than the longest certificate
lifetime concerns no valid certificate any more, so it is dropped.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence

import msgspec

from mesh.ca_messages import RotationRecord

ALL = "all"

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(RotationRecord)


def record_name(requested_at: float) -> str:
    """The key's last part: time-ordered (zero-padded nanoseconds), unique per request."""
    return f"{round(requested_at * 1e9):020d}-{secrets.token_hex(4)}"


def encode_record(record: RotationRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(value: bytes) -> RotationRecord | None:
    """None for a value that is not a rotation record (it is skipped, not fatal)."""
    try:
        return _decoder.decode(value)
    except msgspec.DecodeError:
        return None


def requires_renewal(record: RotationRecord, identity: str, issued_at: float) -> bool:
    """Does `record` require the certificate of `identity`, issued at `issued_at` (the
    CA's clock), to be renewed? Yes when it names this identity or all of them and was
    requested after the certificate was issued."""
    return record.target in (ALL, identity) and record.requested_at > issued_at


def notices_for(
    records: Iterable[RotationRecord], identity: str, issued_at: float
) -> list[RotationRecord]:
    """The records that require that certificate to be renewed, oldest first."""
    return sorted(
        (r for r in records if requires_renewal(r, identity, issued_at)),
        key=lambda r: r.requested_at,
    )


def expired_keys(
    stored: Sequence[tuple[str, RotationRecord | None]], now: float, max_lifetime_s: float
) -> list[str]:
    """Keys of the records (and unreadable values) to drop: requested more than
    `max_lifetime_s` ago, every certificate issued before them has expired since."""
    return [
        key
        for key, record in stored
        if record is None or record.requested_at < now - max_lifetime_s
    ]
