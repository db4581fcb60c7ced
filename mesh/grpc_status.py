"""gRPC status codes by their canonical names (gRPC's `doc/statuscodes.md`).

Istio names a status this way (`fault.abort.grpcStatus: UNAVAILABLE`, the same table as
its `grpc.SupportedGRPCStatus`); the wire and the metrics carry the number
(`grpc-status: 14`, `grpc_response_status="14"`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

GRPC_STATUS_CODES: Mapping[str, int] = MappingProxyType(
    {
        "OK": 0,
        "CANCELLED": 1,
        "UNKNOWN": 2,
        "INVALID_ARGUMENT": 3,
        "DEADLINE_EXCEEDED": 4,
        "NOT_FOUND": 5,
        "ALREADY_EXISTS": 6,
        "PERMISSION_DENIED": 7,
        "RESOURCE_EXHAUSTED": 8,
        "FAILED_PRECONDITION": 9,
        "ABORTED": 10,
        "OUT_OF_RANGE": 11,
        "UNIMPLEMENTED": 12,
        "INTERNAL": 13,
        "UNAVAILABLE": 14,
        "DATA_LOSS": 15,
        "UNAUTHENTICATED": 16,
    }
)

GRPC_STATUS_NAMES: Mapping[int, str] = MappingProxyType(
    {code: name for name, code in GRPC_STATUS_CODES.items()}
)


def grpc_status_label(code: str) -> str:
    """`"14"` -> `"UNAVAILABLE"`; a number outside the table (or "unknown") as given."""
    if code.isascii() and code.isdigit():
        return GRPC_STATUS_NAMES.get(int(code), code)
    return code
