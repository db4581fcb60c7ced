"""`upstream_request_headers`: the outbound request's headers prepared in one pass give
exactly what the step-by-step preparation gave (hop-by-hop removal, route header
operations, host, x-forwarded-for, peer metadata removal, request id), field for
field and in wire order."""

from __future__ import annotations

import re

import pytest

from mesh.compiled import Destination, HeaderOps, Headers, HTTPRoute, WeightedDestination
from proxy.http import append_forwarded_for, ensure_request_id, strip_hop_by_hop
from proxy.routing import apply_request_header_ops
from proxy.routing.upstream_headers import upstream_request_headers

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
PEER = "x-meshwork-peer"

REVIEWS = WeightedDestination(Destination("reviews"))
PLAIN_ROUTE = HTTPRoute(route=(REVIEWS,))
OPS_ROUTE = HTTPRoute(
    route=(REVIEWS,),
    headers=Headers(
        request=HeaderOps(
            set={"x-forwarded-for": "10.9.9.9", "x-env": "prod"},
            add={"connection": "close"},
            remove=("x-debug", "x-request-id"),
        )
    ),
)
DEST_OPS = WeightedDestination(
    Destination("reviews"), headers=Headers(request=HeaderOps(add={"x-canary": "1"}))
)


def step_by_step(
    headers: list[tuple[str, str]],
    upgrade: str | None,
    route: HTTPRoute,
    chosen: WeightedDestination,
    drop_peer: bool,
) -> tuple[list[tuple[str, str]], str]:
    """What `proxy.outbound` did before the one pass."""
    out = strip_hop_by_hop(headers, upgrade)
    out = apply_request_header_ops(out, route, chosen)
    out = [(n, v) for n, v in out if n != "host"]
    out.append(("host", "reviews:9080"))
    out = append_forwarded_for(out, "10.0.0.7")
    if drop_peer:
        out = [(n, v) for n, v in out if n != PEER]
    return ensure_request_id(out)


def one_pass(
    headers: list[tuple[str, str]],
    upgrade: str | None,
    route: HTTPRoute,
    chosen: WeightedDestination,
    drop_peer: bool,
) -> tuple[list[tuple[str, str]], str]:
    has_ops = route.headers.request != HeaderOps() or chosen.headers.request != HeaderOps()
    return upstream_request_headers(
        headers,
        upgrade=upgrade,
        authority="reviews:9080",
        client_ip="10.0.0.7",
        edit=(lambda h: apply_request_header_ops(h, route, chosen)) if has_ops else None,
        drop=frozenset({PEER}) if drop_peer else frozenset(),
    )


def without_new_id(
    result: tuple[list[tuple[str, str]], str],
) -> tuple[list[tuple[str, str]], str]:
    """A generated request id is random: compared by shape."""
    headers, request_id = result
    if UUID.match(request_id):
        assert headers[-1] == ("x-request-id", request_id)
        return [*headers[:-1], ("x-request-id", "<new>")], "<new>"
    return headers, request_id


REQUESTS = {
    "bare": [("host", "reviews"), ("accept", "*/*")],
    "keep-alive client": [
        ("host", "reviews"),
        ("connection", "keep-alive, x-hop"),
        ("keep-alive", "timeout=5"),
        ("x-hop", "1"),
        ("te", "trailers"),
        ("x-request-id", "abc"),
        ("accept", "*/*"),
    ],
    "forwarded twice": [
        ("x-forwarded-for", "1.1.1.1, 2.2.2.2"),
        ("host", "reviews"),
        ("x-forwarded-for", "3.3.3.3"),
        ("x-request-id", "r-1"),
        ("x-request-id", "r-2"),
    ],
    "empty request id": [("host", "reviews"), ("x-request-id", ""), ("x-request-id", "late")],
    "peer metadata and debug": [
        ("host", "reviews"),
        (PEER, "opaque"),
        ("x-debug", "1"),
        ("transfer-encoding", "chunked"),
    ],
    "upgrade": [
        ("host", "reviews"),
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-key", "k"),
    ],
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
@pytest.mark.parametrize(
    ("route", "chosen"),
    [(PLAIN_ROUTE, REVIEWS), (OPS_ROUTE, DEST_OPS), (PLAIN_ROUTE, DEST_OPS)],
    ids=["no-ops", "route-and-destination-ops", "destination-ops"],
)
@pytest.mark.parametrize("drop_peer", [False, True], ids=["mesh", "external"])
def test_one_pass_equals_the_steps(
    name: str, route: HTTPRoute, chosen: WeightedDestination, drop_peer: bool
) -> None:
    headers = REQUESTS[name]
    upgrade = "websocket" if name == "upgrade" else None
    before = list(headers)
    expected = without_new_id(step_by_step(headers, upgrade, route, chosen, drop_peer))
    assert without_new_id(one_pass(headers, upgrade, route, chosen, drop_peer)) == expected
    assert headers == before  # the client's list is not changed


def test_what_a_plain_request_leaves_with() -> None:
    headers, request_id = upstream_request_headers(
        [
            ("host", "reviews"),
            ("connection", "keep-alive"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-request-id", "abc"),
        ],
        upgrade=None,
        authority="reviews.default:9080",
        client_ip="127.0.0.1",
    )
    assert request_id == "abc"
    assert headers == [
        ("x-forwarded-for", "1.1.1.1, 127.0.0.1"),
        ("x-request-id", "abc"),
        ("host", "reviews.default:9080"),
    ]
