"""The compiler: which rules, subsets and gateway hosts a proxy ends up with."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from mesh.compiled import (
    ConnectionPool,
    ConsistentHash,
    Destination,
    DirectResponse,
    FaultAbort,
    FaultDelay,
    FaultInjection,
    GatewayConfig,
    GatewayServer,
    HeaderOps,
    Headers,
    HTTPCookie,
    HTTPMatch,
    HTTPRoute,
    LoadBalancer,
    Mirror,
    OutlierDetection,
    Redirect,
    RetryPolicy,
    Rewrite,
    RouteTable,
    StringMatch,
    Subset,
    TrafficPolicy,
    VirtualHost,
    WeightedDestination,
)
from mesh.hosts import ServiceRef
from mesh.resources import Resource, load_yaml, parse_resource
from services.config.compile import compile_gateway_config, compile_route_table, services_named
from tests.unit.test_resources import (
    BOOKINFO_GATEWAY,
    DESTINATION_RULE_ALL,
    REVIEWS_50_V3,
    REVIEWS_TEST_V2,
    VIRTUAL_SERVICE_ALL_V1,
)

REVIEWS = ServiceRef("default", "reviews")
REVIEWS_FQDN = "reviews.default.svc.cluster.local"
INGRESS_LABELS = {"istio": "ingressgateway", "app": "istio-ingressgateway"}


def parse(text: str, namespace: str = "default") -> list[Resource]:
    return [
        parse_resource(doc, source="-", index=i, default_namespace=namespace)
        for i, doc in enumerate(load_yaml(text, "-"))
    ]


def resource(kind: str, name: str, namespace: str, spec: dict[str, Any]) -> Resource:
    body = {
        "apiVersion": "networking.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    return parse_resource(body, source="-", index=0)


def vs(name: str, namespace: str = "default", **spec: Any) -> Resource:
    return resource("VirtualService", name, namespace, spec)


def dr(name: str, namespace: str = "default", **spec: Any) -> Resource:
    return resource("DestinationRule", name, namespace, spec)


def to(host: str, subset: str = "", **extra: Any) -> dict[str, Any]:
    destination: dict[str, Any] = {"host": host}
    if subset:
        destination["subset"] = subset
    return {"destination": destination, **extra}


def subset_of(table: RouteTable | GatewayConfig, rule: int = 0) -> list[tuple[str, str, int]]:
    http = table.http if isinstance(table, RouteTable) else table.virtual_hosts[0].http
    return [(d.destination.host, d.destination.subset, d.weight) for d in http[rule].route]


def version_subsets(*versions: str) -> tuple[Subset, ...]:
    return tuple(Subset(name=v, labels={"version": v}) for v in versions)


# ---------------------------------------------------------------- bookinfo


def test_all_v1_sends_reviews_to_v1_with_the_destination_rule_subsets() -> None:
    resources = parse(VIRTUAL_SERVICE_ALL_V1) + parse(DESTINATION_RULE_ALL)
    table = compile_route_table(resources, REVIEWS, revision=7)
    assert table == RouteTable(
        namespace="default",
        service="reviews",
        host=REVIEWS_FQDN,
        revision=7,
        http=(
            HTTPRoute(
                route=(
                    WeightedDestination(destination=Destination(host=REVIEWS_FQDN, subset="v1")),
                ),
                origin="VirtualService/default/reviews",
            ),
        ),
        subsets=version_subsets("v1", "v2", "v3"),
        has_virtual_service=True,
    )


def test_reviews_test_v2_sends_jason_to_v2_and_everyone_else_to_v1() -> None:
    table = compile_route_table(parse(REVIEWS_TEST_V2), REVIEWS, revision=1)
    assert table.http[0].match == (
        HTTPMatch(headers={"end-user": StringMatch(kind="exact", value="jason")}),
    )
    assert subset_of(table, 0) == [(REVIEWS_FQDN, "v2", 100)]
    assert table.http[1].match == ()
    assert subset_of(table, 1) == [(REVIEWS_FQDN, "v1", 100)]


def test_reviews_50_v3_splits_traffic() -> None:
    table = compile_route_table(parse(REVIEWS_50_V3), REVIEWS, revision=1)
    assert subset_of(table) == [(REVIEWS_FQDN, "v1", 50), (REVIEWS_FQDN, "v3", 50)]


def test_ratings_subsets_come_from_its_own_destination_rule() -> None:
    table = compile_route_table(parse(DESTINATION_RULE_ALL), ServiceRef("default", "ratings"), 3)
    assert table.subsets == version_subsets("v1", "v2", "v2-mysql", "v2-mysql-vm")
    # no VirtualService for ratings: default route, no 404 for unmatched requests
    assert (table.http, table.has_virtual_service) == ((), False)


def test_bookinfo_gateway_routes_the_public_paths_to_productpage() -> None:
    config = compile_gateway_config(parse(BOOKINFO_GATEWAY), "istio-system", INGRESS_LABELS, 9)
    uris = [
        StringMatch(kind="exact", value="/productpage"),
        StringMatch(kind="prefix", value="/static"),
        StringMatch(kind="exact", value="/login"),
        StringMatch(kind="exact", value="/logout"),
        StringMatch(kind="prefix", value="/api/v1/products"),
    ]
    productpage = Destination(host="productpage.default.svc.cluster.local", port=9080)
    assert config == GatewayConfig(
        namespace="istio-system",
        name="default/bookinfo-gateway",
        revision=9,
        selector={"istio": "ingressgateway"},
        servers=(GatewayServer(port=8080, protocol="HTTP", hosts=("*",)),),
        virtual_hosts=(
            VirtualHost(
                hosts=("*",),
                http=(
                    HTTPRoute(
                        match=tuple(HTTPMatch(uri=u) for u in uris),
                        route=(WeightedDestination(destination=productpage),),
                        origin="VirtualService/default/bookinfo",
                    ),
                ),
            ),
        ),
    )


def test_gateway_bound_virtual_service_does_not_reach_sidecars() -> None:
    table = compile_route_table(
        parse(BOOKINFO_GATEWAY), ServiceRef("default", "productpage"), revision=1
    )
    assert (table.http, table.has_virtual_service) == ((), False)


# ---------------------------------------------------------------- host resolution


@pytest.mark.parametrize(
    ("vs_namespace", "host", "applies"),
    [
        ("default", "reviews", True),
        ("default", "reviews.default", True),
        ("default", "reviews.default.svc", True),
        ("default", "reviews.default.svc.cluster.local", True),
        ("default", "Reviews.Default.svc.cluster.local", True),
        ("default", "*.default.svc.cluster.local", True),
        ("default", "*.svc.cluster.local", True),
        ("prod", "reviews", False),  # names prod/reviews
        ("prod", "reviews.default", True),
        ("prod", "reviews.default.svc.cluster.local", True),
        ("default", "ratings", False),
        ("default", "reviews.example.com", False),
    ],
)
def test_virtual_service_host_resolution(vs_namespace: str, host: str, applies: bool) -> None:
    resources = [vs("r", vs_namespace, hosts=[host], http=[{"route": [to("reviews.default")]}])]
    table = compile_route_table(resources, REVIEWS, revision=1)
    assert table.has_virtual_service is applies


@pytest.mark.parametrize(
    ("destination", "canonical"),
    [
        ("reviews", "reviews.prod.svc.cluster.local"),
        ("reviews.default", "reviews.default.svc.cluster.local"),
        ("reviews.default.svc.cluster.local", "reviews.default.svc.cluster.local"),
        ("api.example.com", "api.example.com"),
    ],
)
def test_route_destinations_resolve_in_the_virtual_service_namespace(
    destination: str, canonical: str
) -> None:
    resources = [vs("r", "prod", hosts=["reviews.default"], http=[{"route": [to(destination)]}])]
    table = compile_route_table(resources, REVIEWS, revision=1)
    assert subset_of(table) == [(canonical, "", 100)]


# ---------------------------------------------------------------- gateways on matches


def test_matches_limited_to_gateways_do_not_apply_to_sidecars() -> None:
    resources = [
        vs(
            "r",
            hosts=["reviews"],
            gateways=["mesh", "ingress"],
            http=[
                {
                    "name": "ingress-only",
                    "match": [{"uri": {"prefix": "/admin"}, "gateways": ["ingress"]}],
                    "route": [to("reviews", "v3")],
                },
                {
                    "name": "mixed",
                    "match": [
                        {"uri": {"prefix": "/a"}, "gateways": ["ingress"]},
                        {"uri": {"prefix": "/b"}, "gateways": ["mesh"]},
                    ],
                    "route": [to("reviews", "v2")],
                },
                {"name": "default", "route": [to("reviews", "v1")]},
            ],
        )
    ]
    table = compile_route_table(resources, REVIEWS, revision=1)
    assert [r.name for r in table.http] == ["mixed", "default"]
    assert table.http[0].match == (
        HTTPMatch(uri=StringMatch(kind="prefix", value="/b"), gateways=("mesh",)),
    )

    ingress = resource(
        "Gateway",
        "ingress",
        "default",
        {
            "selector": {"istio": "ingressgateway"},
            "servers": [{"port": {"number": 80, "name": "http"}, "hosts": ["*"]}],
        },
    )
    config = compile_gateway_config([ingress, *resources], "default", INGRESS_LABELS, 1)
    (vhost,) = config.virtual_hosts
    assert [r.name for r in vhost.http] == ["ingress-only", "mixed", "default"]
    assert vhost.http[1].match == (
        HTTPMatch(uri=StringMatch(kind="prefix", value="/a"), gateways=("default/ingress",)),
    )


# ---------------------------------------------------------------- several resources


def test_several_virtual_services_contribute_oldest_first() -> None:
    older = vs(
        "canary",
        hosts=["reviews"],
        http=[
            {"match": [{"headers": {"x-canary": {"exact": "1"}}}], "route": [to("reviews", "v3")]}
        ],
    )
    newer = vs(
        "base", hosts=["reviews.default.svc.cluster.local"], http=[{"route": [to("reviews", "v1")]}]
    )
    for resources, origins in [
        ([older, newer], ["VirtualService/default/canary", "VirtualService/default/base"]),
        ([newer, older], ["VirtualService/default/base", "VirtualService/default/canary"]),
    ]:
        table = compile_route_table(resources, REVIEWS, revision=1)
        assert [r.origin for r in table.http] == origins


@pytest.mark.parametrize(
    ("rules", "chosen"),
    [
        # the service's own namespace wins over an older rule elsewhere
        ([("other", "reviews.default", "a"), ("default", "reviews", "b")], "b"),
        # an exact host wins over a wildcard in the same namespace
        ([("default", "*.default.svc.cluster.local", "a"), ("default", "reviews", "b")], "b"),
        # a narrower wildcard wins over a wider one
        (
            [
                ("default", "*.svc.cluster.local", "a"),
                ("default", "*.default.svc.cluster.local", "b"),
            ],
            "b",
        ),
        # otherwise the oldest
        ([("default", "reviews", "a"), ("default", "reviews.default", "b")], "a"),
        # a rule for another namespace's reviews does not apply
        ([("prod", "reviews", "a")], None),
    ],
)
def test_destination_rule_choice(rules: list[tuple[str, str, str]], chosen: str | None) -> None:
    resources = [
        dr(f"dr-{subset}", ns, host=host, subsets=[{"name": subset}]) for ns, host, subset in rules
    ]
    table = compile_route_table(resources, REVIEWS, revision=1)
    assert [s.name for s in table.subsets] == ([chosen] if chosen else [])


def test_subset_policy_overrides_the_destination_policy() -> None:
    resources = [
        dr(
            "reviews",
            host="reviews",
            trafficPolicy={"loadBalancer": {"simple": "LEAST_CONN"}},
            subsets=[
                {"name": "v1", "labels": {"version": "v1"}},
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "trafficPolicy": {
                        "loadBalancer": {
                            "consistentHash": {
                                "httpCookie": {"name": "user", "path": "/", "ttl": "1h"}
                            }
                        }
                    },
                },
                {"name": "v3", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}},
            ],
        )
    ]
    table = compile_route_table(resources, REVIEWS, revision=1)
    least = TrafficPolicy(load_balancer=LoadBalancer(simple="LEAST_REQUEST"))
    assert table.traffic_policy == least
    assert [s.traffic_policy for s in table.subsets] == [
        least,
        TrafficPolicy(
            load_balancer=LoadBalancer(
                consistent_hash=ConsistentHash(
                    http_cookie=HTTPCookie(name="user", path="/", ttl_ms=3_600_000)
                )
            )
        ),
        TrafficPolicy(load_balancer=LoadBalancer(simple="RANDOM")),
    ]


@pytest.mark.parametrize(
    ("consistent_hash", "expected"),
    [
        ({"httpHeaderName": "X-User"}, ConsistentHash(http_header_name="x-user")),
        (
            {"useSourceIp": True, "minimumRingSize": 64},
            ConsistentHash(use_source_ip=True, minimum_ring_size=64),
        ),
        ({"httpQueryParameterName": "user"}, ConsistentHash(http_query_parameter_name="user")),
    ],
)
def test_consistent_hash_keys(consistent_hash: dict[str, Any], expected: ConsistentHash) -> None:
    resources = [
        dr("r", host="reviews", trafficPolicy={"loadBalancer": {"consistentHash": consistent_hash}})
    ]
    table = compile_route_table(resources, REVIEWS, revision=1)
    assert table.traffic_policy.load_balancer.consistent_hash == expected


# ---------------------------------------------------------------- rule contents


def test_rule_actions_timeouts_and_headers() -> None:
    resources = [
        vs(
            "r",
            hosts=["reviews"],
            http=[
                {
                    "match": [
                        {
                            "uri": {"regex": "/api/v[0-9]+/.*"},
                            "method": {"exact": "GET"},
                            "withoutHeaders": {"X-Debug": {"exact": "1"}},
                            "queryParams": {"Debug": {"exact": "1"}},
                            "ignoreUriCase": True,
                            "sourceLabels": {"app": "productpage"},
                            "sourceNamespace": "default",
                            "port": 9080,
                        }
                    ],
                    "route": [
                        to("reviews", "v2", headers={"request": {"set": {"X-Subset": "v2"}}})
                    ],
                    "rewrite": {"uri": "/v2/"},
                    "timeout": "1.5s",
                    "headers": {
                        "request": {"add": {"X-Via": "mesh"}, "remove": ["X-Secret"]},
                        "response": {"set": {"Cache-Control": "no-store"}},
                    },
                },
                {"match": [{"uri": {"exact": "/old"}}], "redirect": {"uri": "/new"}},
                {
                    "match": [{"uri": {"exact": "/moved"}}],
                    "redirect": {
                        "authority": "b.example.com",
                        "port": 8443,
                        "scheme": "HTTPS",
                        "redirectCode": 307,
                    },
                },
                {"directResponse": {"status": 503, "body": {"string": "maintenance"}}},
            ],
        )
    ]
    api, old, moved, maintenance = compile_route_table(resources, REVIEWS, revision=1).http
    assert api.match == (
        HTTPMatch(
            uri=StringMatch(kind="regex", value="/api/v[0-9]+/.*"),
            method=StringMatch(kind="exact", value="GET"),
            without_headers={"x-debug": StringMatch(kind="exact", value="1")},
            query_params={"Debug": StringMatch(kind="exact", value="1")},
            ignore_uri_case=True,
            source_labels={"app": "productpage"},
            source_namespace="default",
            port=9080,
        ),
    )
    assert api.route[0].headers == Headers(request=HeaderOps(set={"x-subset": "v2"}))
    assert (api.rewrite, api.timeout_ms) == (Rewrite(uri="/v2/"), 1500)
    assert api.headers == Headers(
        request=HeaderOps(add={"x-via": "mesh"}, remove=("x-secret",)),
        response=HeaderOps(set={"cache-control": "no-store"}),
    )
    assert old.redirect == Redirect(uri="/new", redirect_code=301)
    assert moved.redirect == Redirect(
        authority="b.example.com", port=8443, scheme="https", redirect_code=307
    )
    assert maintenance.direct_response == DirectResponse(status=503, body="maintenance")
    assert (maintenance.route, maintenance.timeout_ms) == ((), 0)


# ---------------------------------------------------------------- gateway selection and hosts


def gateway(
    name: str, namespace: str, selector: dict[str, str], *servers: tuple[int, list[str]]
) -> Resource:
    spec = {
        "selector": selector,
        "servers": [
            {"port": {"number": port, "name": "http", "protocol": "http"}, "hosts": hosts}
            for port, hosts in servers
        ],
    }
    return resource("Gateway", name, namespace, spec)


def test_gateway_selection_by_labels() -> None:
    public = gateway("public", "istio-system", {"istio": "ingressgateway"}, (80, ["*"]))
    internal = gateway(
        "internal", "istio-system", {"istio": "internal"}, (8080, ["*.corp.example.com"])
    )
    everything = gateway("all", "edge", {}, (9090, ["status.example.com"]))
    resources = [public, internal, everything]

    config = compile_gateway_config(resources, "istio-system", INGRESS_LABELS, 4)
    assert config.name == "istio-system/public,edge/all"
    assert config.servers == (
        GatewayServer(port=80, protocol="HTTP", hosts=("*",)),
        GatewayServer(port=9090, protocol="HTTP", hosts=("status.example.com",)),
    )
    assert config.selector == {"istio": "ingressgateway"}

    nothing = compile_gateway_config([public, internal], "default", {"app": "reviews"}, 4)
    assert (nothing.name, nothing.servers, nothing.virtual_hosts) == ("", (), ())


@pytest.mark.parametrize(
    ("ref", "vs_namespace", "binds"),
    [
        ("ingress", "istio-system", True),
        ("istio-system/ingress", "default", True),
        ("ingress", "default", False),  # names default/ingress
        ("mesh", "istio-system", False),
    ],
)
def test_virtual_service_gateway_reference(ref: str, vs_namespace: str, binds: bool) -> None:
    ingress = gateway("ingress", "istio-system", {"istio": "ingressgateway"}, (80, ["*"]))
    bound = vs(
        "site",
        vs_namespace,
        hosts=["site.example.com"],
        gateways=[ref],
        http=[{"route": [to("web")]}],
    )
    config = compile_gateway_config([ingress, bound], "istio-system", INGRESS_LABELS, 1)
    assert [v.hosts for v in config.virtual_hosts] == ([("site.example.com",)] if binds else [])


@pytest.mark.parametrize(
    ("server_hosts", "vs_hosts", "expected"),
    [
        (["*"], ["*"], ("*",)),
        (["*"], ["bookinfo.example.com", "reviews"], ("bookinfo.example.com", REVIEWS_FQDN)),
        (["bookinfo.example.com"], ["*"], ("bookinfo.example.com",)),
        (["*.example.com"], ["bookinfo.example.com", "other.org"], ("bookinfo.example.com",)),
        (["*.example.com"], ["*.shop.example.com"], ("*.shop.example.com",)),
        (["reviews"], ["reviews.default.svc.cluster.local"], (REVIEWS_FQDN,)),
        (["bookinfo.example.com"], ["other.org"], None),
    ],
)
def test_gateway_exposes_only_its_own_hosts(
    server_hosts: list[str], vs_hosts: list[str], expected: tuple[str, ...] | None
) -> None:
    ingress = gateway("ingress", "default", {"istio": "ingressgateway"}, (80, server_hosts))
    bound = vs("site", hosts=vs_hosts, gateways=["ingress"], http=[{"route": [to("productpage")]}])
    config = compile_gateway_config([ingress, bound], "default", INGRESS_LABELS, 1)
    assert [v.hosts for v in config.virtual_hosts] == ([expected] if expected else [])


def test_virtual_services_with_the_same_hosts_merge_into_one_virtual_host() -> None:
    ingress = gateway("ingress", "default", {"istio": "ingressgateway"}, (80, ["*"]))
    api = vs(
        "api",
        hosts=["shop.example.com"],
        gateways=["ingress"],
        http=[{"match": [{"uri": {"prefix": "/api"}}], "route": [to("api")]}],
    )
    web = vs("web", hosts=["shop.example.com"], gateways=["ingress"], http=[{"route": [to("web")]}])
    admin = vs(
        "admin", hosts=["admin.example.com"], gateways=["ingress"], http=[{"route": [to("admin")]}]
    )
    config = compile_gateway_config([ingress, api, admin, web], "default", INGRESS_LABELS, 1)
    assert [(v.hosts, [r.origin for r in v.http]) for v in config.virtual_hosts] == [
        (("shop.example.com",), ["VirtualService/default/api", "VirtualService/default/web"]),
        (("admin.example.com",), ["VirtualService/default/admin"]),
    ]


# ---------------------------------------------------------------- discovery and determinism


def test_services_named_lists_every_mesh_service_mentioned() -> None:
    resources = [
        *parse(BOOKINFO_GATEWAY),
        vs(
            "r",
            "prod",
            hosts=["reviews", "*.prod.svc.cluster.local"],
            http=[{"route": [to("reviews", weight=90), to("ratings.default", weight=10)]}],
        ),
        vs(
            "ext",
            hosts=["api.example.com"],
            gateways=["bookinfo-gateway"],
            http=[{"route": [to("details")]}],
        ),
        dr("d", "prod", host="details.default.svc.cluster.local"),
        dr("wild", host="*.default.svc.cluster.local"),
    ]
    assert services_named(resources) == {
        ServiceRef("default", "productpage"),
        ServiceRef("prod", "reviews"),
        ServiceRef("default", "ratings"),
        ServiceRef("default", "details"),
    }


def test_compiled_tables_are_deterministic_and_survive_the_wire() -> None:
    resources = parse(VIRTUAL_SERVICE_ALL_V1) + parse(
        REVIEWS_TEST_V2.replace("name: reviews", "name: t", 1)
    )
    resources += parse(DESTINATION_RULE_ALL) + parse(BOOKINFO_GATEWAY)
    table = compile_route_table(resources, REVIEWS, revision=5)
    assert table == compile_route_table(list(resources), REVIEWS, revision=5)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(table), type=RouteTable) == table
    config = compile_gateway_config(resources, "default", INGRESS_LABELS, 5)
    assert config == compile_gateway_config(list(resources), "default", dict(INGRESS_LABELS), 5)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(config), type=GatewayConfig) == config


# ---------------------------------------------------------------- resilience (issue 6)


def route_rule(**fields: Any) -> dict[str, Any]:
    return {"route": [to("reviews")], **fields}


def only_rule(**fields: Any) -> HTTPRoute:
    table = compile_route_table(
        [vs("reviews", hosts=["reviews"], http=[route_rule(**fields)])], REVIEWS, revision=1
    )
    return table.http[0]


@pytest.mark.parametrize(
    ("retries", "expected"),
    [
        # no `retries`: None, the proxy applies Istio's default policy
        (None, None),
        # attempts absent or 0: retries disabled
        ({}, RetryPolicy(attempts=0)),
        ({"attempts": 0}, RetryPolicy(attempts=0)),
        # attempts alone keep Istio's default conditions and 503
        ({"attempts": 5}, RetryPolicy(attempts=5)),
        (
            {"attempts": 3, "perTryTimeout": "2s", "retryOn": "gateway-error,connect-failure"},
            RetryPolicy(
                attempts=3,
                per_try_timeout_ms=2000,
                retry_on=("gateway-error", "connect-failure"),
                retriable_status_codes=(),
            ),
        ),
        # numeric codes become retriable_status_codes and add retriable-status-codes
        (
            {"attempts": 2, "retryOn": "5xx,429,503"},
            RetryPolicy(
                attempts=2,
                retry_on=("5xx", "retriable-status-codes"),
                retriable_status_codes=(429, 503),
            ),
        ),
        (
            {"attempts": 2, "retryOn": "retriable-status-codes,409"},
            RetryPolicy(
                attempts=2, retry_on=("retriable-status-codes",), retriable_status_codes=(409,)
            ),
        ),
        (
            {"attempts": 1, "retryIgnorePreviousHosts": False, "backoff": "100ms"},
            RetryPolicy(attempts=1, ignore_previous_hosts=False, backoff_base_ms=100),
        ),
    ],
)
def test_retries(retries: dict[str, Any] | None, expected: RetryPolicy | None) -> None:
    fields = {} if retries is None else {"retries": retries}
    assert only_rule(**fields).retries == expected


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (
            {"delay": {"fixedDelay": "7s", "percentage": {"value": 100}}},
            FaultInjection(delay=FaultDelay(fixed_delay_ms=7000, percentage=100.0)),
        ),
        # the deprecated integer percent is used when percentage is absent
        (
            {"delay": {"fixedDelay": "500ms", "percent": 25}},
            FaultInjection(delay=FaultDelay(fixed_delay_ms=500, percentage=25.0)),
        ),
        # Istio: no percentage, no request affected
        (
            {"abort": {"httpStatus": 503}},
            FaultInjection(abort=FaultAbort(http_status=503, percentage=0.0)),
        ),
        # a gRPC status abort is HTTP 200 with that status, as Envoy answers it
        (
            {"abort": {"grpcStatus": "RESOURCE_EXHAUSTED", "percentage": {"value": 100}}},
            FaultInjection(abort=FaultAbort(http_status=200, grpc_status=8, percentage=100.0)),
        ),
        (
            {
                "delay": {"fixedDelay": "1s", "percentage": {"value": 10}},
                "abort": {"httpStatus": 500, "percentage": {"value": 50.5}},
            },
            FaultInjection(
                delay=FaultDelay(fixed_delay_ms=1000, percentage=10.0),
                abort=FaultAbort(http_status=500, percentage=50.5),
            ),
        ),
    ],
)
def test_fault(fault: dict[str, Any], expected: FaultInjection) -> None:
    assert only_rule(fault=fault).fault == expected


FAULT_JASON = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    fault: {delay: {percentage: {value: 100.0}, fixedDelay: 7s}}
    route: [{destination: {host: ratings, subset: v1}}]
  - route: [{destination: {host: ratings, subset: v1}}]
"""


def test_fault_is_scoped_by_the_rule_match() -> None:
    table = compile_route_table(parse(FAULT_JASON), ServiceRef("default", "ratings"), 1)
    jason, everyone = table.http
    assert jason.match[0].headers == {"end-user": StringMatch(kind="exact", value="jason")}
    assert jason.fault == FaultInjection(delay=FaultDelay(fixed_delay_ms=7000, percentage=100.0))
    assert everyone.fault is None


@pytest.mark.parametrize(
    ("fields", "namespace", "expected"),
    [
        (
            {"mirror": {"host": "reviews", "subset": "v2"}},
            "default",
            Mirror(host=REVIEWS_FQDN, subset="v2", percentage=100.0),
        ),
        (
            {
                "mirror": {"host": "ratings.prod", "port": {"number": 9080}},
                "mirrorPercentage": {"value": 25},
            },
            "default",
            Mirror(host="ratings.prod.svc.cluster.local", port=9080, percentage=25.0),
        ),
        # resolved in the VirtualService's namespace
        (
            {"mirror": {"host": "shadow"}, "mirrorPercentage": {"value": 0}},
            "prod",
            Mirror(host="shadow.prod.svc.cluster.local", percentage=0.0),
        ),
    ],
)
def test_mirror(fields: dict[str, Any], namespace: str, expected: Mirror) -> None:
    ref = ServiceRef(namespace, "reviews")
    resources = [vs("reviews", namespace, hosts=["reviews"], http=[route_rule(**fields)])]
    assert compile_route_table(resources, ref, 1).http[0].mirror == expected


def test_mirror_hosts_are_services_named() -> None:
    resources = [vs("reviews", hosts=["reviews"], http=[route_rule(mirror={"host": "shadow"})])]
    assert ServiceRef("default", "shadow") in services_named(resources)


def test_connection_pool_defaults_are_istios() -> None:
    table = compile_route_table(
        [
            dr(
                "reviews",
                host="reviews",
                trafficPolicy={"connectionPool": {"tcp": {"maxConnections": 0}}},
            )
        ],
        REVIEWS,
        1,
    )
    assert table.traffic_policy.connection_pool == ConnectionPool()
    assert ConnectionPool() == ConnectionPool(
        max_connections=2**32 - 1,
        connect_timeout_ms=10_000,
        http1_max_pending_requests=2**32 - 1,
        http2_max_requests=2**32 - 1,
        max_requests_per_connection=0,
        max_retries=2**32 - 1,
        idle_timeout_ms=3_600_000,
        max_concurrent_streams=0,
    )


def test_connection_pool_and_outlier_detection() -> None:
    pool = {
        "tcp": {"maxConnections": 1, "connectTimeout": "30ms"},
        "http": {
            "http1MaxPendingRequests": 2,
            "http2MaxRequests": 3,
            "maxRequestsPerConnection": 1,
            "maxRetries": 4,
            "idleTimeout": "1m",
            "maxConcurrentStreams": 8,
        },
    }
    outlier = {
        "consecutive5xxErrors": 7,
        "consecutiveGatewayErrors": 2,
        "splitExternalLocalOriginErrors": True,
        "consecutiveLocalOriginFailures": 3,
        "interval": "5s",
        "baseEjectionTime": "1m",
        "maxEjectionPercent": 50,
        "minHealthPercent": 20,
    }
    table = compile_route_table(
        [
            dr(
                "reviews",
                host="reviews",
                trafficPolicy={"connectionPool": pool, "outlierDetection": outlier},
            )
        ],
        REVIEWS,
        1,
    )
    assert table.traffic_policy == TrafficPolicy(
        connection_pool=ConnectionPool(
            max_connections=1,
            connect_timeout_ms=30,
            http1_max_pending_requests=2,
            http2_max_requests=3,
            max_requests_per_connection=1,
            max_retries=4,
            idle_timeout_ms=60_000,
            max_concurrent_streams=8,
        ),
        outlier_detection=OutlierDetection(
            consecutive_5xx_errors=7,
            consecutive_gateway_errors=2,
            consecutive_local_origin_failures=3,
            split_external_local_origin_errors=True,
            interval_ms=5000,
            base_ejection_time_ms=60_000,
            max_ejection_percent=50,
            min_health_percent=20,
        ),
    )


@pytest.mark.parametrize(
    ("outlier", "expected"),
    [
        ({}, OutlierDetection()),
        # 0 disables a consecutive-error detector, as Istio passes it to Envoy
        ({"consecutive5xxErrors": 0}, OutlierDetection(consecutive_5xx_errors=0)),
        # but maxEjectionPercent 0 is Istio's default 10%
        ({"maxEjectionPercent": 0}, OutlierDetection(max_ejection_percent=10)),
        (
            {"splitExternalLocalOriginErrors": True, "consecutiveLocalOriginFailures": 0},
            OutlierDetection(split_external_local_origin_errors=True),
        ),
    ],
)
def test_outlier_detection_defaults(outlier: dict[str, Any], expected: OutlierDetection) -> None:
    table = compile_route_table(
        [dr("reviews", host="reviews", trafficPolicy={"outlierDetection": outlier})], REVIEWS, 1
    )
    assert table.traffic_policy.outlier_detection == expected


def test_subset_policy_replaces_the_destination_policy_field_by_field() -> None:
    resources = [
        dr(
            "reviews",
            host="reviews",
            trafficPolicy={
                "loadBalancer": {"simple": "RANDOM"},
                "connectionPool": {"http": {"http2MaxRequests": 100}},
                "outlierDetection": {"consecutive5xxErrors": 5},
            },
            subsets=[
                {"name": "v1", "labels": {"version": "v1"}},
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 1}},
                },
                {
                    "name": "v3",
                    "labels": {"version": "v3"},
                    "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 1}}},
                },
            ],
        )
    ]
    table = compile_route_table(resources, REVIEWS, 1)
    top = table.traffic_policy
    v1, v2, v3 = (s.traffic_policy for s in table.subsets)
    assert v1 == top
    assert v2.outlier_detection == OutlierDetection(consecutive_5xx_errors=1)
    assert (v2.load_balancer, v2.connection_pool) == (top.load_balancer, top.connection_pool)
    # a subset's connectionPool replaces the whole top-level one, as in Istio
    assert v3.connection_pool == ConnectionPool(max_connections=1)
    assert (v3.load_balancer, v3.outlier_detection) == (top.load_balancer, top.outlier_detection)


def test_resilience_fields_survive_the_wire_and_old_tables_still_decode() -> None:
    rule = only_rule(
        retries={"attempts": 3, "retryOn": "5xx,429"},
        fault={"abort": {"httpStatus": 503, "percentage": {"value": 1}}},
        mirror={"host": "shadow"},
        timeout="2s",
    )
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(rule), type=HTTPRoute) == rule
    # a table encoded before these fields existed decodes with their defaults
    old = {"name": "r", "timeout_ms": 100}
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=HTTPRoute)
    assert (decoded.retries, decoded.fault, decoded.mirror) == (None, None, None)
    policy = msgspec.msgpack.decode(msgspec.msgpack.encode({}), type=TrafficPolicy)
    assert (policy.connection_pool, policy.outlier_detection) == (None, None)
