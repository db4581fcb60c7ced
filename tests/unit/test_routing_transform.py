"""Rewrites, header operations and redirects (proxy.routing.transform)."""

from __future__ import annotations

import pytest

from mesh.compiled import (
    Destination,
    HeaderOps,
    Headers,
    HTTPMatch,
    HTTPRoute,
    Redirect,
    Rewrite,
    RouteTable,
    StringMatch,
    WeightedDestination,
)
from proxy.routing import (
    RequestAttrs,
    apply_header_ops,
    apply_request_header_ops,
    apply_response_header_ops,
    compile_routes,
    redirect_location,
    request_authority,
    rewrite_path,
    select_route,
)

HOST = "reviews.default.svc.cluster.local"


def sm(kind: str, value: str) -> StringMatch:
    return StringMatch(kind=kind, value=value)  # type: ignore[arg-type]


def rewriting(uri: str | None = None, authority: str | None = None) -> HTTPRoute:
    return HTTPRoute(
        route=(WeightedDestination(destination=Destination(host=HOST)),),
        rewrite=Rewrite(uri=uri, authority=authority),
    )


# ---------------------------------------------------------------- path rewrite


@pytest.mark.parametrize(
    ("match", "rewrite", "path", "expected"),
    [
        pytest.param(
            HTTPMatch(uri=sm("prefix", "/api/v1")),
            "/v2",
            "/api/v1/users?page=2",
            "/v2/users?page=2",
            id="prefix replaces the matched prefix, keeps query",
        ),
        pytest.param(
            HTTPMatch(uri=sm("prefix", "/ratings/")),
            "/",
            "/ratings/42",
            "/42",
            id="prefix to root",
        ),
        pytest.param(
            HTTPMatch(uri=sm("prefix", "/ratings")),
            "/v1/ratings",
            "/ratings",
            "/v1/ratings",
            id="prefix equal to whole path",
        ),
        pytest.param(
            HTTPMatch(uri=sm("prefix", "/API"), ignore_uri_case=True),
            "/v2",
            "/api/x",
            "/v2/x",
            id="case-insensitive prefix replaces the same length",
        ),
        pytest.param(
            HTTPMatch(uri=sm("exact", "/login")),
            "/auth/login",
            "/login?next=/home",
            "/auth/login?next=/home",
            id="exact replaces the whole path, keeps query",
        ),
        pytest.param(
            HTTPMatch(uri=sm("regex", "/v[0-9]+/.*")),
            "/latest",
            "/v3/items",
            "/latest",
            id="regex replaces the whole path",
        ),
        pytest.param(
            HTTPMatch(headers={"x": sm("exact", "1")}),
            "/new",
            "/old/path?q=1",
            "/new?q=1",
            id="non-uri match replaces the whole path",
        ),
        pytest.param(None, "/new", "/old", "/new", id="catch-all rule replaces the whole path"),
    ],
)
def test_rewrite_path(match: HTTPMatch | None, rewrite: str, path: str, expected: str) -> None:
    assert rewrite_path(rewriting(uri=rewrite), match, path) == expected


@pytest.mark.parametrize("route", [rewriting(), rewriting(uri=""), rewriting(authority="a")])
def test_no_uri_rewrite_keeps_path(route: HTTPRoute) -> None:
    assert rewrite_path(route, None, "/keep/me?x=1") == "/keep/me?x=1"
    no_rewrite = HTTPRoute(route=route.route)
    assert rewrite_path(no_rewrite, None, "/keep/me") == "/keep/me"


def test_rewrite_uses_the_match_select_route_reports() -> None:
    route = HTTPRoute(
        match=(HTTPMatch(uri=sm("exact", "/old")), HTTPMatch(uri=sm("prefix", "/legacy/"))),
        route=(WeightedDestination(destination=Destination(host=HOST)),),
        rewrite=Rewrite(uri="/new/"),
    )
    compiled = compile_routes(
        RouteTable(
            namespace="default",
            service="reviews",
            host=HOST,
            revision=1,
            http=(route,),
            has_virtual_service=True,
        )
    )
    for path, expected in (("/legacy/a/b?x=1", "/new/a/b?x=1"), ("/old", "/new/")):
        req = RequestAttrs(method="GET", scheme="http", authority="reviews", path=path)
        result = select_route(compiled, req)
        assert result is not None
        assert rewrite_path(result.route, result.match, path) == expected


# ---------------------------------------------------------------- authority


def with_host_ops(
    route_host: str = "", dest_host: str = "", rewrite: str = ""
) -> tuple[HTTPRoute, WeightedDestination]:
    dest = WeightedDestination(
        destination=Destination(host=HOST),
        headers=Headers(request=HeaderOps(set={"Host": dest_host} if dest_host else {})),
    )
    route = HTTPRoute(
        route=(dest,),
        rewrite=Rewrite(authority=rewrite) if rewrite else None,
        headers=Headers(request=HeaderOps(set={"host": route_host} if route_host else {})),
    )
    return route, dest


@pytest.mark.parametrize(
    ("route_host", "dest_host", "rewrite", "expected"),
    [
        ("", "", "", "reviews:9080"),
        ("", "", "api.internal", "api.internal"),
        ("route.internal", "", "", "route.internal"),
        ("", "dest.internal", "", "dest.internal"),
        ("route.internal", "dest.internal", "", "route.internal"),
        ("", "dest.internal", "api.internal", "api.internal"),
    ],
)
def test_request_authority(route_host: str, dest_host: str, rewrite: str, expected: str) -> None:
    route, dest = with_host_ops(route_host, dest_host, rewrite)
    assert request_authority(route, dest, "reviews:9080") == expected


def test_host_header_ops_become_an_authority_rewrite_not_a_second_host_header() -> None:
    route, dest = with_host_ops(route_host="route.internal")
    headers = [("Host", "reviews:9080"), ("accept", "*/*")]
    assert apply_request_header_ops(headers, route, dest) == headers


# ---------------------------------------------------------------- header operations

REQUEST = [
    ("Accept", "*/*"),
    ("X-Tag", "a"),
    ("x-tag", "b"),
    ("Cookie", "s=1"),
]


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        pytest.param(HeaderOps(), REQUEST, id="no ops"),
        pytest.param(
            HeaderOps(set={"x-tag": "c"}),
            [("Accept", "*/*"), ("Cookie", "s=1"), ("x-tag", "c")],
            id="set replaces every value, any case",
        ),
        pytest.param(
            HeaderOps(set={"x-new": "1"}),
            [*REQUEST, ("x-new", "1")],
            id="set adds a missing header",
        ),
        pytest.param(
            HeaderOps(add={"X-Tag": "c"}),
            [*REQUEST, ("X-Tag", "c")],
            id="add appends a value",
        ),
        pytest.param(
            HeaderOps(remove=("X-TAG", "cookie")),
            [("Accept", "*/*")],
            id="remove drops every value, any case",
        ),
        pytest.param(
            HeaderOps(set={"x-tag": "s"}, add={"x-tag": "a2"}),
            [("Accept", "*/*"), ("Cookie", "s=1"), ("x-tag", "s"), ("x-tag", "a2")],
            id="set then add",
        ),
        pytest.param(
            HeaderOps(set={"x-tag": "s"}, remove=("x-tag",)),
            [("Accept", "*/*"), ("Cookie", "s=1"), ("x-tag", "s")],
            id="remove happens before set",
        ),
        pytest.param(
            HeaderOps(remove=("absent",)),
            REQUEST,
            id="remove of a missing header",
        ),
        pytest.param(
            HeaderOps(set={":path": "/x", "host": "h"}, remove=("host",)),
            REQUEST,
            id="pseudo headers and host untouched",
        ),
    ],
)
def test_apply_header_ops(ops: HeaderOps, expected: list[tuple[str, str]]) -> None:
    before = list(REQUEST)
    assert apply_header_ops(REQUEST, ops) == expected
    assert before == REQUEST  # the caller's list is not modified


def layered(route_ops: HeaderOps, dest_ops: HeaderOps) -> tuple[HTTPRoute, WeightedDestination]:
    dest = WeightedDestination(
        destination=Destination(host=HOST), headers=Headers(request=dest_ops, response=dest_ops)
    )
    route = HTTPRoute(route=(dest,), headers=Headers(request=route_ops, response=route_ops))
    return route, dest


@pytest.mark.parametrize(
    ("route_ops", "dest_ops", "expected"),
    [
        pytest.param(
            HeaderOps(set={"x-env": "route"}),
            HeaderOps(set={"x-env": "dest"}),
            [("x-env", "route")],
            id="route-level set wins over destination-level set",
        ),
        pytest.param(
            HeaderOps(add={"x-via": "route"}),
            HeaderOps(add={"x-via": "dest"}),
            [("x-via", "dest"), ("x-via", "route")],
            id="destination-level adds come first",
        ),
        pytest.param(
            HeaderOps(remove=("x-via",)),
            HeaderOps(add={"x-via": "dest"}),
            [],
            id="route-level remove sees destination-level add",
        ),
        pytest.param(
            HeaderOps(add={"x-via": "route"}),
            HeaderOps(remove=("x-via",)),
            [("x-via", "route")],
            id="destination-level remove does not see route-level add",
        ),
    ],
)
def test_route_and_destination_ops_in_envoy_order(
    route_ops: HeaderOps, dest_ops: HeaderOps, expected: list[tuple[str, str]]
) -> None:
    route, dest = layered(route_ops, dest_ops)
    assert apply_request_header_ops([], route, dest) == expected
    assert apply_response_header_ops([], route, dest) == expected


def test_request_and_response_ops_are_separate() -> None:
    dest = WeightedDestination(destination=Destination(host=HOST))
    route = HTTPRoute(
        route=(dest,),
        headers=Headers(
            request=HeaderOps(set={"x-req": "1"}), response=HeaderOps(remove=("server",))
        ),
    )
    assert apply_request_header_ops([("server", "app")], route, dest) == [
        ("server", "app"),
        ("x-req", "1"),
    ]
    assert apply_response_header_ops([("Server", "app"), ("x", "y")], route, None) == [("x", "y")]


# ---------------------------------------------------------------- redirects


@pytest.mark.parametrize(
    ("redirect", "scheme", "authority", "path", "expected"),
    [
        pytest.param(
            Redirect(uri="/v1/bookinfo"),
            "http",
            "bookinfo.com",
            "/v1/getProductRatings?id=3",
            (301, "http://bookinfo.com/v1/bookinfo?id=3"),
            id="uri replaces the path, query kept, 301 default",
        ),
        pytest.param(
            Redirect(uri="/new?fresh=1"),
            "http",
            "a.com",
            "/old?stale=1",
            (301, "http://a.com/new?fresh=1"),
            id="uri with its own query replaces the query",
        ),
        pytest.param(
            Redirect(authority="newratings.default.svc.cluster.local"),
            "http",
            "ratings:9080",
            "/r",
            (301, "http://newratings.default.svc.cluster.local/r"),
            id="authority replaces host and port",
        ),
        pytest.param(
            Redirect(port=8443),
            "http",
            "a.com:8080",
            "/p",
            (301, "http://a.com:8443/p"),
            id="port replaces the port",
        ),
        pytest.param(
            Redirect(port=8443),
            "http",
            "a.com",
            "/p",
            (301, "http://a.com:8443/p"),
            id="port added",
        ),
        pytest.param(
            Redirect(scheme="https"),
            "http",
            "a.com:80",
            "/p?q",
            (301, "https://a.com/p?q"),
            id="scheme change drops the old default port",
        ),
        pytest.param(
            Redirect(scheme="https"),
            "http",
            "a.com:8080",
            "/p",
            (301, "https://a.com:8080/p"),
            id="scheme change keeps other ports",
        ),
        pytest.param(
            Redirect(scheme="https", authority="secure.a.com", port=8443, redirect_code=308),
            "http",
            "a.com",
            "/p",
            (308, "https://secure.a.com:8443/p"),
            id="everything at once with a code",
        ),
        pytest.param(
            Redirect(redirect_code=302),
            "https",
            "[::1]:8443",
            "/p",
            (302, "https://[::1]:8443/p"),
            id="nothing but the code",
        ),
    ],
)
def test_redirect_location(
    redirect: Redirect, scheme: str, authority: str, path: str, expected: tuple[int, str]
) -> None:
    assert redirect_location(redirect, scheme, authority, path) == expected
