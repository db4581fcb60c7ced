"""Consistent hashing for DestinationRule `consistentHash`: a Ketama-style ring and the
request keys it hashes (header, cookie, source IP, query parameter).

The ring places several points per endpoint on a 64-bit circle; a request key goes to
the first point at or after its hash. Points are keyed by instance id, so an endpoint
keeps its points when others come and go and only the keys near the changed endpoint's
points move.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from bisect import bisect_left
from collections.abc import Callable, Sequence

from mesh.compiled import ConsistentHash

from .request import HashContext, cookie_value, first_query_value


def hash64(data: bytes) -> int:
    """A stable 64-bit hash (the same in every process and Python version, unlike
    `hash()`), so every proxy maps a key to the same endpoint."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


# Ketama's classic count of points per server.
MIN_POINTS_PER_ENDPOINT = 160
# Bounds memory and rebuild time for very large endpoint sets (Envoy caps at 8M).
MAX_RING_SIZE = 1 << 20
_POINTS_PER_DIGEST = 8  # a 64-byte blake2b digest holds eight 64-bit points
_UNPACK_POINTS = struct.Struct(">8Q").unpack


def points_per_endpoint(n: int, minimum_ring_size: int) -> int:
    """Points each of `n` endpoints gets on a ring of at least `minimum_ring_size`.

    Envoy gives each ceil(minimum / n). That count changes with every n, so adding an
    endpoint also drops points from all the others, and the keys on dropped points move
    too: about 2/n of the keys instead of 1/n. Never going below Ketama's 160 per
    endpoint makes the count independent of n once n >= minimum / 160 (7 endpoints
    for the default 1024), so from there an add or remove moves only the keys the
    changed endpoint gains or loses; it also spreads load more evenly. The price is a
    ring of n * 160 points for large sets, which is still small.
    """
    if n <= 0:
        return 0
    wanted = max(-(-minimum_ring_size // n), MIN_POINTS_PER_ENDPOINT)
    return max(1, min(wanted, MAX_RING_SIZE // n))


class HashRing:
    """Sorted ring points; `lookup` gives the index of the endpoint owning a hash."""

    __slots__ = ("_hashes", "_owners")

    def __init__(self, keys: Sequence[str], minimum_ring_size: int) -> None:
        per_endpoint = points_per_endpoint(len(keys), minimum_ring_size)
        points: list[tuple[int, int]] = []
        for owner, key in enumerate(keys):
            # Point j of an endpoint depends only on its key and j, so an endpoint's
            # points stay where they are whatever else joins or leaves the ring.
            for group in range(-(-per_endpoint // _POINTS_PER_DIGEST)):
                digest = hashlib.blake2b(f"{key}_{group}".encode(), digest_size=64).digest()
                take = min(_POINTS_PER_DIGEST, per_endpoint - group * _POINTS_PER_DIGEST)
                points.extend((h, owner) for h in _UNPACK_POINTS(digest)[:take])
        points.sort()
        # Compact arrays: a large ring costs 12 bytes a point instead of ~80 in lists.
        self._hashes = array("Q", [h for h, _ in points])
        self._owners = array("I", [owner for _, owner in points])

    def __len__(self) -> int:
        return len(self._hashes)

    def lookup(self, key_hash: int, skip: Callable[[int], bool] | None = None) -> int:
        """The owner of the first point at or after `key_hash` (wrapping around).

        With `skip`, walk on clockwise past owners it rejects, as Envoy does for retries
        that must avoid hosts already tried; if it rejects every owner, the first owner
        is returned. The ring must not be empty.
        """
        i = bisect_left(self._hashes, key_hash)
        size = len(self._hashes)
        if i == size:
            i = 0
        owner = self._owners[i]
        if skip is None or not skip(owner):
            return owner
        for step in range(1, size):
            candidate = self._owners[(i + step) % size]
            if not skip(candidate):
                return candidate
        return owner


def generated_cookie_value(ctx: HashContext) -> str:
    """The value for a sticky-session cookie the client has not got yet.

    Envoy hashes the downstream address; the request is then hashed on this value, so
    it reaches the same endpoint as the follow-up requests that carry the cookie.
    """
    return format(hash64(f"{ctx.source_ip}:{ctx.source_port}".encode()), "016x")


def request_key(policy: ConsistentHash, ctx: HashContext | None) -> str | None:
    """The string a request is hashed on, or None when the request lacks it (the
    balancer then picks at random, as Envoy does)."""
    if ctx is None:
        return None
    if policy.http_header_name:
        return ctx.headers.get(policy.http_header_name.lower())
    if policy.http_cookie is not None:
        value = cookie_value(ctx.headers, policy.http_cookie.name)
        if value is None and policy.http_cookie.ttl_ms > 0:
            return generated_cookie_value(ctx)
        return value
    if policy.use_source_ip:
        return ctx.source_ip or None
    if policy.http_query_parameter_name:
        return first_query_value(ctx.path, policy.http_query_parameter_name)
    return None


def cookie_to_set(policy: ConsistentHash, ctx: HashContext) -> str | None:
    """The Set-Cookie header value to add to the response, or None.

    Only for `httpCookie` with a `ttl`, when the request did not carry the cookie;
    the format is Envoy's: `name="value"; Max-Age=<s>; Path=<path>; HttpOnly`.
    """
    cookie = policy.http_cookie
    if cookie is None or cookie.ttl_ms <= 0:
        return None
    if cookie_value(ctx.headers, cookie.name) is not None:
        return None
    # Rounded up: a sub-second TTL must not become Max-Age=0, which deletes the cookie.
    max_age = -(-cookie.ttl_ms // 1000)
    parts = [f'{cookie.name}="{generated_cookie_value(ctx)}"', f"Max-Age={max_age}"]
    if cookie.path:
        parts.append(f"Path={cookie.path}")
    parts.append("HttpOnly")
    return "; ".join(parts)
