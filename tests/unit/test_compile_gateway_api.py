"""HTTPRoute / GRPCRoute / Kubernetes Service -> RouteTable, checked through the
sidecar's own routing core (which rule a request selects, where it goes, the path
sent upstream), as a sidecar would apply the table."""

from __future__ import annotations

import pytest

from mesh.hosts import ServiceRef
from mesh.resources import Resource, ResourceError, load_yaml, parse_resource
from proxy.routing import (
    RequestAttrs,
    compile_routes,
    redirect_location,
    rewrite_path,
    select_route,
)
from services.config.compile import compile_route_table, services_named

ECHO = ServiceRef("mesh", "echo")


def resources(text: str) -> list[Resource]:
    return [
        parse_resource(d, source="t.yaml", index=i, default_namespace="mesh")
        for i, d in enumerate(load_yaml(text, "t.yaml"))
    ]


def route(rules: str, name: str = "r", namespace: str = "mesh", parent: str = "echo") -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: {parent}, namespace: mesh}}]
  rules:
{rules}
---
"""


def pick(
    text: str,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    source_namespace: str = "mesh",
    service: ServiceRef = ECHO,
) -> tuple[str, str, str] | None:
    """(origin rule name, destination host/subset, upstream path) for a request."""
    table = compile_route_table(resources(text), service, 1)
    chosen = select_route(
        compile_routes(table),
        RequestAttrs(
            method=method,
            scheme="http",
            authority=service.name,
            path=path,
            headers=headers or {},
            source_namespace=source_namespace,
        ),
    )
    if chosen is None:
        return None
    r = chosen.route
    if r.direct_response is not None:
        return (r.name, f"direct:{r.direct_response.status}", "")
    dest = r.route[0].destination
    target = f"{dest.host.split('.')[0]}/{dest.subset}" if dest.subset else dest.host.split(".")[0]
    return (r.name, target, rewrite_path(r, chosen.match, path))


MATCHING = route("""\
  - matches:
    - path: {type: PathPrefix, value: /}
    - headers: [{name: version, value: one}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /v2}
    - headers: [{name: version, value: two}]
    backendRefs: [{name: echo-v2, port: 8080}]
""")


@pytest.mark.parametrize(
    ("path", "headers", "expect"),
    [
        ("/", {}, "echo-v1"),
        ("/v2", {}, "echo-v2"),
        ("/v2/example", {}, "echo-v2"),
        # PathPrefix matches whole path elements
        ("/v2example", {}, "echo-v1"),
        ("/", {"version": "one"}, "echo-v1"),
        ("/", {"version": "two"}, "echo-v2"),
    ],
)
def test_longest_prefix_wins_and_prefix_matches_path_elements(
    path: str, headers: dict[str, str], expect: str
) -> None:
    got = pick(MATCHING, path, headers=headers)
    assert got is not None and got[1] == expect, got


def test_exact_beats_prefix_then_method_then_header_count_then_age() -> None:
    text = route(
        """\
  - matches: [{path: {type: PathPrefix, value: /a}}]
    backendRefs: [{name: prefix, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /a}, method: POST}]
    backendRefs: [{name: method, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /a}, headers: [{name: x, value: "1"}]}]
    backendRefs: [{name: header, port: 80}]
""",
        name="older",
    ) + route(
        """\
  - matches: [{path: {type: Exact, value: /a/b}}]
    backendRefs: [{name: exact, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /a}}]
    backendRefs: [{name: newer, port: 80}]
""",
        name="newer",
    )
    assert pick(text, "/a/b")[1] == "exact"  # type: ignore[index]
    assert pick(text, "/a/c", method="POST", headers={"x": "1"})[1] == "method"  # type: ignore[index]
    assert pick(text, "/a/c", headers={"x": "1"})[1] == "header"  # type: ignore[index]
    # equal precedence: the older route's rule first
    assert pick(text, "/a/c")[1] == "prefix"  # type: ignore[index]


def test_no_match_is_not_found() -> None:
    text = route("""\
  - matches: [{path: {type: Exact, value: /only}}]
    backendRefs: [{name: echo-v1, port: 80}]
""")
    assert pick(text, "/other") is None


def test_weights_are_relative_and_zero_takes_nothing() -> None:
    text = route("""\
  - backendRefs:
    - {name: echo-v1, port: 8080, weight: 70}
    - {name: echo-v2, port: 8080, weight: 30}
    - {name: echo-v3, port: 8080, weight: 0}
""")
    table = compile_route_table(resources(text), ECHO, 1)
    [rule] = table.http
    assert [(d.destination.host, d.weight) for d in rule.route] == [
        ("echo-v1.mesh.svc.cluster.local", 70),
        ("echo-v2.mesh.svc.cluster.local", 30),
    ]


@pytest.mark.parametrize(
    ("path", "upstream"),
    [
        ("/prefix/one/two", "/one/two"),
        ("/prefix/one", "/one"),
        ("/strip-prefix/three?x=1", "/three?x=1"),
        ("/strip-prefix", "/"),
        ("/full/one/two", "/one"),
        ("/full/one", "/one"),
    ],
)
def test_url_rewrite_prefix_and_full_path(path: str, upstream: str) -> None:
    text = route("""\
  - matches: [{path: {type: PathPrefix, value: /prefix/one}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /strip-prefix}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /full/one}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}}]
    backendRefs: [{name: echo-v1, port: 80}]
""")
    got = pick(text, path)
    assert got is not None and got[2] == upstream, got


def test_consumer_route_replaces_producer_routes_for_its_namespace_only() -> None:
    text = route("  - backendRefs: [{name: echo-v1, port: 80}]\n", name="producer") + route(
        """\
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: echo-v2, namespace: mesh, port: 80}]
""",
        name="consumer",
        namespace="client",
    )
    assert pick(text, "/api/x", source_namespace="client")[1] == "echo-v2"  # type: ignore[index]
    # the consumer route does not match: not found, not the producer's rule
    assert pick(text, "/other", source_namespace="client")[1] == "direct:404"  # type: ignore[index]
    assert pick(text, "/api/x", source_namespace="mesh")[1] == "echo-v1"  # type: ignore[index]
    assert pick(text, "/api/x", source_namespace="elsewhere")[1] == "echo-v1"  # type: ignore[index]


KUBE_SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: mesh}
spec:
  ports: [{port: 9080, name: http}]
  selector: {app: reviews}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: mesh}
spec:
  ports: [{port: 9080, name: http}]
  selector: {app: reviews, version: v1}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: mesh}
spec:
  ports: [{port: 9080, name: http}]
  selector: {app: reviews, version: v2}
---
"""


def test_kubernetes_services_select_instances_of_their_app() -> None:
    text = KUBE_SERVICES + route(
        """\
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
""",
        parent="reviews",
    )
    reviews = ServiceRef("mesh", "reviews")
    table = compile_route_table(resources(text), reviews, 1)
    assert {s.name: s.labels for s in table.subsets} == {
        "k8s-reviews-v1": {"app": "reviews", "version": "v1"},
        "k8s-reviews-v2": {"app": "reviews", "version": "v2"},
    }
    # a data plane that builds every host up front learns reviews-v1 from reviews
    assert table.aliases == (
        "reviews-v1.mesh.svc.cluster.local",
        "reviews-v2.mesh.svc.cluster.local",
    )
    [rule] = table.http
    assert [(d.destination.host, d.destination.subset, d.weight) for d in rule.route] == [
        ("reviews.mesh.svc.cluster.local", "k8s-reviews-v1", 90),
        ("reviews.mesh.svc.cluster.local", "k8s-reviews-v2", 10),
    ]
    # calling reviews-v1 directly reaches reviews' v1 instances
    direct = pick(text, "/", service=ServiceRef("mesh", "reviews-v1"))
    assert direct is not None and direct[1] == "reviews/k8s-reviews-v1", direct
    named = services_named(resources(text))
    assert {ServiceRef("mesh", n) for n in ("reviews", "reviews-v1", "reviews-v2")} <= named


def test_grpc_method_match() -> None:
    text = """
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - matches: [{method: {service: grpc.Echo, method: Reverse}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{method: {type: RegularExpression, service: "grpc\\\\.Ec.*"}}]
    backendRefs: [{name: echo-v3, port: 80}]
  - backendRefs: [{name: echo-v1, port: 80}]
"""
    assert pick(text, "/grpc.Echo/Reverse", method="POST")[1] == "echo-v2"  # type: ignore[index]
    assert pick(text, "/grpc.Echo/Say", method="POST")[1] == "echo-v3"  # type: ignore[index]
    assert pick(text, "/other.Svc/Say", method="POST")[1] == "echo-v1"  # type: ignore[index]


@pytest.mark.parametrize(
    ("spec", "path", "message"),
    [
        (
            "parentRefs: [{kind: TLSRoute, name: gw}]",
            "spec.parentRefs[0].kind",
            "is not supported",
        ),
        (
            'parentRefs: [{group: "", kind: Service, name: e}]\n  rules: [{backendRefs: [{name: b}]}]',
            "spec.rules[0].backendRefs[0].port",
            "is required for a Service backend",
        ),
        (
            'parentRefs: [{group: "", kind: Service, name: e}]\n'
            "  rules: [{filters: [{type: ExtensionRef}]}]",
            "spec.rules[0].filters[0].type",
            "filter type ExtensionRef is not supported",
        ),
        (
            'parentRefs: [{group: "", kind: Service, name: e}]\n'
            "  rules: [{sessionPersistence: {}}]",
            "spec.rules[0].sessionPersistence",
            "is not supported",
        ),
        (
            'parentRefs: [{group: "", kind: Service, name: e}]\n'
            "  rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}}},"
            " {type: RequestMirror, requestMirror: {backendRef: {name: n, port: 80}}}]}]",
            "spec.rules[0].filters[1].type",
            "RequestMirror may appear only once per rule",
        ),
        (
            'parentRefs: [{group: "", kind: Service, name: e}]\n  hostnames: [a.example]',
            "spec.hostnames",
            "hostnames with a Service parent is not supported",
        ),
    ],
)
def test_refused_with_the_field_path(spec: str, path: str, message: str) -> None:
    text = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: bad}}
spec:
  {spec}
"""
    with pytest.raises(ResourceError) as caught:
        resources(text)
    assert caught.value.path == path and message in caught.value.message, str(caught.value)


def test_kubernetes_service_without_app_selector_is_refused() -> None:
    text = """
apiVersion: v1
kind: Service
metadata: {name: s}
spec: {selector: {tier: web}, ports: [{port: 80}]}
"""
    with pytest.raises(ResourceError) as caught:
        resources(text)
    assert caught.value.path == "spec.selector" and "app" in caught.value.message


def test_only_consumer_routes_leave_other_clients_the_default_route() -> None:
    text = route(
        "  - backendRefs: [{name: echo-v2, namespace: mesh, port: 80}]\n",
        name="consumer",
        namespace="client",
    )
    assert pick(text, "/x", source_namespace="client")[1] == "echo-v2"  # type: ignore[index]
    assert pick(text, "/x", source_namespace="mesh")[1] == "echo"  # type: ignore[index]


@pytest.mark.parametrize(
    ("parent_port", "authority", "matched"),
    [
        (80, "echo", True),  # no port in the Host: port 80
        (80, "echo:80", True),
        (80, "echo:8080", False),
        (8080, "echo:8080", True),
        (8080, "echo", False),
    ],
)
def test_parent_port_is_the_port_the_client_asked_for(
    parent_port: int, authority: str, matched: bool
) -> None:
    text = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: mesh}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo, port: {parent_port}}}]
  rules: [{{matches: [{{path: {{type: Exact, value: /a}}}}], backendRefs: [{{name: echo-v1, port: 80}}]}}]
"""
    table = compile_route_table(resources(text), ECHO, 1)
    port = int(authority.partition(":")[2] or 0)
    routes = compile_routes(table)

    def chosen(path: str) -> str:
        attrs = RequestAttrs(method="GET", scheme="http", authority=authority, path=path, port=port)
        found = select_route(routes, attrs)
        assert found is not None
        return found.route.name

    if matched:
        assert (chosen("/a"), chosen("/b")) == ("r.0", "no-route-matched")
    else:
        # another port than the route's: the service as if there were no route
        assert (chosen("/a"), chosen("/b")) == ("default", "default")


@pytest.mark.parametrize(
    ("path", "location"),
    [
        ("/original-prefix/lemon?x=1", "http://echo/replacement-prefix/lemon?x=1"),
        ("/original-prefix", "http://echo/replacement-prefix"),
        ("/full/path/original", "http://echo/full-path-replacement"),
    ],
)
def test_redirect_replaces_the_prefix_or_the_full_path(path: str, location: str) -> None:
    text = route("""\
  - matches: [{path: {type: PathPrefix, value: /original-prefix}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}}
""")
    table = compile_route_table(resources(text), ECHO, 1)
    attrs = RequestAttrs(method="GET", scheme="http", authority="echo", path=path)
    chosen = select_route(compile_routes(table), attrs)
    assert chosen is not None and chosen.route.redirect is not None
    # the Gateway API's default redirect status
    assert redirect_location(chosen.route.redirect, "http", "echo", path, chosen.match) == (
        302,
        location,
    )


GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway, namespace: mesh}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP, hostname: "*.example.com"}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bookinfo, namespace: mesh}
spec:
  parentRefs: [{name: bookinfo-gateway}]
  hostnames: [bookinfo.example.com, other.org]
  rules:
  - matches: [{path: {type: PathPrefix, value: /reviews}}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - backendRefs: [{name: productpage, port: 9080}]
---
"""


def test_gateway_api_gateway_routes_on_the_gateway_labelled_with_its_name() -> None:
    from proxy.routing import compile_gateway
    from services.config.compile import compile_gateway_config

    text = KUBE_SERVICES + GATEWAY
    labels = {"gateway.networking.k8s.io/gateway-name": "bookinfo-gateway"}
    config = compile_gateway_config(resources(text), "mesh", labels, 1)
    assert config.name == "mesh/bookinfo-gateway"
    # the route's hostnames narrowed to the listener's
    assert [vh.hosts for vh in config.virtual_hosts] == [("bookinfo.example.com",)]
    routes = compile_gateway(config)

    def target(authority: str, path: str) -> str | None:
        attrs = RequestAttrs(method="GET", scheme="http", authority=authority, path=path)
        found = select_route(routes, attrs)
        if found is None:
            return None
        d = found.route.route[0].destination
        return d.host.split(".")[0] + (f"/{d.subset}" if d.subset else "")

    assert target("bookinfo.example.com", "/reviews/1") == "reviews/k8s-reviews-v2"
    assert target("bookinfo.example.com", "/productpage") == "productpage"
    assert target("other.org", "/productpage") is None
    # another gateway proxy, or one in another namespace, is not selected
    assert compile_gateway_config(resources(text), "mesh", {}, 1).virtual_hosts == ()
    assert compile_gateway_config(resources(text), "other", labels, 1).virtual_hosts == ()


def test_gateway_api_gateway_round_trips_and_keeps_istio_gateway_apart() -> None:
    from mesh.resources import to_dict

    [gateway] = [r for r in resources(GATEWAY) if r.metadata.name == "bookinfo-gateway"]
    assert gateway.kind == "Gateway.gateway.networking.k8s.io"
    body = to_dict(gateway)
    assert body["kind"] == "Gateway"
    assert parse_resource(body, source="t", index=0) == gateway


@pytest.mark.parametrize(
    ("listener", "path", "message"),
    [
        ("{name: h, port: 443, protocol: HTTPS}", "spec.listeners[0].protocol", "HTTPS"),
        (
            "{name: h, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Selector}}}",
            "spec.listeners[0].allowedRoutes.namespaces.from",
            "Selector is not supported",
        ),
    ],
)
def test_gateway_api_gateway_refusals(listener: str, path: str, message: str) -> None:
    text = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: g}}
spec:
  gatewayClassName: istio
  listeners: [{listener}]
"""
    with pytest.raises(ResourceError) as caught:
        resources(text)
    assert caught.value.path == path and message in caught.value.message, str(caught.value)


def test_gateway_of_another_class_is_refused() -> None:
    text = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: g}
spec:
  gatewayClassName: cilium
  listeners: [{name: h, port: 80, protocol: HTTP}]
"""
    with pytest.raises(ResourceError) as caught:
        resources(text)
    assert caught.value.path == "spec.gatewayClassName" and "istio, meshwork" in str(caught.value)


def test_request_mirror_and_timeouts() -> None:
    text = route("""\
  - filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: echo-v2, port: 80}
        fraction: {numerator: 1, denominator: 4}
    backendRefs: [{name: echo-v1, port: 80}]
    timeouts: {request: 2s, backendRequest: 500ms}
""")
    [rule] = compile_route_table(resources(text), ECHO, 1).http
    assert rule.mirror is not None
    assert (rule.mirror.host, rule.mirror.percentage) == ("echo-v2.mesh.svc.cluster.local", 25.0)
    assert rule.timeout_ms == 2000
    assert rule.retries is not None and rule.retries.per_try_timeout_ms == 500
