"""Resource parsing and validation: what `meshctl apply` accepts, rejects and says."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from mesh.messages import ResourceDocument
from mesh.resources import (
    KINDS,
    DestinationRuleSpec,
    GatewaySpec,
    Resource,
    ResourceError,
    VirtualServiceSpec,
    load_yaml,
    parse_documents,
    parse_duration_ms,
    parse_resource,
    resolve_kind,
    to_dict,
)

# Istio's samples/bookinfo/networking files, as shipped.
VIRTUAL_SERVICE_ALL_V1 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: productpage
spec:
  hosts:
  - productpage
  http:
  - route:
    - destination:
        host: productpage
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - route:
    - destination:
        host: ratings
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: details
spec:
  hosts:
  - details
  http:
  - route:
    - destination:
        host: details
        subset: v1
---
"""

REVIEWS_TEST_V2 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
"""

REVIEWS_50_V3 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 50
    - destination:
        host: reviews
        subset: v3
      weight: 50
"""

DESTINATION_RULE_ALL = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: productpage
spec:
  host: productpage
  subsets:
  - name: v1
    labels:
      version: v1
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
  - name: v3
    labels:
      version: v3
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
spec:
  host: ratings
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
  - name: v2-mysql
    labels:
      version: v2-mysql
  - name: v2-mysql-vm
    labels:
      version: v2-mysql-vm
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: details
spec:
  host: details
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
"""

BOOKINFO_GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: bookinfo-gateway
spec:
  # The selector matches the ingress gateway pod labels.
  selector:
    istio: ingressgateway # use istio default controller
  servers:
  - port:
      number: 8080
      name: http
      protocol: HTTP
    hosts:
    - "*"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bookinfo
spec:
  hosts:
  - "*"
  gateways:
  - bookinfo-gateway
  http:
  - match:
    - uri:
        exact: /productpage
    - uri:
        prefix: /static
    - uri:
        exact: /login
    - uri:
        exact: /logout
    - uri:
        prefix: /api/v1/products
    route:
    - destination:
        host: productpage
        port:
          number: 9080
"""

BOOKINFO = {
    "virtual-service-all-v1.yaml": VIRTUAL_SERVICE_ALL_V1,
    "virtual-service-reviews-test-v2.yaml": REVIEWS_TEST_V2,
    "virtual-service-reviews-50-v3.yaml": REVIEWS_50_V3,
    "destination-rule-all.yaml": DESTINATION_RULE_ALL,
    "bookinfo-gateway.yaml": BOOKINFO_GATEWAY,
}


def parse_text(text: str, source: str = "t.yaml", namespace: str = "default") -> list[Resource]:
    return [
        parse_resource(doc, source=source, index=i, default_namespace=namespace)
        for i, doc in enumerate(load_yaml(text, source))
    ]


def rejection(body: dict[str, Any], index: int = 0) -> ResourceError:
    with pytest.raises(ResourceError) as info:
        parse_resource(body, source="t.yaml", index=index)
    return info.value


def vs(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews"},
        "spec": {"hosts": ["reviews"], **spec},
    }


def rule(**fields: Any) -> dict[str, Any]:
    return {"route": [{"destination": {"host": "reviews"}}], **fields}


def match_rule(**match: Any) -> dict[str, Any]:
    return rule(match=[match])


def dr(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews"},
        "spec": {"host": "reviews", **spec},
    }


def lb(**settings: Any) -> dict[str, Any]:
    return dr(trafficPolicy={"loadBalancer": settings})


def gw(**server: Any) -> dict[str, Any]:
    entry = {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"], **server}
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "ingress"},
        "spec": {"selector": {"istio": "ingressgateway"}, "servers": [entry]},
    }


# ---------------------------------------------------------------- bookinfo


@pytest.mark.parametrize(
    ("source", "expected_refs"),
    [
        (
            "virtual-service-all-v1.yaml",
            [
                ("VirtualService", "default", n)
                for n in ("productpage", "reviews", "ratings", "details")
            ],
        ),
        ("virtual-service-reviews-test-v2.yaml", [("VirtualService", "default", "reviews")]),
        ("virtual-service-reviews-50-v3.yaml", [("VirtualService", "default", "reviews")]),
        (
            "destination-rule-all.yaml",
            [
                ("DestinationRule", "default", n)
                for n in ("productpage", "reviews", "ratings", "details")
            ],
        ),
        (
            "bookinfo-gateway.yaml",
            [("Gateway", "default", "bookinfo-gateway"), ("VirtualService", "default", "bookinfo")],
        ),
    ],
)
def test_bookinfo_files_parse_in_default_namespace(
    source: str, expected_refs: list[tuple[str, str, str]]
) -> None:
    resources = parse_text(BOOKINFO[source], source)
    assert [r.ref for r in resources] == expected_refs


def test_bookinfo_typed_fields() -> None:
    (test_v2,) = parse_text(REVIEWS_TEST_V2)
    assert isinstance(test_v2.spec, VirtualServiceSpec)
    jason = test_v2.spec.http[0].match[0].headers["end-user"]
    assert (jason.exact, jason.prefix, jason.regex) == ("jason", None, None)
    assert [r.route[0].destination.subset for r in test_v2.spec.http] == ["v2", "v1"]

    (fifty,) = parse_text(REVIEWS_50_V3)
    assert isinstance(fifty.spec, VirtualServiceSpec)
    assert [(d.destination.subset, d.weight) for d in fifty.spec.http[0].route] == [
        ("v1", 50),
        ("v3", 50),
    ]

    reviews_dr = parse_text(DESTINATION_RULE_ALL)[1]
    assert isinstance(reviews_dr.spec, DestinationRuleSpec)
    assert {s.name: s.labels for s in reviews_dr.spec.subsets} == {
        "v1": {"version": "v1"},
        "v2": {"version": "v2"},
        "v3": {"version": "v3"},
    }

    gateway, bound = parse_text(BOOKINFO_GATEWAY)
    assert isinstance(gateway.spec, GatewaySpec)
    assert gateway.spec.selector == {"istio": "ingressgateway"}
    assert (gateway.spec.servers[0].port.number, gateway.spec.servers[0].hosts) == (8080, ("*",))
    assert isinstance(bound.spec, VirtualServiceSpec)
    assert bound.spec.gateways == ("bookinfo-gateway",)
    assert bound.spec.http[0].route[0].destination.port is not None
    assert bound.spec.http[0].route[0].destination.port.number == 9080


@pytest.mark.parametrize("source", sorted(BOOKINFO))
def test_to_dict_gives_back_the_applied_document_with_its_namespace(source: str) -> None:
    documents = load_yaml(BOOKINFO[source], source)
    for index, document in enumerate(documents):
        resource = parse_resource(document, source=source, index=index, default_namespace="shop")
        expected = copy.deepcopy(document)
        expected["metadata"]["namespace"] = "shop"
        assert to_dict(resource) == expected
        assert parse_resource(to_dict(resource), source="-", index=0) == resource


def test_to_dict_omits_defaults_and_keeps_camel_case() -> None:
    resource = parse_resource(
        vs(
            http=[rule(match=[{"ignoreUriCase": False, "withoutHeaders": {"x-a": {"exact": "1"}}}])]
        ),
        source="-",
        index=0,
    )
    http = to_dict(resource)["spec"]["http"][0]
    assert http["match"] == [{"withoutHeaders": {"x-a": {"exact": "1"}}}]


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha3"])
def test_every_istio_networking_version_is_accepted(version: str) -> None:
    body = vs(http=[rule()])
    body["apiVersion"] = f"networking.istio.io/{version}"
    resource = parse_resource(body, source="-", index=0)
    assert resource.api_version == f"networking.istio.io/{version}"
    assert to_dict(resource)["apiVersion"] == f"networking.istio.io/{version}"


def test_explicit_namespace_wins_over_the_default() -> None:
    body = vs(http=[rule()])
    body["metadata"]["namespace"] = "prod"
    resource = parse_resource(body, source="-", index=0, default_namespace="dev")
    assert resource.ref == ("VirtualService", "prod", "reviews")
    body["metadata"]["namespace"] = ""
    assert (
        parse_resource(body, source="-", index=0, default_namespace="dev").metadata.namespace
        == "dev"
    )


# ---------------------------------------------------------------- unsupported fields and kinds


UNSUPPORTED_FIELDS = [
    (vs(http=[rule(corsPolicy={"allowOrigins": [{"exact": "*"}]})]), "spec.http[0].corsPolicy"),
    (
        vs(http=[rule(retries={"attempts": 3, "retryRemoteLocalities": True})]),
        "spec.http[0].retries.retryRemoteLocalities",
    ),
    (
        vs(http=[rule(fault={"abort": {"http2Error": "CANCEL"}})]),
        "spec.http[0].fault.abort.http2Error",
    ),
    (
        vs(http=[rule(fault={"delay": {"exponentialDelay": "1s"}})]),
        "spec.http[0].fault.delay.exponentialDelay",
    ),
    (vs(http=[rule(mirrors=[{"destination": {"host": "reviews"}}])]), "spec.http[0].mirrors"),
    (vs(http=[rule(mirror={"host": "reviews"}, mirrorPercent=5)]), "spec.http[0].mirrorPercent"),
    (vs(http=[rule(rout=[])]), "spec.http[0].rout"),
    (vs(exportTo=["."], http=[rule()]), "spec.exportTo"),
    (
        vs(tcp=[{"match": [{"sourceSubnet": "10.0.0.0/8"}], "route": []}]),
        "spec.tcp[0].match[0].sourceSubnet",
    ),
    (vs(http=[match_rule(statPrefix="x")]), "spec.http[0].match[0].statPrefix"),
    (
        vs(http=[{"directResponse": {"status": 200, "body": {"bytes": "aGk="}}}]),
        "spec.http[0].directResponse.body.bytes",
    ),
    (
        vs(http=[{"redirect": {"derivePort": "FROM_REQUEST_PORT"}}]),
        "spec.http[0].redirect.derivePort",
    ),
    (vs(http=[rule(rewrite={"uriRegexRewrite": {}})]), "spec.http[0].rewrite.uriRegexRewrite"),
    (
        vs(http=[{"route": [{"destination": {"host": "reviews"}, "mirror": {}}]}]),
        "spec.http[0].route[0].mirror",
    ),
    (
        dr(trafficPolicy={"connectionPool": {"tcp": {"tcpKeepalive": {"time": "7200s"}}}}),
        "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
    ),
    (
        dr(trafficPolicy={"connectionPool": {"http": {"h2UpgradePolicy": "UPGRADE"}}}),
        "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy",
    ),
    (
        dr(trafficPolicy={"outlierDetection": {"consecutiveErrors": 5}}),
        "spec.trafficPolicy.outlierDetection.consecutiveErrors",
    ),
    (dr(trafficPolicy={"retryBudget": {}}), "spec.trafficPolicy.retryBudget"),
    (dr(trafficPolicy={"tunnel": {}}), "spec.trafficPolicy.tunnel"),
    (lb(localityLbSetting={}), "spec.trafficPolicy.loadBalancer.localityLbSetting"),
    (
        dr(subsets=[{"name": "v1", "trafficPolicy": {"tls": {"mode": "SIMPLE", "caCrl": "/c"}}}]),
        "spec.subsets[0].trafficPolicy.tls.caCrl",
    ),
    (dr(workloadSelector={}), "spec.workloadSelector"),
    (gw(tls={"mode": "PASSTHROUGH", "credentialName": "c"}), "spec.servers[0].tls.credentialName"),
    (gw(bind="0.0.0.0"), "spec.servers[0].bind"),
    ({**vs(http=[rule()]), "status": {}}, "status"),
    ({**vs(http=[rule()]), "metadata": {"name": "r", "uid": "1"}}, "metadata.uid"),
]


@pytest.mark.parametrize(("body", "path"), UNSUPPORTED_FIELDS)
def test_unsupported_field_is_rejected_with_its_path(body: dict[str, Any], path: str) -> None:
    error = rejection(body, index=3)
    assert error.path == path
    # followed by the nearest supported name, when one is close (see test_resource_errors)
    assert error.message.startswith(f"{path} is not supported")
    assert str(error).startswith(f"t.yaml: document 3: {path} is not supported")


@pytest.mark.parametrize("kind", ["WorkloadEntry", "EnvoyFilter", "Pod"])
def test_unsupported_kind_is_rejected(kind: str) -> None:
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": "x"},
        "spec": {},
    }
    error = rejection(body)
    assert (error.path, str(error)) == ("kind", f"t.yaml: document 0: kind {kind} is not supported")


def test_kind_in_the_wrong_case_gets_a_hint() -> None:
    body = vs(http=[rule()])
    body["kind"] = "virtualservice"
    assert rejection(body).message == (
        "kind virtualservice is not supported (did you mean VirtualService?)"
    )


@pytest.mark.parametrize(
    ("api_version", "message"),
    [
        (
            "networking.istio.io/v2",
            "apiVersion networking.istio.io/v2 is not supported for kind VirtualService (use "
            "networking.istio.io/v1, networking.istio.io/v1beta1 or networking.istio.io/v1alpha3)",
        ),
        ("security.istio.io/v1", "apiVersion security.istio.io/v1 is not supported"),
        (None, "apiVersion is required"),
    ],
)
def test_api_version_must_belong_to_the_kind(api_version: str | None, message: str) -> None:
    body = vs(http=[rule()])
    if api_version is None:
        del body["apiVersion"]
    else:
        body["apiVersion"] = api_version
    error = rejection(body)
    assert error.path == "apiVersion"
    assert error.message.startswith(message)


# ---------------------------------------------------------------- semantic validation

SEMANTIC_REJECTIONS = [
    # weights
    (
        vs(http=[{"route": [{"destination": {"host": "a"}, "weight": 120}]}]),
        "spec.http[0].route[0].weight",
        "must be between 0 and 100, got 120",
    ),
    (
        vs(http=[{"route": [{"destination": {"host": "a"}, "weight": -1}]}]),
        "spec.http[0].route[0].weight",
        "must be between 0 and 100, got -1",
    ),
    (
        vs(
            http=[
                {
                    "route": [
                        {"destination": {"host": "a", "subset": "v1"}, "weight": 50},
                        {"destination": {"host": "a", "subset": "v3"}, "weight": 40},
                    ]
                }
            ]
        ),
        "spec.http[0].route",
        "weights must add up to 100, got 90",
    ),
    (
        vs(http=[{"route": [{"destination": {"host": "a"}}, {"destination": {"host": "b"}}]}]),
        "spec.http[0].route",
        "weights must add up to 100, got 0",
    ),
    # one action per rule
    (
        vs(http=[{"match": [{"uri": {"prefix": "/"}}]}]),
        "spec.http[0]",
        "must set exactly one of route, redirect or directResponse, got none",
    ),
    (
        vs(http=[rule(directResponse={"status": 503})]),
        "spec.http[0]",
        "must set exactly one of route, redirect or directResponse, got route, directResponse",
    ),
    # string matches and regexes
    (
        vs(http=[match_rule(uri={"exact": "/a", "prefix": "/b"})]),
        "spec.http[0].match[0].uri",
        "must set exactly one of exact, prefix or regex, got exact, prefix",
    ),
    (
        vs(http=[match_rule(headers={"end-user": {}})]),
        "spec.http[0].match[0].headers.end-user",
        "must set exactly one of exact, prefix or regex, got none",
    ),
    (
        vs(http=[match_rule(uri={"regex": "/api/(v1"})]),
        "spec.http[0].match[0].uri.regex",
        "invalid regular expression '/api/(v1': missing ), unterminated subpattern at position 5",
    ),
    (
        vs(http=[match_rule(headers={"cookie": {"regex": r"(a)\1"}})]),
        "spec.http[0].match[0].headers.cookie.regex",
        r"invalid regular expression '(a)\\1': backreferences are not supported (RE2 syntax)",
    ),
    (
        vs(http=[match_rule(queryParams={"v": {"prefix": "1"}})]),
        "spec.http[0].match[0].queryParams.v.prefix",
        "spec.http[0].match[0].queryParams.v.prefix is not supported",
    ),
    # header names and values
    (
        vs(http=[match_rule(headers={"end user": {"exact": "x"}})]),
        'spec.http[0].match[0].headers["end user"]',
        "must be a valid HTTP header name, got 'end user'",
    ),
    (
        vs(http=[rule(headers={"request": {"set": {"x-a": "1\r\nx-admin: yes"}}})]),
        "spec.http[0].headers.request.set.x-a",
        "must not contain CR, LF or NUL, got '1\\r\\nx-admin: yes'",
    ),
    (
        vs(http=[rule(headers={"response": {"remove": ["bad:name"]}})]),
        "spec.http[0].headers.response.remove[0]",
        "must be a valid HTTP header name, got 'bad:name'",
    ),
    # durations
    (
        vs(http=[rule(timeout="10")]),
        "spec.http[0].timeout",
        "must be a duration such as 1.5s, 100ms or 2m, got '10'",
    ),
    (vs(http=[rule(timeout="-1s")]), "spec.http[0].timeout", "must not be negative, got '-1s'"),
    # destinations, ports, codes
    (
        vs(http=[{"route": [{"destination": {"host": ""}}]}]),
        "spec.http[0].route[0].destination.host",
        "must not be empty",
    ),
    (
        vs(http=[{"route": [{"destination": {"host": "*.default.svc.cluster.local"}}]}]),
        "spec.http[0].route[0].destination.host",
        "must name a service, not a wildcard, got '*.default.svc.cluster.local'",
    ),
    (
        vs(http=[{"route": [{"destination": {"host": "a", "port": {"number": 70000}}}]}]),
        "spec.http[0].route[0].destination.port.number",
        "must be between 1 and 65535, got 70000",
    ),
    (
        vs(http=[match_rule(port=0)]),
        "spec.http[0].match[0].port",
        "must be between 1 and 65535, got 0",
    ),
    (
        vs(http=[{"redirect": {"uri": "/new", "redirectCode": 200}}]),
        "spec.http[0].redirect.redirectCode",
        "must be a 3xx status code, got 200",
    ),
    (
        vs(http=[{"redirect": {}}]),
        "spec.http[0].redirect",
        "must set at least one of uri, authority, port or scheme",
    ),
    (
        vs(http=[{"directResponse": {"status": 600}}]),
        "spec.http[0].directResponse.status",
        "must be between 200 and 599, got 600",
    ),
    (
        vs(http=[{"redirect": {"uri": "/x"}, "rewrite": {"uri": "/y"}}]),
        "spec.http[0].rewrite",
        "can only be used with route",
    ),
    (
        vs(http=[rule(rewrite={"authority": "evil.example.com\r\nX-Admin: 1"})]),
        "spec.http[0].rewrite.authority",
        "must be host or host:port, got 'evil.example.com\\r\\nX-Admin: 1'",
    ),
    (
        vs(http=[{"redirect": {"uri": "/a b"}}]),
        "spec.http[0].redirect.uri",
        "must not contain whitespace or control characters, got '/a b'",
    ),
    # hosts and gateways
    (vs(hosts=[]), "spec.hosts", "must list at least one host"),
    (
        vs(hosts=["*"], http=[rule()]),
        "spec.hosts[0]",
        "'*' is only allowed when spec.gateways lists gateways and not mesh",
    ),
    (
        vs(hosts=["reviews:9080"], http=[rule()]),
        "spec.hosts[0]",
        "must be a host name without a port, got 'reviews:9080'",
    ),
    (
        vs(gateways=["a/b/c"], http=[rule()]),
        "spec.gateways[0]",
        "must be 'mesh', a Gateway name or '<namespace>/<name>', got 'a/b/c'",
    ),
    # DestinationRule
    (dr(host=""), "spec.host", "must not be empty"),
    (
        dr(subsets=[{"name": "v1"}, {"name": "v2"}, {"name": "v1"}]),
        "spec.subsets[2].name",
        "duplicate subset name 'v1', see subsets[0]",
    ),
    (
        dr(subsets=[{"name": "V1"}]),
        "spec.subsets[0].name",
        "must be a DNS-1123 label (at most 63 lower-case letters, digits or '-', "
        "starting and ending with a letter or digit), got 'V1'",
    ),
    (
        lb(simple="FASTEST"),
        "spec.trafficPolicy.loadBalancer.simple",
        "must be one of ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, RANDOM, got 'FASTEST'",
    ),
    (
        lb(simple="RANDOM", consistentHash={"useSourceIp": True}),
        "spec.trafficPolicy.loadBalancer",
        "must set only one of simple or consistentHash",
    ),
    (
        lb(consistentHash={"httpHeaderName": "x-user", "useSourceIp": True}),
        "spec.trafficPolicy.loadBalancer.consistentHash",
        "must set exactly one of httpHeaderName, httpCookie, useSourceIp or "
        "httpQueryParameterName, got httpHeaderName, useSourceIp",
    ),
    (
        lb(consistentHash={"httpCookie": {"name": "user", "ttl": "forever"}}),
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
        "must be a duration such as 1.5s, 100ms or 2m, got 'forever'",
    ),
    (
        lb(consistentHash={"useSourceIp": True, "minimumRingSize": 2**40}),
        "spec.trafficPolicy.loadBalancer.consistentHash.minimumRingSize",
        "must be between 1 and 8388608, got 1099511627776",
    ),
    (
        vs(http=[rule(timeout="99999999999h")]),
        "spec.http[0].timeout",
        "must be at most 315576000000s (10000 years), got '99999999999h'",
    ),
    # Gateway
    (
        gw(port={"number": 443, "name": "https", "protocol": "HTTPS"}),
        "spec.servers[0].port.protocol",
        "protocol HTTPS is not supported (supported: HTTP, TCP, TLS)",
    ),
    (
        gw(hosts=["istio-system/bookinfo.example.com"]),
        "spec.servers[0].hosts[0]",
        "must be a host name, got 'istio-system/bookinfo.example.com' "
        "(namespace-qualified hosts are not supported)",
    ),
    (gw(hosts=[]), "spec.servers[0].hosts", "must list at least one host"),
    # metadata
    (
        {**vs(http=[rule()]), "metadata": {"name": "Reviews_V2"}},
        "metadata.name",
        "must be a DNS-1123 subdomain (lower-case letters, digits, '-' and '.', "
        "starting and ending with a letter or digit), got 'Reviews_V2'",
    ),
    ({**vs(http=[rule()]), "metadata": {}}, "metadata.name", "metadata.name is required"),
    (
        {**vs(http=[rule()]), "metadata": {"name": "r", "namespace": "Prod"}},
        "metadata.namespace",
        "must be a DNS-1123 label (at most 63 lower-case letters, digits or '-', "
        "starting and ending with a letter or digit), got 'Prod'",
    ),
]


@pytest.mark.parametrize(("body", "path", "message"), SEMANTIC_REJECTIONS)
def test_semantic_rejection_names_the_field(body: dict[str, Any], path: str, message: str) -> None:
    error = rejection(body)
    assert (error.path, error.message) == (path, message)


def test_error_reads_source_document_path_message() -> None:
    body = vs(
        http=[
            {
                "route": [
                    {"destination": {"host": "reviews", "subset": "v1"}, "weight": 0},
                    {"destination": {"host": "reviews", "subset": "v3"}, "weight": 120},
                ]
            }
        ]
    )
    with pytest.raises(ResourceError) as info:
        parse_resource(body, source="bookinfo.yaml", index=2)
    assert str(info.value) == (
        "bookinfo.yaml: document 2: spec.http[0].route[1].weight: "
        "must be between 0 and 100, got 120"
    )
    assert (info.value.source, info.value.index) == ("bookinfo.yaml", 2)


@pytest.mark.parametrize(
    ("body", "path", "message"),
    [
        # the classic mistake: a bare value where Istio wants a StringMatch
        (
            vs(http=[match_rule(headers={"end-user": "jason"})]),
            "spec.http[0].match[0].headers.end-user",
            "must be a mapping, got a string",
        ),
        (vs(hosts="reviews"), "spec.hosts", "must be a list, got a string"),
        (
            vs(http=[{"route": [{"destination": {"host": "a"}, "weight": "50"}]}]),
            "spec.http[0].route[0].weight",
            "must be an integer, got a string",
        ),
        (
            {**vs(http=[rule()]), "metadata": {"name": "r", "labels": {"app.kubernetes.io/v": 2}}},
            'metadata.labels["app.kubernetes.io/v"]',
            "must be a string, got an integer",
        ),
        (
            vs(http=[{"route": [{"weight": 100}]}]),
            "spec.http[0].route[0].destination",
            "spec.http[0].route[0].destination is required",
        ),
        ({**vs(), "spec": None}, "spec", "must be a mapping, got null"),
    ],
)
def test_type_errors_name_the_field(body: dict[str, Any], path: str, message: str) -> None:
    error = rejection(body)
    assert (error.path, error.message) == (path, message)


def test_batch_reports_every_error_of_every_document() -> None:
    good = vs(http=[rule()])
    two_problems = vs(
        http=[
            {
                "route": [
                    {"destination": {"host": "reviews"}, "weight": 120},
                    {"destination": {"host": "reviews"}, "weight": 20},
                ],
                "timeout": "soon",
            }
        ]
    )
    unsupported = vs(http=[rule(corsPolicy={})])
    batch = parse_documents(
        [
            ResourceDocument(source="a.yaml", index=0, body=good),
            ResourceDocument(source="a.yaml", index=1, body=two_problems),
            ResourceDocument(source="b.yaml", index=0, body=unsupported),
        ]
    )
    assert [r.ref for r in batch.resources] == [("VirtualService", "default", "reviews")]
    assert [str(e) for e in batch.errors] == [
        "a.yaml: document 1: spec.http[0].route[0].weight: must be between 0 and 100, got 120",
        "a.yaml: document 1: spec.http[0].route: weights must add up to 100, got 140",
        "a.yaml: document 1: spec.http[0].timeout: must be a duration such as 1.5s, 100ms or 2m, "
        "got 'soon'",
        "b.yaml: document 0: spec.http[0].corsPolicy is not supported",
    ]


def test_valid_edge_values_are_accepted() -> None:
    body = vs(
        gateways=["mesh", "istio-system/ingress"],
        http=[
            {
                "match": [
                    {
                        "uri": {"regex": "/api/v[0-9]+/.*"},
                        "method": {"exact": "GET"},
                        "ignoreUriCase": True,
                        "sourceLabels": {"app": "productpage"},
                        "sourceNamespace": "default",
                        "port": 9080,
                        "gateways": ["mesh"],
                        "queryParams": {"debug": {"exact": "1"}},
                    }
                ],
                "route": [
                    {"destination": {"host": "reviews", "subset": "v1"}, "weight": 0},
                    {"destination": {"host": "reviews", "subset": "v2"}, "weight": 100},
                ],
                "rewrite": {"uri": "/"},
                "timeout": "1.5s",
            },
            {"redirect": {"authority": "new.example.com", "port": 8443, "redirectCode": 308}},
            {"directResponse": {"status": 200, "body": {"string": "ok"}}},
        ],
    )
    resource = parse_resource(body, source="-", index=0)
    assert isinstance(resource.spec, VirtualServiceSpec)
    assert len(resource.spec.http) == 3


# ---------------------------------------------------------------- YAML loading


def test_load_yaml_skips_empty_documents_and_flattens_lists() -> None:
    text = """
---
---
apiVersion: v1
kind: List
items:
- {apiVersion: networking.istio.io/v1, kind: Gateway, metadata: {name: a}}
- {apiVersion: networking.istio.io/v1, kind: Gateway, metadata: {name: b}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: c}
---
"""
    assert [d["metadata"]["name"] for d in load_yaml(text, "-")] == ["a", "b", "c"]
    assert load_yaml("", "-") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "kind: Gateway\nmetadata:\n  name: a\n---\nkind: Gateway\nmetadata: {name: [b\n",
            "f.yaml: document 1: line 7: invalid YAML:",
        ),
        (
            "kind: Gateway\nspec:\n  selector: {}\nspec:\n  servers: []\n",
            "f.yaml: document 0: line 4: invalid YAML: found duplicate key 'spec'",
        ),
        (
            "- kind: Gateway\n",
            "f.yaml: document 0: document must be a mapping with apiVersion, kind, metadata and "
            "spec, got list",
        ),
        ("kind: List\nitems: {}\n", "f.yaml: document 0: items: must be a list of resources"),
    ],
)
def test_load_yaml_errors_name_file_document_and_line(text: str, expected: str) -> None:
    with pytest.raises(ResourceError) as info:
        load_yaml(text, "f.yaml")
    assert str(info.value).startswith(expected)


def test_yaml_merge_keys_may_override() -> None:
    text = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: a}
spec:
  servers:
  - &http {port: {number: 80, name: http}, hosts: ["*"]}
  - <<: *http
    port: {number: 8080, name: alt}
"""
    (gateway,) = parse_text(text)
    assert isinstance(gateway.spec, GatewaySpec)
    assert [s.port.number for s in gateway.spec.servers] == [80, 8080]


# ---------------------------------------------------------------- kinds and durations


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("VirtualService", "VirtualService"),
        ("virtualservice", "VirtualService"),
        ("virtualservices", "VirtualService"),
        ("vs", "VirtualService"),
        ("virtualservices.networking.istio.io", "VirtualService"),
        ("DestinationRule", "DestinationRule"),
        ("destinationrules", "DestinationRule"),
        ("dr", "DestinationRule"),
        ("Gateway", "Gateway"),
        ("gateways", "Gateway"),
        ("GW", "Gateway"),
    ],
)
def test_resolve_kind_accepts_kubectl_style_names(name: str, kind: str) -> None:
    assert resolve_kind(name) == kind


def test_resolve_kind_rejects_unknown_names_listing_the_known_ones() -> None:
    with pytest.raises(ResourceError) as info:
        resolve_kind("workloadentries")
    assert str(info.value) == (
        "unknown resource kind 'workloadentries'; known kinds: VirtualService (vs), "
        "DestinationRule (dr), Gateway (gw), ServiceEntry (se), PeerAuthentication (pa), "
        "AuthorizationPolicy (ap), RequestAuthentication (ra), RateLimitPolicy (rlp), "
        "MeshConfig (mc), HTTPRoute (hr), GRPCRoute (gr), Gateway.gateway.networking.k8s.io, "
        "Service (svc)"
    )


def test_kind_registry_lists_names_and_versions() -> None:
    assert {k: (i.plural, i.short_names) for k, i in KINDS.items()} == {
        "VirtualService": ("virtualservices", ("vs",)),
        "DestinationRule": ("destinationrules", ("dr",)),
        "Gateway": ("gateways", ("gw",)),
        "ServiceEntry": ("serviceentries", ("se",)),
        "PeerAuthentication": ("peerauthentications", ("pa",)),
        "AuthorizationPolicy": ("authorizationpolicies", ("ap",)),
        "RequestAuthentication": ("requestauthentications", ("ra",)),
        "RateLimitPolicy": ("ratelimitpolicies", ("rlp",)),
        "MeshConfig": ("meshconfigs", ("mc",)),
        "HTTPRoute": ("httproutes", ("hr",)),
        "GRPCRoute": ("grpcroutes", ("gr",)),
        "Gateway.gateway.networking.k8s.io": ("gateways", ()),
        "Service": ("services", ("svc",)),
    }
    # Istio's Gateway keeps the bare names; the Gateway API's is named with its group
    assert resolve_kind("gateways") == "Gateway"
    assert resolve_kind("gateways.gateway.networking.k8s.io") == (
        "Gateway.gateway.networking.k8s.io"
    )
    # Kubernetes' core group has no group in its apiVersion
    assert KINDS["Service"].api_versions == ("v1",)
    assert KINDS["HTTPRoute"].api_versions == (
        "gateway.networking.k8s.io/v1",
        "gateway.networking.k8s.io/v1beta1",
    )
    assert KINDS["Gateway"].api_versions == (
        "networking.istio.io/v1",
        "networking.istio.io/v1beta1",
        "networking.istio.io/v1alpha3",
    )


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("1.5s", 1500),
        ("100ms", 100),
        ("2m", 120_000),
        ("1h30m", 5_400_000),
        ("0", 0),
        ("0s", 0),
        ("1.1s", 1100),
        # shorter than a millisecond must not become 0 (= no timeout)
        ("500us", 1),
        ("250µs", 1),
    ],
)
def test_durations(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["", "10", "1.5", "s", "1d", "-1s", "1s garbage"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration_ms(text)


# ---------------------------------------------------------------- resilience (issue 6)


def rlp(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "meshwork.io/v1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": "ratings"},
        "spec": spec,
    }


RESILIENT_VS = vs(
    http=[
        {
            "match": [{"headers": {"end-user": {"exact": "jason"}}}],
            "route": [{"destination": {"host": "reviews", "subset": "v1"}}],
            "timeout": "10s",
            "retries": {
                "attempts": 3,
                "perTryTimeout": "2s",
                "retryOn": "5xx,gateway-error,reset,connect-failure,refused-stream,"
                "retriable-4xx,retriable-status-codes,unavailable,cancelled,"
                "deadline-exceeded,resource-exhausted,internal,envoy-ratelimited,"
                "retriable-headers,reset-before-request,503,429",
                "retryIgnorePreviousHosts": False,
                "backoff": "50ms",
            },
            "fault": {
                "delay": {"fixedDelay": "7s", "percentage": {"value": 0.5}},
                "abort": {"httpStatus": 503, "percentage": {"value": 100}},
            },
            "mirror": {"host": "reviews", "subset": "v2", "port": {"number": 9080}},
            "mirrorPercentage": {"value": 0.0001},
        },
        {"route": [{"destination": {"host": "reviews"}}], "retries": {"attempts": 0}},
        {
            "route": [{"destination": {"host": "reviews"}}],
            "fault": {"delay": {"fixedDelay": "1ms", "percent": 10}},
        },
        {
            "route": [{"destination": {"host": "reviews"}}],
            "fault": {"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 5}}},
        },
    ]
)
RESILIENT_DR = dr(
    trafficPolicy={
        "connectionPool": {
            "tcp": {"maxConnections": 100, "connectTimeout": "30ms"},
            "http": {
                "http1MaxPendingRequests": 0,
                "http2MaxRequests": 1000,
                "maxRequestsPerConnection": 1,
                "maxRetries": 3,
                "idleTimeout": "1h",
                "maxConcurrentStreams": 100,
            },
        },
        "outlierDetection": {
            "consecutive5xxErrors": 0,
            "consecutiveGatewayErrors": 5,
            "consecutiveLocalOriginFailures": 2,
            "splitExternalLocalOriginErrors": True,
            "interval": "10s",
            "baseEjectionTime": "30s",
            "maxEjectionPercent": 100,
            "minHealthPercent": 0,
        },
    },
    subsets=[
        {
            "name": "v1",
            "trafficPolicy": {
                "connectionPool": {"http": {"http2MaxRequests": 1}},
                "outlierDetection": {"consecutive5xxErrors": 1},
            },
        }
    ],
)
RATE_LIMIT_POLICY = rlp(
    selector={"matchLabels": {"app": "ratings"}},
    total={"requestsPerSecond": 100},
    identity={"requestsPerSecond": 20},
    overrides=[
        {
            "requestsPerSecond": 100,
            "clientRefs": {"principals": ["cluster.local/ns/default/sa/reviews"]},
        }
    ],
)


@pytest.mark.parametrize("body", [RESILIENT_VS, RESILIENT_DR, RATE_LIMIT_POLICY])
def test_resilience_fields_are_accepted_and_round_trip(body: dict[str, Any]) -> None:
    resource = parse_resource(copy.deepcopy(body), source="-", index=0)
    assert parse_resource(to_dict(resource), source="-", index=0) == resource
    assert to_dict(resource)["spec"] == body["spec"]


def test_rate_limit_policy_kind() -> None:
    resource = parse_resource(RATE_LIMIT_POLICY, source="-", index=0)
    assert resource.ref == ("RateLimitPolicy", "default", "ratings")
    assert resolve_kind("rlp") == resolve_kind("ratelimitpolicies.meshwork.io") == "RateLimitPolicy"
    assert KINDS["RateLimitPolicy"].api_versions == ("meshwork.io/v1",)
    error = rejection({**RATE_LIMIT_POLICY, "apiVersion": "networking.istio.io/v1"})
    assert error.message == (
        "apiVersion networking.istio.io/v1 is not supported for kind RateLimitPolicy "
        "(use meshwork.io/v1)"
    )


RESILIENCE_REJECTIONS = [
    # retries
    (
        vs(http=[rule(retries={"attempts": -1})]),
        "spec.http[0].retries.attempts",
        "must not be negative, got -1",
    ),
    (
        vs(http=[rule(retries={"perTryTimeout": "2s", "retryOn": "5xx"})]),
        "spec.http[0].retries.attempts",
        "must be at least 1 when perTryTimeout and retryOn are set (attempts absent or 0 "
        "disables retries)",
    ),
    (
        vs(http=[rule(retries={"attempts": 2, "retryOn": "5xx,bogus"})]),
        "spec.http[0].retries.retryOn",
        "'bogus' is not a valid retryOn condition (use a comma-separated list, without spaces, "
        "of HTTP status codes or: 5xx, cancelled, connect-failure, deadline-exceeded, "
        "envoy-ratelimited, gateway-error, internal, refused-stream, reset, "
        "reset-before-request, resource-exhausted, retriable-4xx, retriable-headers, "
        "retriable-status-codes, unavailable)",
    ),
    (
        vs(http=[rule(retries={"attempts": 2, "retryOn": "5xx, reset"})]),
        "spec.http[0].retries.retryOn",
        "' reset' is not a valid retryOn condition",
    ),
    (
        vs(http=[rule(retries={"attempts": 2, "retryOn": "599"})]),
        "spec.http[0].retries.retryOn",
        "'599' is not a valid retryOn condition",
    ),
    (
        vs(http=[rule(retries={"attempts": 2, "retryOn": "http3-post-connect-failure"})]),
        "spec.http[0].retries.retryOn",
        "'http3-post-connect-failure' is not a valid retryOn condition",
    ),
    (
        vs(http=[rule(retries={"attempts": 2, "perTryTimeout": "0s"})]),
        "spec.http[0].retries.perTryTimeout",
        "must be at least 1ms, got '0s'",
    ),
    (
        vs(http=[rule(retries={"attempts": 2, "backoff": "1.5ms"})]),
        "spec.http[0].retries.backoff",
        "must be a whole number of milliseconds, got '1.5ms'",
    ),
    (
        vs(http=[{"redirect": {"uri": "/"}, "retries": {"attempts": 1}}]),
        "spec.http[0].retries",
        "can only be used with route",
    ),
    # fault
    (vs(http=[rule(fault={})]), "spec.http[0].fault", "must set delay, abort or both"),
    (
        vs(http=[{"directResponse": {"status": 200}, "fault": {"abort": {"httpStatus": 500}}}]),
        "spec.http[0].fault",
        "can only be used with route",
    ),
    (
        vs(http=[rule(fault={"delay": {"percentage": {"value": 10}}})]),
        "spec.http[0].fault.delay.fixedDelay",
        "spec.http[0].fault.delay.fixedDelay is required",
    ),
    (
        vs(http=[rule(fault={"delay": {"fixedDelay": "soon"}})]),
        "spec.http[0].fault.delay.fixedDelay",
        "must be a duration such as 1.5s, 100ms or 2m, got 'soon'",
    ),
    (
        vs(http=[rule(fault={"delay": {"fixedDelay": "1s", "percentage": {"value": 101}}})]),
        "spec.http[0].fault.delay.percentage.value",
        "must be between 0 and 100, got 101.0",
    ),
    (
        vs(http=[rule(fault={"delay": {"fixedDelay": "1s", "percent": 120}})]),
        "spec.http[0].fault.delay.percent",
        "must be between 0 and 100, got 120",
    ),
    (
        vs(
            http=[
                rule(
                    fault={"delay": {"fixedDelay": "1s", "percent": 5, "percentage": {"value": 5}}}
                )
            ]
        ),
        "spec.http[0].fault.delay.percent",
        "must not be set together with percentage (percent is deprecated)",
    ),
    (
        vs(http=[rule(fault={"abort": {"percentage": {"value": 5}}})]),
        "spec.http[0].fault.abort.httpStatus",
        "spec.http[0].fault.abort.httpStatus is required",
    ),
    (
        vs(http=[rule(fault={"abort": {"httpStatus": 600}})]),
        "spec.http[0].fault.abort.httpStatus",
        "must be between 200 and 599, got 600",
    ),
    (
        vs(http=[rule(fault={"abort": {"grpcStatus": "unavailable"}})]),
        "spec.http[0].fault.abort.grpcStatus",
        "'unavailable' is not a gRPC status name (one of: OK, CANCELLED,",
    ),
    (
        vs(http=[rule(fault={"abort": {"grpcStatus": "14"}})]),
        "spec.http[0].fault.abort.grpcStatus",
        "'14' is not a gRPC status name",
    ),
    (
        vs(http=[rule(fault={"abort": {"httpStatus": 503, "grpcStatus": "UNAVAILABLE"}})]),
        "spec.http[0].fault.abort.grpcStatus",
        "must not be set together with httpStatus",
    ),
    (
        vs(http=[rule(fault={"abort": {"httpStatus": 500, "percentage": {"value": -1}}})]),
        "spec.http[0].fault.abort.percentage.value",
        "must be between 0 and 100, got -1.0",
    ),
    (
        vs(http=[rule(fault={"abort": {"httpStatus": 500, "percentage": {"value": 0.00001}}})]),
        "spec.http[0].fault.abort.percentage.value",
        "must be 0 or at least 0.0001, got 1e-05",
    ),
    (
        vs(http=[rule(fault={"abort": {"httpStatus": 500, "percentage": {"value": ".nan"}}})]),
        "spec.http[0].fault.abort.percentage.value",
        "must be a number, got a string",
    ),
    (
        vs(
            http=[rule(fault={"abort": {"httpStatus": 500, "percentage": {"value": float("nan")}}})]
        ),
        "spec.http[0].fault.abort.percentage.value",
        "must be between 0 and 100, got nan",
    ),
    # mirror
    (
        vs(http=[rule(mirror={"host": "*.example.com"})]),
        "spec.http[0].mirror.host",
        "must name a service, not a wildcard, got '*.example.com'",
    ),
    (
        vs(http=[rule(mirror={"host": "reviews", "subset": "V2"})]),
        "spec.http[0].mirror.subset",
        "must be a DNS-1123 label",
    ),
    (
        vs(http=[rule(mirror={"host": "reviews", "port": {"number": 0}})]),
        "spec.http[0].mirror.port.number",
        "must be between 1 and 65535, got 0",
    ),
    (
        vs(http=[rule(mirrorPercentage={"value": 50})]),
        "spec.http[0].mirrorPercentage",
        "spec.http[0].mirrorPercentage requires spec.http[0].mirror",
    ),
    (
        vs(http=[rule(mirror={"host": "reviews"}, mirrorPercentage={"value": 150})]),
        "spec.http[0].mirrorPercentage.value",
        "must be between 0 and 100, got 150.0",
    ),
    (
        vs(http=[rule(mirror={})]),
        "spec.http[0].mirror.host",
        "spec.http[0].mirror.host is required",
    ),
    # connectionPool
    (
        dr(trafficPolicy={"connectionPool": {}}),
        "spec.trafficPolicy.connectionPool",
        "must set tcp, http or both",
    ),
    (
        dr(trafficPolicy={"connectionPool": {"tcp": {"maxConnections": -1}}}),
        "spec.trafficPolicy.connectionPool.tcp.maxConnections",
        "must be between 0 and 2147483647, got -1",
    ),
    (
        dr(trafficPolicy={"connectionPool": {"http": {"maxConcurrentStreams": -5}}}),
        "spec.trafficPolicy.connectionPool.http.maxConcurrentStreams",
        "must be between 0 and 2147483647, got -5",
    ),
    (
        dr(trafficPolicy={"connectionPool": {"tcp": {"connectTimeout": "500us"}}}),
        "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
        "must be at least 1ms, got '500us'",
    ),
    (
        dr(trafficPolicy={"connectionPool": {"http": {"http2MaxRequests": 2**31}}}),
        "spec.trafficPolicy.connectionPool.http.http2MaxRequests",
        "must be between 0 and 2147483647, got 2147483648",
    ),
    (
        dr(trafficPolicy={"connectionPool": {"http": {"idleTimeout": "-1s"}}}),
        "spec.trafficPolicy.connectionPool.http.idleTimeout",
        "must not be negative, got '-1s'",
    ),
    (
        dr(trafficPolicy={"connectionPool": {"http": {"maxRetries": "3"}}}),
        "spec.trafficPolicy.connectionPool.http.maxRetries",
        "must be an integer, got a string",
    ),
    # outlierDetection
    (
        dr(trafficPolicy={"outlierDetection": {"consecutive5xxErrors": -1}}),
        "spec.trafficPolicy.outlierDetection.consecutive5xxErrors",
        "must be between 0 and 4294967295, got -1",
    ),
    (
        dr(trafficPolicy={"outlierDetection": {"consecutiveLocalOriginFailures": 3}}),
        "spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures",
        "spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures takes effect only "
        "with splitExternalLocalOriginErrors: true",
    ),
    (
        dr(trafficPolicy={"outlierDetection": {"interval": "0s"}}),
        "spec.trafficPolicy.outlierDetection.interval",
        "must be at least 1ms, got '0s'",
    ),
    (
        dr(trafficPolicy={"outlierDetection": {"baseEjectionTime": "30"}}),
        "spec.trafficPolicy.outlierDetection.baseEjectionTime",
        "must be a duration such as 1.5s, 100ms or 2m, got '30'",
    ),
    (
        dr(trafficPolicy={"outlierDetection": {"maxEjectionPercent": 101}}),
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
        "must be between 0 and 100, got 101",
    ),
    (
        dr(
            subsets=[
                {"name": "v1", "trafficPolicy": {"outlierDetection": {"minHealthPercent": -5}}}
            ]
        ),
        "spec.subsets[0].trafficPolicy.outlierDetection.minHealthPercent",
        "must be between 0 and 100, got -5",
    ),
    # RateLimitPolicy
    (rlp(), "spec", "must set at least one of total, identity or overrides"),
    (rlp(total={}), "spec.total.requestsPerSecond", "spec.total.requestsPerSecond is required"),
    (
        rlp(total={"requestsPerSecond": 0}),
        "spec.total.requestsPerSecond",
        "must be between 1 and 1000000, got 0",
    ),
    (
        rlp(total={"requestsPerSecond": 1.5}),
        "spec.total.requestsPerSecond",
        "must be an integer, got a number",
    ),
    (
        rlp(total={"requestsPerSecond": 10}, identity={"requestsPerSecond": 20}),
        "spec.identity.requestsPerSecond",
        "must not be greater than spec.total.requestsPerSecond (10), got 20",
    ),
    (
        rlp(
            total={"requestsPerSecond": 10},
            overrides=[{"requestsPerSecond": 11, "clientRefs": {"principals": ["td/ns/a/sa/b"]}}],
        ),
        "spec.overrides[0].requestsPerSecond",
        "must not be greater than spec.total.requestsPerSecond (10), got 11",
    ),
    (
        rlp(overrides=[{"requestsPerSecond": 1}]),
        "spec.overrides[0].clientRefs.principals",
        "must list at least one principal",
    ),
    (
        rlp(overrides=[{"requestsPerSecond": 1, "clientRefs": {"principals": ["reviews"]}}]),
        "spec.overrides[0].clientRefs.principals[0]",
        "must be a principal <trust-domain>/ns/<namespace>/sa/<service-account> "
        "(e.g. 'cluster.local/ns/default/sa/reviews'), got 'reviews'",
    ),
    (
        rlp(
            overrides=[
                {
                    "requestsPerSecond": 1,
                    "clientRefs": {"principals": ["spiffe://cluster.local/ns/a/sa/b"]},
                }
            ]
        ),
        "spec.overrides[0].clientRefs.principals[0]",
        "must be Istio's principal form without spiffe:// (e.g. 'cluster.local/ns/a/sa/b')",
    ),
    (
        rlp(
            overrides=[
                {"requestsPerSecond": 1, "clientRefs": {"principals": ["td/ns/a/sa/b"]}},
                {"requestsPerSecond": 2, "clientRefs": {"principals": ["td/ns/a/sa/b"]}},
            ]
        ),
        "spec.overrides[1].clientRefs.principals[0]",
        "'td/ns/a/sa/b' is already listed at spec.overrides[0].clientRefs.principals[0]",
    ),
    (
        rlp(total={"requestsPerSecond": 1}, selector={"matchLabels": {"app": "a b"}}),
        "spec.selector.matchLabels.app",
        "must be a label value",
    ),
    (
        rlp(total={"requestsPerSecond": 1}, targetRef={"kind": "Server", "name": "x"}),
        "spec.targetRef",
        "spec.targetRef is not supported",
    ),
    (
        rlp(
            total={"requestsPerSecond": 1},
            overrides=[{"requestsPerSecond": 1, "clientRefs": [{"kind": "ServiceAccount"}]}],
        ),
        "spec.overrides[0].clientRefs",
        "must be a mapping, got a list",
    ),
]


@pytest.mark.parametrize(("body", "path", "message"), RESILIENCE_REJECTIONS)
def test_resilience_rejection_names_the_field(
    body: dict[str, Any], path: str, message: str
) -> None:
    error = rejection(body)
    assert error.path == path
    assert error.message.startswith(message)


def test_every_resilience_problem_of_a_document_is_reported() -> None:
    body = vs(
        http=[
            rule(
                retries={"attempts": 0, "perTryTimeout": "1s"},
                fault={"abort": {"httpStatus": 99}},
                mirrorPercentage={"value": 5},
            )
        ]
    )
    batch = parse_documents([ResourceDocument(source="r.yaml", index=0, body=body)])
    assert [e.path for e in batch.errors] == [
        "spec.http[0].retries.attempts",
        "spec.http[0].fault.abort.httpStatus",
        "spec.http[0].mirrorPercentage",
    ]
