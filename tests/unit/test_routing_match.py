"""Route selection and weighted destination choice (proxy.routing.match / .pick)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.compiled import (
    Destination,
    GatewayConfig,
    HTTPMatch,
    HTTPRoute,
    RouteTable,
    StringMatch,
    VirtualHost,
    WeightedDestination,
)
from proxy.routing import (
    InvalidRouteConfig,
    NoDestinationError,
    RequestAttrs,
    compile_gateway,
    compile_routes,
    compile_virtual_hosts,
    pick_destination,
    select_route,
)

HOST = "reviews.default.svc.cluster.local"


def exact(value: str) -> StringMatch:
    return StringMatch(kind="exact", value=value)


def prefix(value: str) -> StringMatch:
    return StringMatch(kind="prefix", value=value)


def regex(value: str) -> StringMatch:
    return StringMatch(kind="regex", value=value)


def to(subset: str, weight: int = 100) -> WeightedDestination:
    return WeightedDestination(destination=Destination(host=HOST, subset=subset), weight=weight)


def rule(name: str, *matches: HTTPMatch) -> HTTPRoute:
    return HTTPRoute(name=name, match=matches, route=(to(name),))


def table(*routes: HTTPRoute) -> RouteTable:
    return RouteTable(
        namespace="default",
        service="reviews",
        host=HOST,
        revision=7,
        http=routes,
        has_virtual_service=bool(routes),
    )


def request(**overrides: Any) -> RequestAttrs:
    attrs: dict[str, Any] = {
        "method": "GET",
        "scheme": "http",
        "authority": "reviews:9080",
        "path": "/",
    }
    attrs.update(overrides)
    return RequestAttrs(**attrs)


MATCH_CASES = [
    # uri: exact / prefix / regex (RE2 semantics: the whole path must match)
    ("uri exact", HTTPMatch(uri=exact("/ratings")), {"path": "/ratings"}, True),
    ("uri exact is not prefix", HTTPMatch(uri=exact("/ratings")), {"path": "/ratings/1"}, False),
    ("uri exact ignores query", HTTPMatch(uri=exact("/ratings")), {"path": "/ratings?a=1"}, True),
    ("uri prefix", HTTPMatch(uri=prefix("/api/")), {"path": "/api/v1"}, True),
    ("uri prefix miss", HTTPMatch(uri=prefix("/api/")), {"path": "/apix"}, False),
    ("uri prefix not on query", HTTPMatch(uri=prefix("/a")), {"path": "/b?x=/a"}, False),
    ("uri regex", HTTPMatch(uri=regex(r"/v\d+/.*")), {"path": "/v2/users"}, True),
    ("uri regex is full match", HTTPMatch(uri=regex(r"/v\d+")), {"path": "/v2/users"}, False),
    ("uri regex not on query", HTTPMatch(uri=regex(r"/x")), {"path": "/x?y=1"}, True),
    ("uri case sensitive", HTTPMatch(uri=exact("/Ratings")), {"path": "/ratings"}, False),
    # ignoreUriCase: exact and prefix only; Istio leaves regexes case-sensitive
    (
        "ignoreUriCase exact",
        HTTPMatch(uri=exact("/Ratings"), ignore_uri_case=True),
        {"path": "/RATINGS"},
        True,
    ),
    (
        "ignoreUriCase prefix",
        HTTPMatch(uri=prefix("/API"), ignore_uri_case=True),
        {"path": "/api/v1"},
        True,
    ),
    (
        "ignoreUriCase not for regex",
        HTTPMatch(uri=regex("/api/.*"), ignore_uri_case=True),
        {"path": "/API/v1"},
        False,
    ),
    # headers: present and matching
    (
        "header exact",
        HTTPMatch(headers={"end-user": exact("jason")}),
        {"headers": {"end-user": "jason"}},
        True,
    ),
    (
        "header exact is case-sensitive on value",
        HTTPMatch(headers={"end-user": exact("jason")}),
        {"headers": {"end-user": "Jason"}},
        False,
    ),
    (
        "header missing",
        HTTPMatch(headers={"end-user": exact("jason")}),
        {"headers": {}},
        False,
    ),
    (
        "header prefix",
        HTTPMatch(headers={"user-agent": prefix("curl/")}),
        {"headers": {"user-agent": "curl/8.4"}},
        True,
    ),
    (
        "header regex full match",
        HTTPMatch(headers={"x-ver": regex("v[12]")}),
        {"headers": {"x-ver": "v12"}},
        False,
    ),
    (
        "header empty prefix means present",
        HTTPMatch(headers={"x-canary": prefix("")}),
        {"headers": {"x-canary": ""}},
        True,
    ),
    (
        "header name from config is case-insensitive",
        HTTPMatch(headers={"End-User": exact("jason")}),
        {"headers": {"end-user": "jason"}},
        True,
    ),
    (
        "header joined duplicates",
        HTTPMatch(headers={"x-tag": exact("a,b")}),
        {"headers": {"x-tag": "a,b"}},
        True,
    ),
    # withoutHeaders: matches when the header is absent or does not match
    (
        "withoutHeaders absent",
        HTTPMatch(without_headers={"x-debug": exact("1")}),
        {"headers": {}},
        True,
    ),
    (
        "withoutHeaders present and matching",
        HTTPMatch(without_headers={"x-debug": exact("1")}),
        {"headers": {"x-debug": "1"}},
        False,
    ),
    (
        "withoutHeaders present not matching",
        HTTPMatch(without_headers={"x-debug": exact("1")}),
        {"headers": {"x-debug": "0"}},
        True,
    ),
    (
        "withoutHeaders regex * means absent",
        HTTPMatch(without_headers={"x-debug": regex("*")}),
        {"headers": {"x-debug": "anything"}},
        False,
    ),
    (
        "withoutHeaders regex * absent",
        HTTPMatch(without_headers={"x-debug": regex("*")}),
        {"headers": {"other": "1"}},
        True,
    ),
    # queryParams: decoded value, first occurrence, present and matching
    (
        "query exact",
        HTTPMatch(query_params={"env": exact("qa")}),
        {"path": "/p?x=1&env=qa"},
        True,
    ),
    (
        "query exact miss",
        HTTPMatch(query_params={"env": exact("qa")}),
        {"path": "/p?env=prod"},
        False,
    ),
    ("query missing", HTTPMatch(query_params={"env": exact("qa")}), {"path": "/p"}, False),
    (
        "query prefix",
        HTTPMatch(query_params={"v": prefix("2.")}),
        {"path": "/p?v=2.1"},
        True,
    ),
    (
        "query regex",
        HTTPMatch(query_params={"id": regex("[0-9]+")}),
        {"path": "/p?id=42"},
        True,
    ),
    (
        "query value is percent-decoded",
        HTTPMatch(query_params={"next": exact("/home page")}),
        {"path": "/p?next=%2Fhome%20page"},
        True,
    ),
    (
        "query first occurrence wins",
        HTTPMatch(query_params={"env": exact("qa")}),
        {"path": "/p?env=prod&env=qa"},
        False,
    ),
    (
        "query flag without value",
        HTTPMatch(query_params={"debug": exact("")}),
        {"path": "/p?debug"},
        True,
    ),
    # method / scheme
    ("method", HTTPMatch(method=exact("POST")), {"method": "POST"}, True),
    ("method miss", HTTPMatch(method=exact("POST")), {"method": "GET"}, False),
    ("method regex", HTTPMatch(method=regex("GET|HEAD")), {"method": "HEAD"}, True),
    ("scheme", HTTPMatch(scheme=exact("https")), {"scheme": "https"}, True),
    ("scheme miss", HTTPMatch(scheme=exact("https")), {"scheme": "http"}, False),
    # authority: as sent, and without its port
    ("authority as sent", HTTPMatch(authority=exact("reviews:9080")), {}, True),
    ("authority without port", HTTPMatch(authority=exact("reviews")), {}, True),
    (
        "authority no port sent",
        HTTPMatch(authority=exact("reviews")),
        {"authority": "reviews"},
        True,
    ),
    (
        "authority other host",
        HTTPMatch(authority=exact("reviews")),
        {"authority": "ratings:9080"},
        False,
    ),
    (
        "authority port required",
        HTTPMatch(authority=exact("reviews:9080")),
        {"authority": "reviews"},
        False,
    ),
    (
        "authority prefix",
        HTTPMatch(authority=prefix("reviews.")),
        {"authority": "reviews.default:80"},
        True,
    ),
    (
        "authority ipv6 without port",
        HTTPMatch(authority=exact("[::1]")),
        {"authority": "[::1]:8080"},
        True,
    ),
    # caller's labels and namespace
    (
        "sourceLabels all present",
        HTTPMatch(source_labels={"app": "productpage", "version": "v1"}),
        {"source_labels": {"app": "productpage", "version": "v1", "extra": "x"}},
        True,
    ),
    (
        "sourceLabels one missing",
        HTTPMatch(source_labels={"app": "productpage", "version": "v1"}),
        {"source_labels": {"app": "productpage"}},
        False,
    ),
    (
        "sourceLabels value differs",
        HTTPMatch(source_labels={"version": "v1"}),
        {"source_labels": {"version": "v2"}},
        False,
    ),
    (
        "sourceNamespace",
        HTTPMatch(source_namespace="frontend"),
        {"source_namespace": "frontend"},
        True,
    ),
    (
        "sourceNamespace miss",
        HTTPMatch(source_namespace="frontend"),
        {"source_namespace": "default"},
        False,
    ),
    # destination port
    ("port", HTTPMatch(port=9080), {"port": 9080}, True),
    ("port miss", HTTPMatch(port=9080), {"port": 9081}, False),
    # gateways: only at the named gateways; `mesh` means sidecars
    (
        "gateway named, at it",
        HTTPMatch(gateways=("istio-system/ingress",)),
        {"gateway": "istio-system/ingress"},
        True,
    ),
    (
        "gateway named, in mesh",
        HTTPMatch(gateways=("istio-system/ingress",)),
        {"gateway": ""},
        False,
    ),
    (
        "gateway named, other gateway",
        HTTPMatch(gateways=("istio-system/ingress",)),
        {"gateway": "istio-system/egress"},
        False,
    ),
    (
        "gateway proxy that is several gateways",
        HTTPMatch(gateways=("istio-system/ingress",)),
        {"gateway": "istio-system/public,istio-system/ingress"},
        True,
    ),
    (
        "gateway proxy that is several other gateways",
        HTTPMatch(gateways=("istio-system/ingress",)),
        {"gateway": "istio-system/public,istio-system/egress"},
        False,
    ),
    ("gateway mesh, in mesh", HTTPMatch(gateways=("mesh",)), {"gateway": ""}, True),
    (
        "gateway mesh, at a gateway",
        HTTPMatch(gateways=("mesh",)),
        {"gateway": "istio-system/ingress"},
        False,
    ),
    (
        "gateway unset, at a gateway",
        HTTPMatch(uri=prefix("/")),
        {"gateway": "istio-system/ingress"},
        True,
    ),
    # all conditions of one HTTPMatch must hold
    (
        "AND: uri and header both hold",
        HTTPMatch(uri=prefix("/api"), headers={"end-user": exact("jason")}),
        {"path": "/api/x", "headers": {"end-user": "jason"}},
        True,
    ),
    (
        "AND: header fails",
        HTTPMatch(uri=prefix("/api"), headers={"end-user": exact("jason")}),
        {"path": "/api/x", "headers": {"end-user": "kim"}},
        False,
    ),
]


@pytest.mark.parametrize(
    ("match", "attrs", "expected"),
    [pytest.param(m, a, e, id=name) for name, m, a, e in MATCH_CASES],
)
def test_match_condition(match: HTTPMatch, attrs: dict[str, Any], expected: bool) -> None:
    compiled = compile_routes(table(rule("special", match), rule("fallback")))
    result = select_route(compiled, request(**attrs))
    assert result is not None
    assert result.route.name == ("special" if expected else "fallback")
    assert result.match is (match if expected else None)


def test_first_matching_rule_wins() -> None:
    compiled = compile_routes(
        table(
            rule("jason", HTTPMatch(headers={"end-user": exact("jason")})),
            rule("api", HTTPMatch(uri=prefix("/api"))),
            rule("catch-all"),
            rule("never", HTTPMatch(uri=prefix("/"))),
        )
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"path": "/api/x", "headers": {"end-user": "jason"}}, "jason"),
        ({"path": "/api/x"}, "api"),
        ({"path": "/other"}, "catch-all"),
    ]
    for attrs, expected in cases:
        result = select_route(compiled, request(**attrs))
        assert result is not None and result.route.name == expected


def test_matches_of_one_rule_are_ored_and_the_firing_one_is_reported() -> None:
    by_path = HTTPMatch(name="by-path", uri=exact("/login"))
    by_header = HTTPMatch(name="by-header", headers={"x-login": exact("1")})
    compiled = compile_routes(table(rule("login", by_path, by_header)))
    via_header = select_route(compiled, request(path="/x", headers={"x-login": "1"}))
    via_path = select_route(compiled, request(path="/login"))
    assert via_header is not None and via_header.match is by_header
    assert via_path is not None and via_path.match is by_path
    assert select_route(compiled, request(path="/x")) is None


def test_no_matching_rule_gives_none() -> None:
    compiled = compile_routes(table(rule("api", HTTPMatch(uri=prefix("/api")))))
    assert select_route(compiled, request(path="/static/app.js")) is None


def test_service_without_virtual_service_routes_everything_to_itself() -> None:
    compiled = compile_routes(table())
    result = select_route(compiled, request(path="/anything", method="DELETE"))
    assert result is not None
    assert [d.destination for d in result.route.route] == [Destination(host=HOST)]


def test_virtual_service_without_matching_http_rules_routes_nothing() -> None:
    bare = RouteTable(
        namespace="default", service="reviews", host=HOST, revision=1, has_virtual_service=True
    )
    assert select_route(compile_routes(bare), request()) is None


def test_compiled_table_keeps_revision() -> None:
    assert compile_routes(table(rule("a"))).revision == 7


@pytest.mark.parametrize(
    ("match", "field"),
    [
        (HTTPMatch(uri=regex("/(unclosed")), "http[1].match[0].uri.regex"),
        (HTTPMatch(headers={"x": regex("[z-a]")}), "http[1].match[0].headers.x.regex"),
        (HTTPMatch(query_params={"q": regex("*x")}), "http[1].match[0].queryParams.q.regex"),
    ],
)
def test_invalid_regex_rejects_the_table_naming_the_field(match: HTTPMatch, field: str) -> None:
    with pytest.raises(InvalidRouteConfig) as err:
        compile_routes(table(rule("ok"), rule("bad", match)))
    assert err.value.field == field
    assert field in str(err.value)


# ---------------------------------------------------------------- gateways


def gateway_routes() -> list[VirtualHost]:
    return [
        VirtualHost(hosts=("bookinfo.example.com",), http=(rule("bookinfo"),)),
        VirtualHost(hosts=("*.example.com",), http=(rule("wildcard"),)),
        VirtualHost(hosts=("*.api.example.com",), http=(rule("api-wildcard"),)),
        VirtualHost(hosts=(HOST,), http=(rule("reviews"),)),
        VirtualHost(hosts=("*",), http=(rule("any"),)),
    ]


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("bookinfo.example.com", "bookinfo"),
        ("bookinfo.example.com:8080", "bookinfo"),
        ("BookInfo.Example.com", "bookinfo"),
        ("shop.example.com", "wildcard"),
        ("v1.api.example.com", "api-wildcard"),
        ("example.com", "any"),
        ("reviews.default", "reviews"),
        ("reviews", "reviews"),
        (HOST + ":9080", "reviews"),
        ("unknown.org", "any"),
    ],
)
def test_gateway_picks_virtual_host_by_host(authority: str, expected: str) -> None:
    compiled = compile_virtual_hosts(gateway_routes(), namespace="default")
    result = select_route(compiled, request(authority=authority, gateway="default/ingress"))
    assert result is not None and result.route.name == expected


def test_published_gateway_config_compiles_with_its_namespace_and_revision() -> None:
    config = GatewayConfig(
        namespace="shop",
        name="shop/public",
        revision=12,
        virtual_hosts=(VirtualHost(hosts=("cart.shop.svc.cluster.local",), http=(rule("cart"),)),),
    )
    compiled = compile_gateway(config)
    assert compiled.revision == 12
    result = select_route(compiled, request(authority="cart", gateway="shop/public"))
    assert result is not None and result.route.name == "cart"


def test_gateway_without_catch_all_host_routes_unknown_hosts_nowhere() -> None:
    compiled = compile_virtual_hosts(gateway_routes()[:2], namespace="default")
    assert select_route(compiled, request(authority="unknown.org")) is None
    assert select_route(compile_virtual_hosts([], namespace="default"), request()) is None


def test_gateway_rule_matching_applies_within_the_virtual_host() -> None:
    vhost = VirtualHost(
        hosts=("shop.example.com",),
        http=(
            rule("ingress-only", HTTPMatch(gateways=("default/ingress",), uri=prefix("/a"))),
            rule("rest"),
        ),
    )
    compiled = compile_virtual_hosts([vhost], namespace="default")
    at_ingress = request(authority="shop.example.com", path="/a", gateway="default/ingress")
    at_other = request(authority="shop.example.com", path="/a", gateway="default/other")
    hit, miss = select_route(compiled, at_ingress), select_route(compiled, at_other)
    assert hit is not None and hit.route.name == "ingress-only"
    assert miss is not None and miss.route.name == "rest"


# ---------------------------------------------------------------- weighted destinations


def split(*weights: int) -> HTTPRoute:
    return HTTPRoute(route=tuple(to(f"v{i + 1}", w) for i, w in enumerate(weights)))


def test_weights_80_20_split_traffic_accordingly() -> None:
    rand = random.Random(20240601)
    route = split(80, 20)
    counts = Counter(
        pick_destination(route, rand.random()).destination.subset for _ in range(10_000)
    )
    assert set(counts) == {"v1", "v2"}
    assert abs(counts["v1"] / 10_000 - 0.8) < 0.02
    assert abs(counts["v2"] / 10_000 - 0.2) < 0.02


def test_three_way_split_covers_every_positive_destination() -> None:
    rand = random.Random(7)
    counts = Counter(
        pick_destination(split(50, 30, 20), rand.random()).destination.subset for _ in range(10_000)
    )
    for subset, share in (("v1", 0.5), ("v2", 0.3), ("v3", 0.2)):
        assert abs(counts[subset] / 10_000 - share) < 0.02


@given(rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_zero_weight_destination_is_never_picked(rand: float) -> None:
    assert pick_destination(split(0, 100, 0), rand).destination.subset == "v2"
    assert pick_destination(split(30, 0, 70), rand).destination.subset != "v2"


@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999999999])
def test_single_destination_always_gets_the_traffic(rand: float) -> None:
    assert pick_destination(split(0), rand).destination.subset == "v1"
    assert pick_destination(split(100), rand).destination.subset == "v1"


@pytest.mark.parametrize(
    ("rand", "expected"),
    [(0.0, "v1"), (0.7999, "v1"), (0.8, "v2"), (0.9999999999999999, "v2")],
)
def test_weight_boundaries(rand: float, expected: str) -> None:
    assert pick_destination(split(80, 20), rand).destination.subset == expected


def test_all_zero_weights_is_an_error_not_a_guess() -> None:
    with pytest.raises(NoDestinationError):
        pick_destination(split(0, 0), 0.3)
