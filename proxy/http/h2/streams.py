"""Which HTTP/2 upstream connection takes the next stream: pure rules, no I/O.

A DestinationRule's `connectionPool` limits an HTTP/2 pool the way Envoy's HTTP/2
connection pool applies it (Istio's translation in brackets):

- `maxConcurrentStreams` [`http2_protocol_options.max_concurrent_streams`]: streams
  open at once on one connection, below what the peer's SETTINGS allow;
- `maxRequestsPerConnection` [`max_requests_per_connection`]: streams one connection
  carries in its life; then it takes no more and closes once its last stream ends;
- `tcp.maxConnections` and `http1MaxPendingRequests` (the cluster's circuit breaker):
  a request that finds no connection with room opens one while the cluster has a
  connection slot, else waits as *pending* for room (beyond the pending limit: 503 `UO`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Per-connection limits of an HTTP/2 pool; 0 = none (the peer's SETTINGS only)."""

    max_concurrent_streams: int = 0
    max_requests_per_connection: int = 0


NO_STREAM_LIMITS = StreamLimits()


class StreamLoad(Protocol):
    """What the rules read of a connection."""

    @property
    def has_room(self) -> bool:
        """Open, not going away, and under the peer's MAX_CONCURRENT_STREAMS."""
        ...

    @property
    def active_streams(self) -> int: ...

    @property
    def streams_started(self) -> int: ...


C = TypeVar("C", bound=StreamLoad)


def exhausted(connection: StreamLoad, limits: StreamLimits) -> bool:
    """The connection has carried all the streams `maxRequestsPerConnection` allows."""
    most = limits.max_requests_per_connection
    return bool(most) and connection.streams_started >= most


def takes_another_stream(connection: StreamLoad, limits: StreamLimits) -> bool:
    if not connection.has_room or exhausted(connection, limits):
        return False
    most = limits.max_concurrent_streams
    return not most or connection.active_streams < most


def pick_connection(connections: Iterable[C], limits: StreamLimits) -> C | None:
    """The first connection (oldest first) that takes another stream, or None: then
    the pool opens a connection, or the request waits as pending."""
    for connection in connections:
        if takes_another_stream(connection, limits):
            return connection
    return None
