"""Pure header logic shared by the listeners: no I/O, no state.

Header lists are `list[tuple[str, str]]` in wire order. Lists produced by the engine
have lower-case names; these helpers also accept mixed-case names from handlers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

Headers = list[tuple[str, str]]

# RFC 9110 §7.6.1: fields meaningful only for a single connection. `te` goes too, even
# `te: trailers`: each hop asks for trailers itself (the HTTP/2 client always does; an
# HTTP/1.1 client's `te: trailers` decides whether it gets them, `accepts_trailers`).
HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

REQUEST_ID = "x-request-id"
FORWARDED_FOR = "x-forwarded-for"


def get_header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The value of the first field called `name` (case-insensitive), or None."""
    wanted = name.lower()
    for field_name, value in headers:
        if field_name.lower() == wanted:
            return value
    return None


def header_map(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Name -> value, repeated fields joined with "," (RFC 9110 §5.3): what route
    matching and authorization look at."""
    out: dict[str, str] = {}
    for name, value in headers:
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


def connection_tokens(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The lower-case options listed in every `Connection` field."""
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(t.strip().lower() for t in value.split(","))
    tokens.discard("")
    return frozenset(tokens)


def accepts_trailers(headers: Iterable[tuple[str, str]]) -> bool:
    """The request's `TE` lists `trailers` (RFC 9110 §10.1.4): its sender takes trailer
    fields at the end of a chunked response."""
    for name, value in headers:
        if name.lower() == "te":
            for coding in value.split(","):
                if coding.split(";", 1)[0].strip().lower() == "trailers":
                    return True
    return False


def hop_by_hop_names(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """`HOP_BY_HOP` plus every field the message's `Connection` header nominates."""
    nominated = connection_tokens(headers)
    return HOP_BY_HOP | nominated if nominated else HOP_BY_HOP


def strip_hop_by_hop(headers: Iterable[tuple[str, str]], upgrade: str | None = None) -> Headers:
    """A copy of `headers` without hop-by-hop fields (RFC 9110 §7.6.1).

    `upgrade` is the request's valid Upgrade value (`Request.upgrade`): a proxy passing
    the upgrade on must ask the next hop for it too, so `Connection: upgrade` and that
    `Upgrade` field are kept (as the only connection options that are).
    """
    headers = list(headers)
    drop = hop_by_hop_names(headers)
    kept = [(name, value) for name, value in headers if name.lower() not in drop]
    upgrade = without_h2c(upgrade)
    if upgrade:
        kept += [("connection", "upgrade"), ("upgrade", upgrade)]
    return kept


def without_h2c(upgrade: str | None) -> str | None:
    """The Upgrade protocols to pass on, less `h2c` (RFC 7540 §3.2): an app switching
    to h2c would serve every later request of the connection unseen by the sidecars
    (h2c smuggling past per-request authorization); Envoy strips it too. None when
    nothing is left (the request then goes on as a plain one)."""
    if not upgrade or "h2c" not in upgrade.lower():
        return upgrade
    kept = [p.strip() for p in upgrade.split(",") if p.strip() and p.strip().lower() != "h2c"]
    return ", ".join(kept) or None


def append_forwarded_for(headers: Iterable[tuple[str, str]], client_ip: str) -> Headers:
    """A copy with `client_ip` appended to X-Forwarded-For.

    Several X-Forwarded-For lines form one list (RFC 9110 §5.3); they are merged into
    a single field at the position of the first, so the upstream sees the whole chain.
    """
    result: Headers = []
    chain: list[str] = []
    position = -1
    for name, value in headers:
        if name.lower() == FORWARDED_FOR:
            if position < 0:
                position = len(result)
                result.append((FORWARDED_FOR, ""))
            chain.extend(hop.strip() for hop in value.split(",") if hop.strip())
        else:
            result.append((name, value))
    chain.append(client_ip)
    if position < 0:
        result.append((FORWARDED_FOR, ", ".join(chain)))
    else:
        result[position] = (FORWARDED_FOR, ", ".join(chain))
    return result


def ensure_request_id(headers: Headers) -> tuple[Headers, str]:
    """The request id the client sent, or a new uuid4 appended as X-Request-Id.

    When the id is present, `headers` is returned as is (no copy).
    """
    existing = get_header(headers, REQUEST_ID)
    if existing:
        return headers, existing
    request_id = str(uuid.uuid4())
    result = [(name, value) for name, value in headers if name.lower() != REQUEST_ID]
    result.append((REQUEST_ID, request_id))
    return result, request_id
