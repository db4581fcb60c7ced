"""What the data path hands the recorder: one NamedTuple per request or TCP connection.

The data path keeps one `Workload` per peer and reuses it: the recorder keys its
series by these tuples, so a request costs one tuple and one dict lookup.
"""

from __future__ import annotations

from typing import NamedTuple

from mesh.telemetry import Kind

UNKNOWN = "unknown"


class Workload(NamedTuple):
    """One side of a request. The data path keeps one per peer and reuses it: the
    recorder keys its series by these tuples."""

    name: str = UNKNOWN  # workload, e.g. "reviews-v2"
    namespace: str = UNKNOWN
    principal: str = UNKNOWN  # spiffe://<td>/ns/<ns>/sa/<sa>, from the peer certificate
    app: str = UNKNOWN
    version: str = UNKNOWN


class RequestRecord(NamedTuple):
    """One finished HTTP request, as one proxy saw it.

    `reporter` is "source" in the client's sidecar (outbound) and "destination" in the
    server's (inbound). `status` 0 means no response; `flags` are Envoy response flags
    ("-" for none, e.g. "UH", "UF", "NR"). `security_policy`: "mutual_tls", "none" or
    "unknown" (Istio reports "unknown" on the source side).
    """

    reporter: str
    source: Workload
    destination: Workload
    destination_service: str  # canonical host, e.g. "reviews.default.svc.cluster.local"
    method: str
    authority: str
    path: str
    status: int
    duration_ms: float
    request_bytes: int = 0
    response_bytes: int = 0
    flags: str = "-"
    upstream_host: str = ""
    request_id: str = ""
    trace_id: str = ""
    protocol: str = "http"
    security_policy: str = UNKNOWN
    # what dry-run AuthorizationPolicies would have decided: "allowed", "denied", or ""
    # when none applies; and the dry-run policy that decided (`ns/name`, "" if none)
    dry_run_result: str = ""
    dry_run_policy: str = ""
    # the answer's grpc-status ("" for non-gRPC answers): Istio's grpc_response_status
    grpc_status: str = ""
    start_ns: int = 0  # unix ns; 0 = now minus the duration (the last field)


class TcpRecord(NamedTuple):
    """The identity of one relayed TCP connection (bytes are passed separately)."""

    reporter: str
    source: Workload
    destination: Workload
    destination_service: str
    security_policy: str = UNKNOWN
    flags: str = "-"


class Outgoing(NamedTuple):
    """One encoded batch ready to publish; re-sent unchanged until acknowledged."""

    kind: Kind
    msg_id: str
    payload: bytes
    records: int


def workload_name(service: str, version: str = "") -> str:
    """Istio's `*_workload` for a Meshwork instance: `reviews-v2` (a Deployment's name
    there), or the bare service without a version. Both sides of a request must name
    a workload alike: the destination names itself, the source names the endpoint."""
    return f"{service}-{version}" if version else service


def split_service_host(host: str) -> tuple[str, str]:
    """`reviews.default.svc.cluster.local` -> ("reviews", "default"); other hosts (a
    ServiceEntry's `api.example.com`) have no service namespace."""
    if not host:
        return UNKNOWN, UNKNOWN
    parts = host.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        return parts[0], parts[1]
    return host, UNKNOWN
