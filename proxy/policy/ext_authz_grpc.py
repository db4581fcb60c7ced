"""CUSTOM authorization with a gRPC authorizer: Envoy's ext_authz gRPC service
semantics (`envoy.service.auth.v3.Authorization/Check`), as Istio configures them from
`envoyExtAuthzGrpc`. Pure: the CheckRequest to send, its gRPC framing, and what the
CheckResponse means; `proxy.ext_authz` does the exchange over the mesh's HTTP/2 pools.

- The CheckRequest carries what Envoy's filter puts there: source and destination
  (address, SPIFFE principal), and the HTTP request: id (`x-request-id`), method,
  every header (lower-case names; repeated ones joined with ","), path with query,
  host, scheme, protocol and, with `includeRequestBodyInCheck`, the body buffered up
  to `maxRequestBytes` (`raw_body` with `packAsBytes`, else `body` as UTF-8).
- `status.code` OK allows: `ok_response.headers` are set on the upstream request
  (replacing the client's; `append: true` adds a value instead), the names in
  `headers_to_remove` are removed (never Host, framing or pseudo-headers), and
  `response_headers_to_add` are added to the upstream's answer to the client.
  `query_parameters_to_set/remove` and `dynamic_metadata` are not applied.
- Any other code denies with `denied_response`: its HTTP status (403 when unset, as
  Envoy), headers and body go to the client.
- No usable answer (a gRPC error status, transport failure, timeout, an undecodable
  message): allowed with `failOpen`, else refused with `statusOnError` (default 403).
  All flagged `UAEX` as Envoy does.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from mesh.compiled import ExtAuthzProvider
from proxy.policy.ext_authz import CheckResult

if TYPE_CHECKING:
    from envoy.config.core.v3 import base_pb2

# The Envoy and protobuf modules are imported by the functions that need them: only
# sidecars with a gRPC authorizer pay for them (a few MiB of resident memory, and
# docs/architecture.md §5.1 keeps the Python sidecar's memory below Envoy's).

CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
GRPC_OK = 0
# Envoy's default status for a DeniedHttpResponse without one
DEFAULT_DENIED_STATUS = 403
# never taken from the authorizer: what routing and framing depend on
_PROTECTED = frozenset(("host", "content-length", "transfer-encoding", "connection", "te"))
MAX_MESSAGE = 4 * 1024 * 1024  # grpcio's default receive limit


class CheckFacts(NamedTuple):
    """What the sidecar knows of the request being authorized."""

    method: str
    path: str  # with the query
    host: str
    scheme: str
    protocol: str  # "HTTP/1.1", "HTTP/2"
    headers: Sequence[tuple[str, str]]
    source: tuple[str, int]
    source_principal: str  # SPIFFE ID of the mTLS peer, "" in plaintext
    destination: tuple[str, int]
    destination_principal: str  # this workload's SPIFFE ID
    body: bytes = b""
    body_size: int = -1  # the whole body's length when known, else -1
    partial_body: bool = False


class GrpcCheckResult(NamedTuple):
    """`CheckResult` plus what only the gRPC answer can say."""

    result: CheckResult
    remove_headers: tuple[str, ...] = ()
    # (name, value, append) for the upstream request
    set_headers: tuple[tuple[str, str, bool], ...] = ()


def check_request(provider: ExtAuthzProvider, facts: CheckFacts) -> bytes:
    """The serialized CheckRequest for `facts`."""
    from envoy.service.auth.v3 import external_auth_pb2

    message = external_auth_pb2.CheckRequest()
    attributes = message.attributes
    _address(attributes.source.address, facts.source)
    attributes.source.principal = facts.source_principal
    _address(attributes.destination.address, facts.destination)
    attributes.destination.principal = facts.destination_principal
    attributes.request.time.GetCurrentTime()
    http = attributes.request.http
    joined: dict[str, str] = {}
    for name, value in facts.headers:
        joined[name] = f"{joined[name]},{value}" if name in joined else value
    http.headers.update(joined)
    http.id = joined.get("x-request-id", "")
    http.method = facts.method
    http.path = facts.path
    http.host = facts.host
    http.scheme = facts.scheme
    http.protocol = facts.protocol
    http.size = facts.body_size
    if provider.max_request_bytes and facts.body:
        if provider.pack_as_bytes:
            http.raw_body = facts.body
        else:
            http.body = facts.body.decode("utf-8", errors="replace")
    if facts.partial_body:
        # Envoy marks a truncated body this way (`allowPartialMessage`)
        http.headers["x-envoy-auth-partial-body"] = "true"
    return message.SerializeToString()


def _address(address: base_pb2.Address, peer: tuple[str, int]) -> None:
    if peer[0]:
        address.socket_address.address = peer[0]
        address.socket_address.port_value = peer[1]


def grpc_headers(provider: ExtAuthzProvider, authority: str) -> list[tuple[str, str]]:
    """The request headers of the unary call, with the provider's timeout as the
    deadline (`grpc-timeout`, in milliseconds)."""
    return [
        ("host", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", f"{max(provider.timeout_ms, 1)}m"),
        ("user-agent", "meshwork-ext-authz"),
    ]


def frame(message: bytes) -> bytes:
    """One length-prefixed, uncompressed gRPC message."""
    return b"\x00" + struct.pack(">I", len(message)) + message


class GrpcCallError(Exception):
    """The call ended without a usable CheckResponse; the message says why."""


def unframe(body: bytes) -> bytes:
    """The single message of a unary answer's body."""
    if len(body) < 5:
        raise GrpcCallError(f"answer body of {len(body)} bytes holds no gRPC message")
    compressed, length = body[0], struct.unpack(">I", body[1:5])[0]
    if compressed:
        raise GrpcCallError("compressed answer (no grpc-encoding was offered)")
    if length != len(body) - 5:
        raise GrpcCallError(f"gRPC message of {length} bytes in a body of {len(body) - 5}")
    return body[5:]


def call_status(
    status: int, headers: Sequence[tuple[str, str]], trailers: Sequence[tuple[str, str]] | None
) -> None:
    """Raise `GrpcCallError` unless the HTTP answer ended the call with grpc-status 0
    (in the trailers, or in the head of a trailers-only answer)."""
    if status != 200:
        raise GrpcCallError(f"HTTP status {status}")
    fields = dict(trailers or ())
    code = fields.get("grpc-status", dict(headers).get("grpc-status"))
    if code is None:
        raise GrpcCallError("no grpc-status")
    if code != "0":
        message = fields.get("grpc-message", dict(headers).get("grpc-message", ""))
        raise GrpcCallError(f"grpc-status {code} {message}".rstrip())


def check_response(provider: ExtAuthzProvider, message: bytes) -> GrpcCheckResult:
    """What a CheckResponse decides."""
    from envoy.service.auth.v3 import external_auth_pb2
    from google.protobuf.message import DecodeError

    answer = external_auth_pb2.CheckResponse()
    try:
        answer.ParseFromString(message)
    except DecodeError as e:
        raise GrpcCallError(f"undecodable CheckResponse: {e}") from None
    if answer.status.code == GRPC_OK:
        ok = answer.ok_response
        set_headers = tuple(
            (
                h.header.key.lower(),
                _value(h.header),
                h.append.value if h.HasField("append") else False,
            )
            for h in ok.headers
            if _settable(h.header.key)
        )
        return GrpcCheckResult(
            CheckResult(
                True,
                upstream_headers=tuple((n, v) for n, v, _ in set_headers),
                downstream_headers=tuple(
                    (h.header.key.lower(), _value(h.header))
                    for h in ok.response_headers_to_add
                    if _settable(h.header.key)
                ),
            ),
            remove_headers=tuple(n.lower() for n in ok.headers_to_remove if _settable(n)),
            set_headers=set_headers,
        )
    denied = answer.denied_response
    status = denied.status.code or DEFAULT_DENIED_STATUS
    if not 200 <= status <= 599:
        raise GrpcCallError(f"denied with HTTP status {status}")
    return GrpcCheckResult(
        CheckResult(
            False,
            status,
            denied.body.encode(),
            downstream_headers=tuple(
                (h.header.key.lower(), _value(h.header))
                for h in denied.headers
                if _settable(h.header.key)
            ),
        )
    )


def _value(header: base_pb2.HeaderValue) -> str:
    return header.value or header.raw_value.decode("latin-1")


def _settable(name: str) -> bool:
    lowered = name.lower()
    return bool(lowered) and not lowered.startswith(":") and lowered not in _PROTECTED


def with_grpc_headers(
    headers: list[tuple[str, str]], checked: GrpcCheckResult
) -> list[tuple[str, str]]:
    """The request headers after an allowing answer: removals first, then each header
    set (replacing the client's of that name) or, with `append`, added."""
    removed = set(checked.remove_headers)
    replaced = {n for n, _, append in checked.set_headers if not append}
    out = [(n, v) for n, v in headers if n not in removed and n not in replaced]
    out.extend((n, v) for n, v, _ in checked.set_headers)
    return out
