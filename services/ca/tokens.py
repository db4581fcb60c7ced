"""Bootstrap tokens: random secrets the CA stores only as SHA-256 hashes, each allowing
one SPIFFE identity until it expires.

A token may be used by every replica of its workload (and again after a restart)
until it expires; it cannot be used for any other identity.
"""

from __future__ import annotations

import hashlib
import secrets

import msgspec

TOKEN_PREFIX = "mwt_"  # recognisable by secret scanners
MIN_TTL_S = 1.0
MAX_TTL_S = 30 * 24 * 3600.0
# an expired record is kept this long, so its use is refused as "expired", not "unknown"
EXPIRED_RECORD_GRACE_S = 3600


class TokenRecord(msgspec.Struct, frozen=True, kw_only=True):
    identity: str
    expires_at: float
    created_at: float


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(TokenRecord)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """Hex SHA-256 of the token: the etcd key, so etcd never holds the token itself.
    A token has 256 random bits, so an unsalted fast hash is enough."""
    return hashlib.sha256(token.encode()).hexdigest()


def encode_record(record: TokenRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(value: bytes) -> TokenRecord | None:
    try:
        return _decoder.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def lease_ttl(ttl_s: float) -> int:
    """The etcd lease of a token record: it disappears a while after it expires."""
    return int(ttl_s) + 1 + EXPIRED_RECORD_GRACE_S
