"""The headers a routed request leaves with, prepared in one pass. Pure.

What the outbound listener and gateways do to the client's headers before a request
goes upstream, in this order (each step sees the previous one's result):

1. hop-by-hop fields go (RFC 9110 §7.6.1, and whatever `Connection` nominates); an
   upgrade keeps `connection: upgrade` and its `upgrade` field;
2. the route's and destination's request header operations (`apply_request_header_ops`);
3. `host` becomes the route's authority;
4. the client's address is appended to `x-forwarded-for` (several fields merged into
   the first);
5. fields in `drop` go (our peer metadata, for a host outside the mesh);
6. `x-request-id` is kept when the client sent one, else a new uuid4 is appended.

Without header operations (most routes) steps 1 and 3-6 are one loop over the fields
and one new list; with them, the operations run on the stripped list first, so
they keep seeing (and may set) what they always did.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from proxy.http.headers import (
    FORWARDED_FOR,
    REQUEST_ID,
    Headers,
    hop_by_hop_names,
    strip_hop_by_hop,
    without_h2c,
)

HeaderEdit = Callable[[Headers], Headers]

_HOST = "host"


def upstream_request_headers(
    headers: Headers,
    *,
    upgrade: str | None,
    authority: str,
    client_ip: str,
    edit: HeaderEdit | None = None,
    drop: frozenset[str] = frozenset(),
) -> tuple[Headers, str]:
    """The request's headers as they go upstream, and its request id (steps above;
    `edit` is step 2, None when the route has no request header operations)."""
    upgrade = without_h2c(upgrade)  # never passed on (architecture §6, h2c smuggling)
    if edit is not None:
        headers = edit(strip_hop_by_hop(headers, upgrade))
        skip = drop | {_HOST}
        upgrade = None  # kept by `strip_hop_by_hop` already
    else:
        skip = hop_by_hop_names(headers) | drop | {_HOST}
    out: Headers = []
    chain: list[str] = []
    forwarded_at = -1
    request_id: str | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in skip:
            continue
        if lower == FORWARDED_FOR:
            if forwarded_at < 0:
                forwarded_at = len(out)
                out.append((FORWARDED_FOR, ""))
            chain.extend(hop.strip() for hop in value.split(",") if hop.strip())
            continue
        if lower == REQUEST_ID and request_id is None:
            request_id = value
        out.append((name, value))
    if upgrade:
        out += [("connection", "upgrade"), ("upgrade", upgrade)]
    out.append((_HOST, authority))
    chain.append(client_ip)
    if forwarded_at < 0:
        out.append((FORWARDED_FOR, ", ".join(chain)))
    else:
        out[forwarded_at] = (FORWARDED_FOR, ", ".join(chain))
    if request_id:
        return out, request_id
    if request_id is not None:  # sent empty: replaced
        out = [(n, v) for n, v in out if n.lower() != REQUEST_ID]
    request_id = str(uuid.uuid4())
    out.append((REQUEST_ID, request_id))
    return out, request_id
