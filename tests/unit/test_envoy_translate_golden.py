"""Golden tests of the Envoy translation: representative compiled configurations,
translated and compared with tests/golden/envoy/<case>.json (the review artefact).
`UPDATE_GOLDEN=1` rewrites the files. `CASES` is shared with
tests/integration/test_envoy_translate_validate.py, where Envoy validates each one."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mesh.compiled import (
    AuthzPolicy,
    AuthzRule,
    ClaimHeader,
    ClientTls,
    Condition,
    ConnectionPool,
    ConsistentHash,
    Destination,
    DirectResponse,
    ExtAuthzProvider,
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
    InboundPolicy,
    JwtFromHeader,
    JwtRule,
    LoadBalancer,
    Mirror,
    Operation,
    OutlierDetection,
    PeerAuthn,
    PortPolicy,
    RateLimit,
    RateLimitOverride,
    Redirect,
    RequestAuthn,
    RetryPolicy,
    Rewrite,
    RouteTable,
    Source,
    StringMatch,
    Subset,
    TrafficPolicy,
    VirtualHost,
    WeightedDestination,
)
from mesh.compiled_mesh import EntryEndpoint, EntryPort, ExternalService, MeshWideConfig
from mesh.hosts import ServiceRef
from mesh.messages import Endpoint, EndpointSet
from proxy.envoy.resources import XdsResources
from proxy.envoy.translate import MeshView, ProxyNode, translate
from proxy.envoy.translate.protos import to_dict
from proxy.tcp import TcpUpstream

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden" / "envoy"
TD = "cluster.local"
REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"
DETAILS = "details.default.svc.cluster.local"
REDIS = "redis.cache.svc.cluster.local"


def spiffe(ns: str, sa: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{sa}"


def sidecar(**overrides: Any) -> ProxyNode:
    fields: dict[str, Any] = {
        "namespace": "default",
        "service": "productpage",
        "version": "v1",
        "labels": {"app": "productpage", "version": "v1"},
        "identity": spiffe("default", "productpage"),
        "trust_domain": TD,
        "role": "sidecar",
        "inbound": ("0.0.0.0", 15006),
        "outbound": ("127.0.0.1", 15001),
        "app_port": 9080,
    }
    fields.update(overrides)
    return ProxyNode(**fields)


def endpoint(instance: str, ip: str, port: int, **kw: Any) -> Endpoint:
    return Endpoint(instance=instance, address=f"{ip}:{port}", **kw)


def reviews_endpoints() -> EndpointSet:
    ident = spiffe("default", "reviews")
    return EndpointSet(
        namespace="default",
        service="reviews",
        revision=7,
        endpoints=[
            endpoint("reviews-v1-a", "10.0.0.1", 15006, version="v1", identity=ident),
            endpoint("reviews-v2-a", "10.0.0.2", 15006, version="v2", identity=ident),
            endpoint(
                "reviews-v2-b", "10.0.0.3", 15006, version="v2", identity=ident, status="draining"
            ),
            endpoint(
                "reviews-v3-a", "10.0.0.4", 15006, version="v3", identity=ident, status="starting"
            ),
        ],
    )


def ratings_endpoints() -> EndpointSet:
    return EndpointSet(
        namespace="default",
        service="ratings",
        revision=3,
        endpoints=[
            endpoint("ratings-a", "10.0.1.1", 15006, identity=spiffe("default", "ratings")),
            # registered without a sidecar identity: reached in plaintext
            endpoint("ratings-legacy", "10.0.1.2", 8080),
        ],
    )


def case_outbound_default() -> tuple[ProxyNode, MeshView]:
    """No VirtualService anywhere: each known service gets Istio's default route."""
    details = RouteTable(
        namespace="default", service="details", host=DETAILS, revision=2, exists=True
    )
    unknown = RouteTable(
        namespace="default", service="nope", host="nope.default.svc.cluster.local", revision=1
    )
    return sidecar(tracing_cluster="meshwork_traces"), MeshView(
        destinations={
            RATINGS: (None, ratings_endpoints()),
            DETAILS: (details, None),
            "nope.default.svc.cluster.local": (unknown, None),
        }
    )


def reviews_table() -> RouteTable:
    v1 = WeightedDestination(destination=Destination(host=REVIEWS, subset="v1"))
    return RouteTable(
        namespace="default",
        service="reviews",
        host=REVIEWS,
        revision=12,
        has_virtual_service=True,
        exists=True,
        subsets=(
            Subset(name="v1", labels={"version": "v1"}),
            Subset(
                name="v2",
                labels={"version": "v2"},
                traffic_policy=TrafficPolicy(
                    load_balancer=LoadBalancer(
                        consistent_hash=ConsistentHash(
                            http_cookie=HTTPCookie(name="user", path="/", ttl_ms=60_000),
                            minimum_ring_size=2048,
                        )
                    ),
                    connection_pool=ConnectionPool(
                        max_connections=100,
                        http1_max_pending_requests=10,
                        http2_max_requests=50,
                        max_requests_per_connection=1,
                        max_concurrent_streams=16,
                        max_retries=3,
                        connect_timeout_ms=2500,
                    ),
                    outlier_detection=OutlierDetection(
                        consecutive_5xx_errors=3,
                        consecutive_gateway_errors=2,
                        split_external_local_origin_errors=True,
                        interval_ms=5000,
                        base_ejection_time_ms=15_000,
                        max_ejection_percent=50,
                        min_health_percent=25,
                    ),
                ),
            ),
        ),
        traffic_policy=TrafficPolicy(load_balancer=LoadBalancer(simple="LEAST_REQUEST")),
        http=(
            HTTPRoute(
                name="jason",
                match=(
                    HTTPMatch(
                        name="jason-header",
                        headers={"end-user": StringMatch(kind="exact", value="jason")},
                        without_headers={"x-canary": StringMatch(kind="regex", value="*")},
                    ),
                    # only for callers labelled app=reviews-tester: left out here
                    HTTPMatch(
                        uri=StringMatch(kind="prefix", value="/test"),
                        source_labels={"app": "reviews-tester"},
                    ),
                ),
                route=(
                    WeightedDestination(
                        destination=Destination(host=REVIEWS, subset="v2"),
                        headers=Headers(
                            request=HeaderOps(set={"x-subset": "v2", "host": "reviews-v2"}),
                            response=HeaderOps(remove=("x-internal",)),
                        ),
                    ),
                ),
                timeout_ms=1500,
                retries=RetryPolicy(
                    attempts=3,
                    per_try_timeout_ms=500,
                    retry_on=("5xx", "retriable-status-codes", "reset"),
                    retriable_status_codes=(503, 429),
                    backoff_base_ms=50,
                ),
            ),
            HTTPRoute(
                name="api-rewrite",
                match=(
                    HTTPMatch(
                        uri=StringMatch(kind="prefix", value="/API/v1"),
                        ignore_uri_case=True,
                        method=StringMatch(kind="exact", value="GET"),
                        query_params={"debug": StringMatch(kind="exact", value="1")},
                        authority=StringMatch(kind="exact", value="reviews"),
                        port=9080,
                    ),
                ),
                route=(v1,),
                rewrite=Rewrite(uri="/v2", authority="reviews.internal"),
                headers=Headers(
                    request=HeaderOps(add={"x-via": "mesh"}, remove=("cookie",)),
                    response=HeaderOps(set={"cache-control": "no-store"}),
                ),
                retries=RetryPolicy(attempts=0),
            ),
            HTTPRoute(
                name="regex-rewrite",
                match=(HTTPMatch(uri=StringMatch(kind="regex", value="/item/[0-9]+")),),
                route=(v1,),
                rewrite=Rewrite(uri="/item"),
            ),
            HTTPRoute(
                name="old",
                match=(HTTPMatch(uri=StringMatch(kind="exact", value="/old")),),
                redirect=Redirect(
                    uri="/new",
                    authority="reviews.example",
                    port=8443,
                    scheme="https",
                    redirect_code=308,
                ),
            ),
            HTTPRoute(
                name="teapot",
                match=(HTTPMatch(uri=StringMatch(kind="exact", value="/teapot")),),
                direct_response=DirectResponse(status=418, body="short and stout"),
            ),
            HTTPRoute(
                name="only-at-gateway",
                match=(HTTPMatch(gateways=("default/bookinfo-gateway",)),),
                route=(v1,),
            ),
            HTTPRoute(
                name="faulty",
                match=(
                    HTTPMatch(
                        uri=StringMatch(kind="prefix", value="/faulty"), source_namespace="default"
                    ),
                ),
                route=(v1,),
                fault=FaultInjection(
                    delay=FaultDelay(fixed_delay_ms=7000, percentage=10.0),
                    abort=FaultAbort(http_status=500, percentage=0.1),
                ),
            ),
            HTTPRoute(
                name="canary",
                route=(
                    WeightedDestination(
                        destination=Destination(host=REVIEWS, subset="v1"), weight=90
                    ),
                    WeightedDestination(
                        destination=Destination(host=REVIEWS, subset="v3"), weight=10
                    ),
                    WeightedDestination(destination=Destination(host=RATINGS), weight=0),
                ),
                mirror=Mirror(host=RATINGS, percentage=25.0),
            ),
        ),
    )


def case_outbound_routing() -> tuple[ProxyNode, MeshView]:
    """One VirtualService using every rule feature, a DestinationRule with subsets,
    LEAST_REQUEST, ring hash, connection pool and outlier detection."""
    return sidecar(), MeshView(
        destinations={
            REVIEWS: (reviews_table(), reviews_endpoints()),
            RATINGS: (None, ratings_endpoints()),
        }
    )


def reviews_inbound_policy() -> InboundPolicy:
    return InboundPolicy(
        namespace="default",
        service="reviews",
        revision=21,
        peer_authentication=(
            PeerAuthn(name="default", namespace="istio-system", scope="mesh", mode="PERMISSIVE"),
            PeerAuthn(name="strict", namespace="default", scope="namespace", mode="STRICT"),
            PeerAuthn(
                name="redis-open",
                namespace="default",
                scope="workload",
                selector={"app": "reviews"},
                port_modes={6379: "PERMISSIVE"},
            ),
        ),
        authorization=(
            AuthzPolicy(
                name="audit-admin",
                namespace="default",
                action="AUDIT",
                rules=(AuthzRule(operations=(Operation(paths=("/admin*",)),)),),
            ),
            AuthzPolicy(
                name="deny-outsiders",
                namespace="default",
                action="DENY",
                rules=(
                    AuthzRule(
                        sources=(
                            Source(
                                not_namespaces=("default", "team-*"), not_ip_blocks=("10.9.0.0/16",)
                            ),
                        ),
                    ),
                    AuthzRule(
                        operations=(Operation(methods=("DELETE",), not_paths=("/public/*",)),),
                        when=(Condition(key="request.headers[x-debug]", values=("1",)),),
                    ),
                ),
            ),
            AuthzPolicy(
                name="productpage-reads",
                namespace="default",
                selector={"app": "reviews"},
                rules=(
                    AuthzRule(
                        sources=(
                            Source(principals=("cluster.local/ns/default/sa/productpage",)),
                            Source(
                                namespaces=("frontend",), ip_blocks=("10.0.0.0/8", "192.168.1.7")
                            ),
                        ),
                        operations=(
                            Operation(
                                methods=("GET", "HEAD"),
                                paths=("/reviews/*", "/health"),
                                hosts=("reviews", "*.example.com"),
                            ),
                            Operation(ports=("6379",)),
                        ),
                        when=(
                            Condition(key="source.principal", not_values=("*/sa/blocked",)),
                            Condition(key="destination.port", values=("9080", "6379")),
                        ),
                    ),
                    AuthzRule(
                        sources=(Source(principals=("*",)),),
                        operations=(Operation(ports=("1234",)),),
                    ),
                ),
            ),
            # selects other workloads: not applied here
            AuthzPolicy(name="ratings-only", namespace="default", selector={"app": "ratings"}),
        ),
        rate_limits=(
            RateLimit(
                name="reviews-limit",
                namespace="default",
                selector={"app": "reviews"},
                total_rps=100,
                identity_rps=10,
                overrides=(
                    RateLimitOverride(
                        principals=("cluster.local/ns/default/sa/productpage",), rps=50
                    ),
                ),
            ),
        ),
    )


def case_inbound_strict() -> tuple[ProxyNode, MeshView]:
    """A server sidecar under STRICT (a port-level PERMISSIVE for its TCP port), with
    AUDIT/DENY/ALLOW policies, a rate limit, TCP relays both ways and access logs."""
    node = sidecar(
        service="reviews",
        labels={"app": "reviews", "version": "v2"},
        identity=spiffe("default", "reviews"),
        tcp_upstreams=(
            TcpUpstream(service=ServiceRef("cache", "redis"), port=6379, local_port=16379),
        ),
        tcp_inbound=((6379, ("0.0.0.0", 15379)),),
        access_log_cluster="meshwork_access_log",
        tracing_cluster="meshwork_traces",
        trace_sampling=2.5,
    )
    redis = EndpointSet(
        namespace="cache",
        service="redis",
        revision=4,
        endpoints=[
            endpoint(
                "redis-a",
                "10.0.2.1",
                15006,
                identity=spiffe("cache", "redis"),
                tcp_listeners={"6379": "10.0.2.1:15379"},
            ),
            # no TCP listener for 6379: not an endpoint of the relay
            endpoint("redis-b", "10.0.2.2", 15006, identity=spiffe("cache", "redis")),
        ],
    )
    return node, MeshView(
        destinations={RATINGS: (None, ratings_endpoints()), REDIS: (None, redis)},
        inbound=reviews_inbound_policy(),
    )


def case_stats_telemetry() -> tuple[ProxyNode, MeshView]:
    """`--envoy-telemetry stats` (docs/architecture.md §7): `inbound_strict`'s sidecar
    with Envoy's stats access logger on every HCM and the gRPC log filtered to
    failed, flagged and sampled requests (TCP listeners log as before)."""
    node, view = case_inbound_strict()
    return dataclasses.replace(node, telemetry_mode="stats"), view


def case_inbound_permissive_no_app() -> tuple[ProxyNode, MeshView]:
    """No inbound policy at all (PERMISSIVE, no authorization) and no app port."""
    return sidecar(app_port=0, outbound=None), MeshView(destinations={})


def case_gateway() -> tuple[ProxyNode, MeshView]:
    """An ingress gateway: two plaintext listeners, virtual hosts by exact, wildcard
    and short names, a rule limited to this gateway and one limited to the mesh."""
    gateway = GatewayConfig(
        namespace="default",
        name="default/bookinfo-gateway",
        revision=5,
        selector={"istio": "ingressgateway"},
        servers=(GatewayServer(port=8080, hosts=("*",)),),
        virtual_hosts=(
            VirtualHost(
                hosts=("reviews.default.svc.cluster.local", "bookinfo.example.com"),
                http=(
                    HTTPRoute(
                        name="reviews-at-gateway",
                        match=(
                            HTTPMatch(
                                uri=StringMatch(kind="prefix", value="/reviews"),
                                gateways=("default/bookinfo-gateway",),
                            ),
                            HTTPMatch(
                                uri=StringMatch(kind="prefix", value="/mesh-only"),
                                gateways=("mesh",),
                            ),
                        ),
                        route=(
                            WeightedDestination(destination=Destination(host=REVIEWS, subset="v1")),
                        ),
                    ),
                ),
            ),
            VirtualHost(
                hosts=("*.example.com", "bookinfo.example.com"),
                http=(
                    HTTPRoute(
                        name="ratings",
                        route=(WeightedDestination(destination=Destination(host=RATINGS)),),
                        timeout_ms=3000,
                    ),
                ),
            ),
        ),
    )
    node = sidecar(
        service="istio-ingressgateway",
        labels={"istio": "ingressgateway"},
        identity=spiffe("default", "istio-ingressgateway"),
        role="gateway",
        inbound=None,
        outbound=None,
        app_port=0,
        gateway_listeners=(("0.0.0.0", 8080), ("0.0.0.0", 8081)),
        access_log_cluster="meshwork_access_log",
        tracing_cluster="meshwork_traces",
    )
    return node, MeshView(
        destinations={
            REVIEWS: (reviews_table(), reviews_endpoints()),
            RATINGS: (None, ratings_endpoints()),
        },
        gateway=gateway,
    )


# a fixed public key (RFC 7517 appendix A.1): the golden file must not change per run
JWKS = (
    '{"keys": [{"kty": "EC", "crv": "P-256", "kid": "1", '
    '"x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4", '
    '"y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}]}'
)


def case_inbound_jwt() -> tuple[ProxyNode, MeshView]:
    """Istio's authz-jwt task: a RequestAuthentication with inline keys, one with a
    jwksUri, and ALLOW/DENY rules on request principals, claims and audiences."""
    policy = InboundPolicy(
        namespace="foo",
        service="httpbin",
        revision=3,
        request_authentication=(
            RequestAuthn(
                name="jwt-example",
                namespace="foo",
                selector={"app": "httpbin"},
                rules=(
                    JwtRule(
                        issuer="testing@secure.istio.io",
                        jwks=JWKS,
                        output_payload_to_header="x-jwt-payload",
                    ),
                    JwtRule(
                        issuer="https://accounts.example.com",
                        audiences=("httpbin",),
                        jwks_uri="https://keys.example.com/.well-known/jwks.json",
                        from_headers=(JwtFromHeader(name="x-jwt", prefix="Tok "),),
                        from_params=("my_token",),
                        from_cookies=("session",),
                        output_claim_to_headers=(ClaimHeader(header="x-sub", claim="sub"),),
                        forward_original_token=True,
                        timeout_ms=2000,
                    ),
                ),
            ),
        ),
        authorization=(
            AuthzPolicy(
                name="require-jwt",
                namespace="foo",
                selector={"app": "httpbin"},
                rules=(
                    AuthzRule(
                        sources=(
                            Source(
                                request_principals=(
                                    "testing@secure.istio.io/testing@secure.istio.io",
                                    "https://accounts.example.com/*",
                                    "*/admin",
                                )
                            ),
                        ),
                        when=(
                            Condition(key="request.auth.claims[groups]", values=("group1",)),
                            Condition(key="request.auth.claims[org][team]", not_values=("x*",)),
                            Condition(key="request.auth.audiences", values=("httpbin",)),
                        ),
                    ),
                ),
            ),
            AuthzPolicy(
                name="deny-anonymous",
                namespace="foo",
                action="DENY",
                rules=(AuthzRule(sources=(Source(not_request_principals=("*",)),)),),
            ),
        ),
    )
    node = sidecar(
        namespace="foo",
        service="httpbin",
        labels={"app": "httpbin", "version": "v1"},
        identity=spiffe("foo", "httpbin"),
        app_port=8000,
        jwks_ca_file="/etc/ssl/certs/ca-certificates.crt",
    )
    return node, MeshView(destinations={}, inbound=policy)


EXT_AUTHZ = "ext-authz.foo.svc.cluster.local"


def case_inbound_ext_authz() -> tuple[ProxyNode, MeshView]:
    """Istio's authz-custom task: a CUSTOM policy on /headers with an HTTP ext_authz
    provider (a mesh service), a CUSTOM policy naming an undefined provider (denies),
    and a DENY policy after them."""
    provider = ExtAuthzProvider(
        name="sample-ext-authz-http",
        service="ext-authz.foo.svc.cluster.local",
        port=8000,
        timeout_ms=500,
        path_prefix="/check",
        status_on_error=503,
        include_request_headers=("x-ext-authz",),
        headers_to_upstream_on_allow=("x-ext-authz-check-result",),
        headers_to_downstream_on_deny=("x-ext-authz-check-result", "content-type"),
    )
    policy = InboundPolicy(
        namespace="foo",
        service="httpbin",
        revision=4,
        authorization=(
            AuthzPolicy(
                name="ext-authz",
                namespace="foo",
                action="CUSTOM",
                provider="sample-ext-authz-http",
                selector={"app": "httpbin"},
                rules=(AuthzRule(operations=(Operation(paths=("/headers",)),)),),
            ),
            AuthzPolicy(
                name="undefined-provider",
                namespace="foo",
                action="CUSTOM",
                provider="not-in-mesh-config",
                rules=(AuthzRule(operations=(Operation(paths=("/private*",)),)),),
            ),
            AuthzPolicy(
                name="no-admin",
                namespace="foo",
                action="DENY",
                rules=(AuthzRule(operations=(Operation(paths=("/admin*",)),)),),
            ),
        ),
        extension_providers=(provider,),
    )
    authz_endpoints = EndpointSet(
        namespace="foo",
        service="ext-authz",
        revision=2,
        endpoints=[endpoint("ext-authz-1", "10.0.3.1", 15006, identity=spiffe("foo", "ext-authz"))],
    )
    node = sidecar(
        namespace="foo",
        service="httpbin",
        labels={"app": "httpbin", "version": "v1"},
        identity=spiffe("foo", "httpbin"),
        app_port=8000,
        outbound=None,
    )
    return node, MeshView(destinations={EXT_AUTHZ: (None, authz_endpoints)}, inbound=policy)


def case_inbound_grpc_app() -> tuple[ProxyNode, MeshView]:
    """A gRPC app (`--app-protocol grpc`): the inbound listener offers ALPN h2 and
    the app is spoken to in HTTP/2 cleartext."""
    return sidecar(app_h2c=True, outbound=None), MeshView(destinations={})


def case_outbound_intercepted() -> tuple[ProxyNode, MeshView]:
    """An intercepted app (docs/architecture.md §5.4): the capture listener on the host
    side of the app's veth (original destination; a service's virtual IP and TCP port
    to its TCP listeners; HTTP detected to the outbound routes; anything else to
    BlackHoleCluster), the app reached at its namespace address; raw addresses of
    the instances: their TCP listener relayed to that instance, HTTP to the inbound
    listener routed by the instance's service; no HTTP detection on opaque ports."""
    redis = EndpointSet(
        namespace="cache",
        service="redis",
        revision=4,
        endpoints=[
            endpoint(
                "redis-a",
                "10.0.2.1",
                15006,
                identity=spiffe("cache", "redis"),
                tcp_listeners={"6379": "10.0.2.1:15379"},
            )
        ],
    )
    # `--opaque-ports`: no HTTP detection on 3306
    node = sidecar(capture=("100.127.0.1", 15001), app_host="100.127.0.2", opaque_ports=(3306,))
    return node, MeshView(
        destinations={RATINGS: (None, ratings_endpoints()), REDIS: (None, redis)},
        # ratings has no TCP port: no chain of its own (its HTTP goes by Host)
        vips={REDIS: "240.240.3.4", RATINGS: "240.240.3.5"},
    )


def case_outbound_egress() -> tuple[ProxyNode, MeshView]:
    """Istio's egress TLS-origination task (a STATIC ServiceEntry whose port 80 goes to
    443, SIMPLE TLS on that port with SNI and SANs), a DNS ServiceEntry with subsets by
    endpoint label, weights and TLS DISABLE, routed to one subset by a VirtualService,
    ALLOW_ANY for every other host, and a mesh service's portLevelSettings."""
    api_table = RouteTable(
        namespace="default",
        service="api.example.test",
        host="api.example.test",
        revision=3,
        traffic_policy=TrafficPolicy(
            port_level=(
                PortPolicy(
                    port=80,
                    traffic_policy=TrafficPolicy(
                        tls=ClientTls(
                            mode="SIMPLE",
                            ca_certificates="/etc/ssl/certs/ca-certificates.crt",
                            sni="api.example.test",
                            subject_alt_names=("api.example.test",),
                        )
                    ),
                ),
            )
        ),
    )
    legacy_table = RouteTable(
        namespace="default",
        service="legacy.example.test",
        host="legacy.example.test",
        revision=3,
        has_virtual_service=True,
        http=(
            HTTPRoute(
                timeout_ms=5000,
                route=(
                    WeightedDestination(
                        destination=Destination(host="legacy.example.test", subset="v2")
                    ),
                ),
            ),
        ),
        traffic_policy=TrafficPolicy(tls=ClientTls(mode="DISABLE")),
        subsets=(
            Subset(name="v1", labels={"version": "v1"}),
            Subset(name="v2", labels={"version": "v2"}),
        ),
    )
    mesh_wide = MeshWideConfig(
        revision=3,
        outbound_traffic_policy="ALLOW_ANY",
        services=(
            ExternalService(
                host="api.example.test",
                namespace="default",
                name="api",
                resolution="STATIC",
                ports=(
                    EntryPort(number=80, name="http", target_port=443),
                    EntryPort(number=443, name="https", protocol="HTTPS"),
                ),
                endpoints=(EntryEndpoint(address="10.0.5.1"),),
                table=api_table,
            ),
            ExternalService(
                host="legacy.example.test",
                namespace="default",
                name="legacy",
                resolution="DNS",
                ports=(EntryPort(number=8080, name="http"),),
                endpoints=(
                    EntryEndpoint(address="legacy-a.example.test", labels={"version": "v1"}),
                    EntryEndpoint(
                        address="legacy-b.example.test",
                        labels={"version": "v2"},
                        ports={"http": 9080},
                        weight=3,
                    ),
                ),
                table=legacy_table,
            ),
            ExternalService(
                host="hidden.example.test",
                namespace="other",
                name="hidden",
                export_to=("other",),
                table=RouteTable(
                    namespace="other",
                    service="hidden.example.test",
                    host="hidden.example.test",
                    revision=3,
                ),
            ),
        ),
    )
    # a mesh service with portLevelSettings: requests naming :9080 get that port's
    # cluster (plaintext), every other port the service's cluster (mTLS)
    ratings_table = RouteTable(
        namespace="default",
        service="ratings",
        host=RATINGS,
        revision=3,
        exists=True,
        traffic_policy=TrafficPolicy(
            port_level=(
                PortPolicy(port=9080, traffic_policy=TrafficPolicy(tls=ClientTls(mode="DISABLE"))),
            )
        ),
    )
    return sidecar(), MeshView(
        destinations={RATINGS: (ratings_table, ratings_endpoints())}, mesh_wide=mesh_wide
    )


CASES: dict[str, Callable[[], tuple[ProxyNode, MeshView]]] = {
    "outbound_egress": case_outbound_egress,
    "outbound_default": case_outbound_default,
    "outbound_routing": case_outbound_routing,
    "outbound_intercepted": case_outbound_intercepted,
    "inbound_strict": case_inbound_strict,
    "inbound_permissive_no_app": case_inbound_permissive_no_app,
    "gateway": case_gateway,
    "inbound_jwt": case_inbound_jwt,
    "inbound_ext_authz": case_inbound_ext_authz,
    "inbound_grpc_app": case_inbound_grpc_app,
    "stats_telemetry": case_stats_telemetry,
}


def resources_json(resources: XdsResources) -> dict[str, Any]:
    """The translation as sorted JSON-able dicts, by resource type and name."""
    return {
        kind: {name: to_dict(message) for name, message in sorted(by_name.items())}
        for kind, by_name in (
            ("listeners", resources.listeners),
            ("routes", resources.routes),
            ("clusters", resources.clusters),
            ("endpoints", resources.endpoints),
        )
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    node, view = CASES[case]()
    got = json.dumps(resources_json(translate(node, view)), indent=2, sort_keys=True) + "\n"
    path = GOLDEN_DIR / f"{case}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 and review it"
    assert got == path.read_text(), f"{case}: translation differs from {path} (UPDATE_GOLDEN=1)"


@pytest.mark.parametrize("case", sorted(CASES))
def test_socket_listeners_bind_without_reuse_port(case: str) -> None:
    """Envoy sets SO_REUSEPORT unless told not to: two Envoys would then share a port
    silently (issue 14). Every listener with a socket address says no; the internal
    tunnel listener has no socket."""
    node, view = CASES[case]()
    listeners = translate(node, view).listeners
    sockets = {name: m for name, m in listeners.items() if m.address.HasField("socket_address")}
    assert sockets, f"{case}: no socket listener translated"
    for name, message in sockets.items():
        assert message.HasField("enable_reuse_port"), f"{case}: {name} leaves reuse port default"
        assert message.enable_reuse_port.value is False, f"{case}: {name} reuses ports"


def test_capture_unknown_destinations_follow_the_outbound_traffic_policy() -> None:
    """REGISTRY_ONLY (the default, and while no mesh-wide config is known): the capture
    listener's default chain goes to BlackHoleCluster; ALLOW_ANY: to the original
    destination (an ORIGINAL_DST cluster), as the Python capture's PASSTHROUGH."""
    node, view = case_outbound_intercepted()

    def default_cluster(view: MeshView) -> tuple[str, dict[str, Any]]:
        out = resources_json(translate(node, view))
        chain = out["listeners"]["virtual_outbound"]["defaultFilterChain"]
        cluster = chain["filters"][0]["typedConfig"]["cluster"]
        return cluster, out["clusters"]

    assert default_cluster(view)[0] == "BlackHoleCluster"
    for policy in ("REGISTRY_ONLY", "ALLOW_ANY"):
        wide = MeshWideConfig(revision=1, outbound_traffic_policy=policy)  # type: ignore[arg-type]
        cluster, clusters = default_cluster(dataclasses.replace(view, mesh_wide=wide))
        if policy == "REGISTRY_ONLY":
            assert cluster == "BlackHoleCluster" and "OriginalDstPassthrough" not in clusters
        else:
            assert cluster == "OriginalDstPassthrough"
            assert clusters[cluster]["type"] == "ORIGINAL_DST"
            assert clusters[cluster]["lbPolicy"] == "CLUSTER_PROVIDED"
