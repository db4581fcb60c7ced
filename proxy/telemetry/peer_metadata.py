"""Peer metadata: how the data path learns the other side's workload.

The source proxy sends `PEER_METADATA_HEADER` about its own workload; the destination
proxy decodes it (and strips it before the app). The header is informational: the
peer's *principal* must come from its mTLS certificate, never from that header.
"""

from __future__ import annotations

from .records import UNKNOWN, Workload

PEER_METADATA_HEADER = "x-meshwork-peer"


def encode_peer_metadata(w: Workload) -> str:
    """The value of `PEER_METADATA_HEADER` a proxy sends about its own workload."""
    return f"workload={w.name};namespace={w.namespace};app={w.app};version={w.version}"


def decode_peer_metadata(value: str | None, principal: str = UNKNOWN) -> Workload:
    """The peer's workload from its metadata header; `principal` comes from its
    certificate (the header is informational only, never an identity)."""
    fields: dict[str, str] = {}
    for part in (value or "").split(";"):
        k, sep, v = part.partition("=")
        if sep and v.strip():
            fields[k.strip()] = v.strip()[:253]
    return Workload(
        name=fields.get("workload", UNKNOWN),
        namespace=fields.get("namespace", UNKNOWN),
        principal=principal or UNKNOWN,
        app=fields.get("app", UNKNOWN),
        version=fields.get("version", UNKNOWN),
    )
