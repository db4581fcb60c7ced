"""Local replies to gRPC requests: trailers-only responses with a `grpc-status`.

A gRPC client reads the outcome of a call from `grpc-status`, not from the HTTP status,
so a proxy's own answer to a gRPC request (authorization denied, no upstream, timeout,
...) is HTTP 200 with `content-type: application/grpc`, `grpc-status` and
`grpc-message` in one HEADERS frame (a "trailers-only" response), as Envoy sends.

The status follows Envoy's `Grpc::Utility::httpToGrpcStatus` (the gRPC project's HTTP
to gRPC mapping), except that a route or per-try timeout (flag `UT`) is
DEADLINE_EXCEEDED, as the issue asks of the mesh (the deadline is what ran out).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote

from proxy.response_flags import ResponseFlag

OK = 0
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

_FROM_HTTP = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}


def is_grpc(headers: Iterable[tuple[str, str]]) -> bool:
    """The request is gRPC: its content-type is application/grpc (or a +subtype)."""
    for name, value in headers:
        if name == "content-type":
            return value.startswith("application/grpc")
    return False


def grpc_status_for(http_status: int, flags: str) -> int:
    """The gRPC status of a local reply that would have been `http_status`."""
    if ResponseFlag.UPSTREAM_REQUEST_TIMEOUT in flags.split(","):
        return DEADLINE_EXCEEDED
    return _FROM_HTTP.get(http_status, UNKNOWN)


def grpc_local_reply(
    http_status: int, flags: str, message: str, grpc_status: int | None = None
) -> tuple[int, list[tuple[str, str]]]:
    """(HTTP status, headers) of a trailers-only answer; `grpc_status` overrides the
    mapping (a fault's `grpcStatus`). `message` is our own text, percent-encoded as
    gRPC requires."""
    code = grpc_status if grpc_status is not None else grpc_status_for(http_status, flags)
    return 200, [
        ("content-type", "application/grpc"),
        ("grpc-status", str(code)),
        ("grpc-message", quote(message.strip(), safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")),
    ]
