"""The sidecar's HTTP/1.1 data path: strict parsing, streaming, an upstream pool.

Mesh-agnostic: the outbound, inbound and gateway listeners supply a `Handler` that
decides where each request goes; this package moves the bytes.
"""

from .body import BodyStream
from .client import ConnectionInfo, UpstreamResponse
from .errors import (
    BodyTooLargeError,
    DownstreamError,
    HttpEngineError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResetError,
)
from .exchange import Exchange
from .headers import (
    HOP_BY_HOP,
    append_forwarded_for,
    ensure_request_id,
    get_header,
    header_map,
    strip_hop_by_hop,
)
from .limits import Limits
from .listen import ConnectionSet, install_uvloop, serve
from .pool import PoolStats, UpstreamPool
from .request import Request
from .server import Handler
from .target import InvalidTarget, Normalization

__all__ = [
    "HOP_BY_HOP",
    "BodyStream",
    "BodyTooLargeError",
    "ConnectionInfo",
    "ConnectionSet",
    "DownstreamError",
    "Exchange",
    "Handler",
    "HttpEngineError",
    "InvalidTarget",
    "Limits",
    "Normalization",
    "PoolStats",
    "Request",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResetError",
    "UpstreamResponse",
    "append_forwarded_for",
    "ensure_request_id",
    "get_header",
    "header_map",
    "install_uvloop",
    "serve",
    "strip_hop_by_hop",
]
