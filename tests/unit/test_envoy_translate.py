"""Semantics of the Envoy translation, one rule at a time (the goldens show the whole
output; these pin down the decisions that matter)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mesh.compiled import (
    AuthzPolicy,
    AuthzRule,
    Condition,
    ConsistentHash,
    Destination,
    GatewayConfig,
    GatewayServer,
    HTTPMatch,
    HTTPRoute,
    InboundPolicy,
    LoadBalancer,
    Operation,
    PeerAuthn,
    Redirect,
    RetryPolicy,
    RouteTable,
    Source,
    StringMatch,
    Subset,
    TrafficPolicy,
    WeightedDestination,
)
from mesh.messages import Endpoint, EndpointSet
from proxy.envoy.resources import TRUST_BUNDLE, WORKLOAD_CERT
from proxy.envoy.translate import (
    MeshView,
    TranslationError,
    rbac_route,
    referenced_hosts,
    tls_secrets,
    translate,
)
from proxy.envoy.translate.connect import CONNECT_ROUTE
from proxy.envoy.translate.protos import to_dict
from tests.unit.test_envoy_translate_golden import RATINGS, REVIEWS, sidecar, spiffe

V1 = WeightedDestination(destination=Destination(host=REVIEWS, subset="v1"))


def table(*http: HTTPRoute, **kw: Any) -> RouteTable:
    fields: dict[str, Any] = {
        "namespace": "default",
        "service": "reviews",
        "host": REVIEWS,
        "revision": 1,
        "exists": True,
        "has_virtual_service": bool(http),
        "subsets": (Subset(name="v1", labels={"version": "v1"}),),
        "http": http,
    }
    fields.update(kw)
    return RouteTable(**fields)


def reviews_routes(tbl: RouteTable, node: Any = None, **view: Any) -> list[dict[str, Any]]:
    out = translate(node or sidecar(), MeshView(destinations={REVIEWS: (tbl, None)}, **view))
    config = to_dict(out.routes["outbound_http"])
    (vhost,) = [v for v in config["virtualHosts"] if v["name"] == REVIEWS]
    # every known service's first route terminates a CONNECT (tested on its own)
    connect, *routes = vhost.get("routes", [])
    assert connect == CONNECT_ROUTE
    return routes


def ep(instance: str, **kw: Any) -> Endpoint:
    kw.setdefault("address", "10.0.0.1:15006")
    return Endpoint(instance=instance, **kw)


def endpoints_of(resources: Any, cluster: str) -> list[dict[str, Any]]:
    cla = to_dict(resources.endpoints[cluster])
    return [lb for group in cla.get("endpoints", []) for lb in group["lbEndpoints"]]


# ---------------------------------------------------------------- routes


def test_matches_about_other_callers_are_dropped_and_a_rule_left_without_any_disappears() -> None:
    routes = reviews_routes(
        table(
            HTTPRoute(
                name="tester-only",
                match=(HTTPMatch(source_labels={"app": "tester"}),),
                route=(V1,),
            ),
            HTTPRoute(
                name="mixed",
                match=(
                    HTTPMatch(name="other-ns", source_namespace="elsewhere"),
                    HTTPMatch(
                        name="ours",
                        source_labels={"app": "productpage"},
                        source_namespace="default",
                    ),
                    HTTPMatch(name="at-gateway", gateways=("default/gw",)),
                    HTTPMatch(name="in-mesh", gateways=("mesh", "default/gw")),
                ),
                route=(V1,),
            ),
        )
    )
    assert [r["name"] for r in routes] == ["ours", "in-mesh"]


def test_no_virtual_service_gives_the_default_route_and_an_empty_one_gives_404() -> None:
    (default,) = reviews_routes(table())
    assert default["route"]["cluster"] == f"outbound|0||{REVIEWS}"
    assert default["route"]["retryPolicy"]["numRetries"] == 2  # Istio's default policy
    assert reviews_routes(table(has_virtual_service=True)) == []


def test_a_destination_the_mesh_does_not_know_has_no_virtual_host() -> None:
    unknown = RouteTable(
        namespace="default", service="nope", host="nope.default.svc.cluster.local", revision=1
    )
    out = translate(sidecar(), MeshView(destinations={unknown.host: (unknown, None)}))
    names = [v["name"] for v in to_dict(out.routes["outbound_http"])["virtualHosts"]]
    assert names == ["unknown_host"]


def test_short_names_only_for_services_of_the_callers_namespace() -> None:
    other = "ratings.other.svc.cluster.local"
    out = translate(
        sidecar(),
        MeshView(
            destinations={
                REVIEWS: (table(), None),
                other: (
                    None,
                    EndpointSet(
                        namespace="other", service="ratings", revision=1, endpoints=[ep("r")]
                    ),
                ),
            }
        ),
    )
    domains = {
        v["name"]: v["domains"] for v in to_dict(out.routes["outbound_http"])["virtualHosts"]
    }
    assert domains[REVIEWS][0] == "reviews"
    assert "ratings" not in domains[other] and "ratings.other" in domains[other]


def test_rewrite_replaces_the_prefix_after_a_prefix_match_and_the_path_otherwise() -> None:
    from mesh.compiled import Rewrite

    routes = reviews_routes(
        table(
            HTTPRoute(
                match=(HTTPMatch(uri=StringMatch(kind="prefix", value="/a")),),
                route=(V1,),
                rewrite=Rewrite(uri="/b"),
            ),
            HTTPRoute(
                match=(HTTPMatch(uri=StringMatch(kind="exact", value="/c")),),
                route=(V1,),
                rewrite=Rewrite(uri="/d"),
            ),
        )
    )
    assert routes[0]["route"]["prefixRewrite"] == "/b"
    assert routes[1]["route"]["regexRewrite"] == {
        "pattern": {"regex": "^.*$"},
        "substitution": "/d",
    }


def test_retries_off_and_all_zero_weights() -> None:
    routes = reviews_routes(
        table(
            HTTPRoute(name="no-retry", route=(V1,), retries=RetryPolicy(attempts=0)),
        )
    )
    assert "retryPolicy" not in routes[0]["route"]
    zero = HTTPRoute(
        name="zero",
        route=(
            WeightedDestination(destination=Destination(host=REVIEWS), weight=0),
            WeightedDestination(destination=Destination(host=REVIEWS, subset="v1"), weight=0),
        ),
    )
    (route,) = reviews_routes(table(zero))
    assert route["directResponse"]["status"] == 503  # the Python proxy's 503 NC


def test_untranslatable_rules_raise_naming_the_field() -> None:
    bad_host = HTTPRoute(route=(WeightedDestination(destination=Destination(host="example.com")),))
    with pytest.raises(
        TranslationError, match=r"http\[0\].route\[0\].destination: host='example.com'"
    ):
        reviews_routes(table(bad_host))
    bad_code = HTTPRoute(redirect=Redirect(uri="/x", redirect_code=305))
    with pytest.raises(TranslationError, match="redirect_code=305"):
        reviews_routes(table(bad_code))
    bad_retry = HTTPRoute(route=(V1,), retries=RetryPolicy(retry_on=("sometimes",)))
    with pytest.raises(TranslationError, match="sometimes"):
        reviews_routes(table(bad_retry))


def test_one_rule_cannot_hash_two_destinations_on_different_keys() -> None:
    def subset(name: str, header: str) -> Subset:
        lb = LoadBalancer(consistent_hash=ConsistentHash(http_header_name=header))
        return Subset(
            name=name, labels={"version": name}, traffic_policy=TrafficPolicy(load_balancer=lb)
        )

    split = HTTPRoute(
        route=(
            WeightedDestination(destination=Destination(host=REVIEWS, subset="v1"), weight=50),
            WeightedDestination(destination=Destination(host=REVIEWS, subset="v2"), weight=50),
        )
    )
    same = table(split, subsets=(subset("v1", "x-user"), subset("v2", "x-user")))
    assert reviews_routes(same)[0]["route"]["hashPolicy"] == [{"header": {"headerName": "x-user"}}]
    differ = table(split, subsets=(subset("v1", "x-user"), subset("v2", "x-session")))
    with pytest.raises(TranslationError, match="different keys"):
        reviews_routes(differ)


# ---------------------------------------------------------------- clusters and endpoints


def test_subset_clusters_hold_the_endpoints_with_the_subsets_labels() -> None:
    eps = EndpointSet(
        namespace="default",
        service="reviews",
        revision=1,
        endpoints=[
            ep("by-version-field", version="v1", address="10.0.0.1:1"),
            ep("by-label", labels={"version": "v1"}, address="10.0.0.2:1"),
            ep("other", version="v2", address="10.0.0.3:1"),
        ],
    )
    out = translate(sidecar(), MeshView(destinations={REVIEWS: (table(), eps)}))
    v1 = [e["endpoint"]["hostname"] for e in endpoints_of(out, f"outbound|0|v1|{REVIEWS}")]
    assert v1 == ["by-version-field", "by-label"]
    assert len(endpoints_of(out, f"outbound|0||{REVIEWS}")) == 3


def test_starting_left_out_draining_marked_unless_all_are_draining() -> None:
    eps = EndpointSet(
        namespace="default",
        service="reviews",
        revision=1,
        endpoints=[
            ep("up", version="v1", address="10.0.0.1:1"),
            ep("leaving", version="v1", address="10.0.0.2:1", status="draining"),
            ep("booting", version="v1", address="10.0.0.3:1", status="starting"),
            ep("last", version="v2", address="10.0.0.4:1", status="draining"),
        ],
    )
    tbl = table(
        subsets=(
            Subset(name="v1", labels={"version": "v1"}),
            Subset(name="v2", labels={"version": "v2"}),
        )
    )
    out = translate(sidecar(), MeshView(destinations={REVIEWS: (tbl, eps)}))
    v1 = {
        e["endpoint"]["hostname"]: e["healthStatus"]
        for e in endpoints_of(out, f"outbound|0|v1|{REVIEWS}")
    }
    assert v1 == {"up": "HEALTHY", "leaving": "DRAINING"}
    # only draining ones left: they keep serving (an empty set would fail everything)
    v2 = {
        e["endpoint"]["hostname"]: e["healthStatus"]
        for e in endpoints_of(out, f"outbound|0|v2|{REVIEWS}")
    }
    assert v2 == {"last": "HEALTHY"}


def test_each_identity_gets_its_own_mtls_check_and_identityless_endpoints_plaintext() -> None:
    eps = EndpointSet(
        namespace="default",
        service="ratings",
        revision=1,
        endpoints=[
            ep("a", identity=spiffe("default", "ratings"), address="10.0.0.1:1"),
            ep("b", identity=spiffe("default", "ratings-canary"), address="10.0.0.2:1"),
            ep("c", address="10.0.0.3:1"),
        ],
    )
    out = translate(sidecar(), MeshView(destinations={RATINGS: (None, eps)}))
    cluster = to_dict(out.clusters[f"outbound|0||{RATINGS}"])
    matches = cluster["transportSocketMatches"]
    assert [m["match"] for m in matches] == [
        {"identity": spiffe("default", "ratings")},
        {"identity": spiffe("default", "ratings-canary")},
    ]
    context = matches[0]["transportSocket"]["typedConfig"]["commonTlsContext"]
    assert context["combinedValidationContext"]["defaultValidationContext"][
        "matchTypedSubjectAltNames"
    ] == [{"sanType": "URI", "matcher": {"exact": spiffe("default", "ratings")}}]
    # no fixed ALPN: Envoy offers the protocol the request came in (h2 or http/1.1)
    assert "alpnProtocols" not in context
    protocol = cluster["typedExtensionProtocolOptions"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert set(protocol["useDownstreamProtocolConfig"]) == {
        "httpProtocolOptions",
        "http2ProtocolOptions",
    }
    assert cluster["transportSocket"]["name"] == "envoy.transport_sockets.raw_buffer"
    untagged = [e for e in endpoints_of(out, f"outbound|0||{RATINGS}") if "metadata" not in e]
    assert [e["endpoint"]["hostname"] for e in untagged] == ["c"]


def test_unknown_subset_has_no_cluster_and_routes_to_it_answer_503() -> None:
    route = HTTPRoute(
        route=(WeightedDestination(destination=Destination(host=REVIEWS, subset="v9")),)
    )
    out = translate(sidecar(), MeshView(destinations={REVIEWS: (table(route), None)}))
    assert f"outbound|0|v9|{REVIEWS}" not in out.clusters
    assert to_dict(out.routes["outbound_http"])["validateClusters"] is False


def test_an_endpoint_address_that_is_not_ip_port_is_refused() -> None:
    eps = EndpointSet(
        namespace="default",
        service="reviews",
        revision=1,
        endpoints=[ep("bad", address="reviews-1.local:15006")],
    )
    with pytest.raises(TranslationError, match=r"bad.*reviews-1\.local:15006"):
        translate(sidecar(), MeshView(destinations={REVIEWS: (None, eps)}))


def test_referenced_hosts_names_route_and_mirror_destinations() -> None:
    from mesh.compiled import Mirror

    route = HTTPRoute(route=(V1,), mirror=Mirror(host=RATINGS))
    assert referenced_hosts(sidecar(), MeshView(destinations={REVIEWS: (table(route), None)})) == {
        REVIEWS,
        RATINGS,
    }


# ---------------------------------------------------------------- inbound


def inbound_listener(policy: InboundPolicy, node: Any = None) -> dict[str, Any]:
    out = translate(node or sidecar(), MeshView(destinations={}, inbound=policy))
    return to_dict(out.listeners["inbound_http"])


def policy(**kw: Any) -> InboundPolicy:
    return InboundPolicy(namespace="default", service="productpage", revision=1, **kw)


def chains(listener: dict[str, Any]) -> list[str]:
    return [c["filterChainMatch"]["transportProtocol"] for c in listener["filterChains"]]


def test_strict_accepts_tls_only_permissive_and_disable_accept_both() -> None:
    strict = PeerAuthn(name="s", namespace="default", scope="namespace", mode="STRICT")
    assert chains(inbound_listener(policy(peer_authentication=(strict,)))) == ["tls"]
    assert chains(inbound_listener(policy())) == ["tls", "raw_buffer"]
    off = PeerAuthn(name="d", namespace="default", scope="namespace", mode="DISABLE")
    assert chains(inbound_listener(policy(peer_authentication=(off,)))) == ["tls", "raw_buffer"]
    tls_socket = inbound_listener(policy())["filterChains"][0]["transportSocket"]["typedConfig"]
    assert tls_socket["requireClientCertificate"] is True


def test_port_level_mode_applies_to_its_port_only() -> None:
    workload = PeerAuthn(
        name="w",
        namespace="default",
        scope="workload",
        selector={"app": "productpage"},
        mode="STRICT",
        port_modes={9080: "PERMISSIVE"},
    )
    assert chains(inbound_listener(policy(peer_authentication=(workload,)))) == [
        "tls",
        "raw_buffer",
    ]
    node = sidecar(app_port=8000)
    assert chains(inbound_listener(policy(peer_authentication=(workload,)), node)) == ["tls"]


def inbound_route(policy: InboundPolicy, node: Any = None) -> dict[str, Any]:
    out = translate(node or sidecar(), MeshView(destinations={}, inbound=policy))
    return to_dict(out.routes["inbound_http"])


def rbac_filters(route: dict[str, Any]) -> list[dict[str, Any]]:
    """The RBAC rules in force on the inbound, in the order their filters run: each
    slot's per-route configuration (the listener's slots have no rules of their own)."""
    per_filter = route["virtualHosts"][0].get("typedPerFilterConfig", {})
    return [per_filter[name]["rbac"] for _, name in rbac_route.SLOTS if name in per_filter]


def test_principals_are_istio_form_matched_against_the_spiffe_uri() -> None:
    allow = AuthzPolicy(
        name="a",
        namespace="default",
        rules=(
            AuthzRule(
                sources=(
                    Source(
                        principals=(
                            "cluster.local/ns/default/sa/reviews",
                            "*",
                            "cluster.local/ns/x/*",
                        )
                    ),
                ),
            ),
        ),
    )
    (f,) = rbac_filters(inbound_route(policy(authorization=(allow,))))
    ids = f["rules"]["policies"]["default/a[0]"]["principals"][0]["orIds"]["ids"]
    assert [i["authenticated"]["principalName"] for i in ids] == [
        {"exact": "spiffe://cluster.local/ns/default/sa/reviews"},
        {"safeRegex": {"regex": "spiffe://.+"}},  # any authenticated caller
        {"prefix": "spiffe://cluster.local/ns/x/"},
    ]


def test_policy_order_and_selectors() -> None:
    policies = (
        AuthzPolicy(name="allow", namespace="default", rules=(AuthzRule(),)),
        AuthzPolicy(name="deny", namespace="default", action="DENY", rules=(AuthzRule(),)),
        AuthzPolicy(name="audit", namespace="default", action="AUDIT", rules=(AuthzRule(),)),
        AuthzPolicy(
            name="elsewhere",
            namespace="default",
            action="DENY",
            selector={"app": "ratings"},
            rules=(AuthzRule(),),
        ),
    )
    filters = rbac_filters(inbound_route(policy(authorization=policies)))
    assert [
        (f["rules"].get("action", "ALLOW"), list(f["rules"].get("policies", {}))) for f in filters
    ] == [
        ("LOG", ["default/audit[0]"]),
        ("DENY", ["default/deny[0]"]),
        ("ALLOW", ["default/allow[0]"]),
    ]


def test_an_allow_policy_without_rules_denies_everything() -> None:
    (f,) = rbac_filters(
        inbound_route(policy(authorization=(AuthzPolicy(name="nothing", namespace="default"),)))
    )
    assert f["rules"].get("policies", {}) == {}  # ALLOW with no policy: nothing allowed


def test_ports_are_decided_for_the_listeners_port() -> None:
    rule = AuthzRule(operations=(Operation(ports=("8000",)),))
    (f,) = rbac_filters(
        inbound_route(
            policy(
                authorization=(AuthzPolicy(name="other-port", namespace="default", rules=(rule,)),)
            )
        )
    )
    assert f["rules"].get("policies", {}) == {}
    (f,) = rbac_filters(
        inbound_route(
            policy(
                authorization=(AuthzPolicy(name="other-port", namespace="default", rules=(rule,)),)
            ),
            sidecar(app_port=8000),
        )
    )
    assert f["rules"]["policies"]["default/other-port[0]"]["permissions"] == [{"any": True}]


def test_unevaluable_conditions_fail_closed_both_ways() -> None:
    when = (
        Condition(key="experimental.envoy.filters.network.mysql_proxy[db.table]", values=("x",)),
    )
    allow = AuthzPolicy(name="a", namespace="default", rules=(AuthzRule(when=when),))
    deny = AuthzPolicy(name="d", namespace="default", action="DENY", rules=(AuthzRule(when=when),))
    filters = rbac_filters(inbound_route(policy(authorization=(allow, deny))))
    by_action = {f["rules"].get("action", "ALLOW"): f["rules"]["policies"] for f in filters}
    assert by_action["ALLOW"]["default/a[0]"]["permissions"] == [{"notRule": {"any": True}}]
    assert by_action["DENY"]["default/d[0]"]["permissions"] == [{"any": True}]


def test_tcp_rules_with_http_fields_never_allow_and_always_deny() -> None:
    http_rule = AuthzRule(operations=(Operation(methods=("GET",)),))
    policies = (
        AuthzPolicy(name="a", namespace="default", rules=(http_rule,)),
        AuthzPolicy(name="d", namespace="default", action="DENY", rules=(http_rule,)),
    )
    node = sidecar(tcp_inbound=((6379, ("0.0.0.0", 15379)),))
    out = translate(node, MeshView(destinations={}, inbound=policy(authorization=policies)))
    listener = to_dict(out.listeners["inbound_tcp|6379"])
    filters = [f["typedConfig"] for f in listener["filterChains"][0]["filters"]]
    deny, allow = filters[0]["rules"], filters[1]["rules"]
    assert deny["action"] == "DENY"
    assert deny["policies"]["default/d[0]"]["permissions"] == [{"any": True}]
    assert allow.get("policies", {}) == {}
    assert filters[2]["cluster"] == "inbound|6379||"


def test_inbound_sets_xfcc_from_the_certificate_only() -> None:
    hcm = inbound_listener(policy())["filterChains"][0]["filters"][0]["typedConfig"]
    assert hcm["forwardClientCertDetails"] == "SANITIZE_SET"
    assert hcm["setCurrentClientCertDetails"] == {"uri": True}


# ---------------------------------------------------------------- gateway and secrets


def test_gateway_servers_other_than_plaintext_http_are_refused() -> None:
    config = GatewayConfig(
        namespace="default",
        name="default/gw",
        revision=1,
        servers=(GatewayServer(port=443, protocol="HTTPS"),),
    )
    node = sidecar(
        role="gateway",
        inbound=None,
        outbound=None,
        app_port=0,
        gateway_listeners=(("0.0.0.0", 8443),),
    )
    with pytest.raises(TranslationError, match=r"servers\[0\].protocol='HTTPS'"):
        translate(node, MeshView(destinations={}, gateway=config))


def test_tls_secrets_are_named_for_sds_and_refuse_non_pem() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    key = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"
    secrets = tls_secrets(pem, key, pem)
    assert set(secrets) == {WORKLOAD_CERT, TRUST_BUNDLE}
    assert to_dict(secrets[TRUST_BUNDLE])["validationContext"]["trustedCa"]["inlineString"] == pem
    with pytest.raises(TranslationError, match="private_key_pem") as err:
        tls_secrets(pem, "not a key", pem)
    assert "not a key" not in str(err.value)  # key material never reaches a message


def test_every_http_listener_relays_websocket_upgrades() -> None:
    node = sidecar(tcp_inbound=())
    out = translate(node, MeshView(destinations={}))
    for name, upgrades in (
        ("outbound_http", ["websocket", "CONNECT"]),
        ("outbound_tunnel", ["websocket"]),
        ("inbound_http", ["websocket"]),
    ):
        hcm = to_dict(out.listeners[name])["filterChains"][0]["filters"][0]["typedConfig"]
        assert [u["upgradeType"] for u in hcm["upgradeConfigs"]] == upgrades, name


def test_a_connect_to_a_mesh_service_is_served_on_the_outbound_routes() -> None:
    """CONNECT (gRPC clients given HTTP_PROXY) is terminated for every known service
    and its tunnel served by an internal listener on the same route configuration;
    the CONNECT itself stays out of the access log."""
    node = sidecar(tcp_inbound=(), access_log_cluster="als")
    out = translate(node, MeshView(destinations={REVIEWS: (table(), None)}))
    config = to_dict(out.routes["outbound_http"])
    by_name = {v["name"]: v["routes"] for v in config["virtualHosts"]}
    assert by_name[REVIEWS][0]["match"] == {"connectMatcher": {}}
    assert by_name[REVIEWS][0]["route"]["cluster"] == "outbound_tunnel"
    # an unknown host has no CONNECT route: Envoy answers 404 (NR), as Python does
    assert all("connectMatcher" not in r["match"] for r in by_name["unknown_host"])
    tunnel = to_dict(out.listeners["outbound_tunnel"])
    assert "internalListener" in tunnel
    hcm = tunnel["filterChains"][0]["filters"][0]["typedConfig"]
    assert hcm["rds"]["routeConfigName"] == "outbound_http"
    cluster = to_dict(out.clusters["outbound_tunnel"])
    address = cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]
    assert address == {"envoyInternalAddress": {"serverListenerName": "outbound_tunnel"}}
    outbound = to_dict(out.listeners["outbound_http"])["filterChains"][0]["filters"][0]
    (log,) = outbound["typedConfig"]["accessLog"]
    assert log["filter"]["headerFilter"]["header"]["name"] == ":method"
    assert log["filter"]["headerFilter"]["header"]["invertMatch"] is True


def test_dry_run_policies_become_shadow_rules_and_are_never_enforced() -> None:
    """A dry-run DENY-all must not deny on Envoy either (`istio.io/dry-run`): Istio
    translates it to `shadow_rules`, whose result Envoy only writes to metadata."""
    dry_deny = AuthzPolicy(
        name="trial", namespace="default", action="DENY", dry_run=True, rules=(AuthzRule(),)
    )
    dry_audit = AuthzPolicy(
        name="look", namespace="default", action="AUDIT", dry_run=True, rules=(AuthzRule(),)
    )
    (f,) = rbac_filters(inbound_route(policy(authorization=(dry_deny, dry_audit))))
    assert "rules" not in f
    assert f["shadowRules"]["action"] == "DENY"
    assert list(f["shadowRules"]["policies"]) == ["default/trial[0]"]
    assert f["shadowRulesStatPrefix"].endswith("_dry_run_deny_")


def test_the_inbound_moves_the_peer_metadata_header_out_of_the_apps_sight() -> None:
    hcm = inbound_listener(policy())["filterChains"][0]["filters"][0]["typedConfig"]
    first = hcm["httpFilters"][0]
    assert first["name"] == "envoy.filters.http.header_to_metadata"
    (rule,) = first["typedConfig"]["requestRules"]
    assert rule["header"] == "x-meshwork-peer" and rule["remove"] is True


def test_an_authorization_change_changes_the_route_configuration_not_the_listener() -> None:
    """Envoy applies a new route configuration to the next request of every open
    connection, a new listener only to new connections: a policy change must touch
    only the inbound route configuration."""
    deny = AuthzPolicy(name="d", namespace="default", action="DENY", rules=(AuthzRule(),))
    audit = AuthzPolicy(name="au", namespace="default", action="AUDIT", rules=(AuthzRule(),))
    dry = AuthzPolicy(
        name="dry", namespace="default", action="ALLOW", dry_run=True, rules=(AuthzRule(),)
    )
    views = [
        MeshView(destinations={}, inbound=policy(authorization=authz))
        for authz in (
            (),
            (deny,),
            (audit, deny, dry),
            (AuthzPolicy(name="a", namespace="default"),),
        )
    ]
    outs = [translate(sidecar(), view) for view in views]
    assert all(out.listeners == outs[0].listeners for out in outs)
    routes = [to_dict(out.routes["inbound_http"]) for out in outs]
    assert len({json.dumps(r, sort_keys=True) for r in routes}) == len(routes)
    assert rbac_filters(routes[0]) == []
    assert [f["rules"]["action"] for f in rbac_filters(routes[1])] == ["DENY"]
    assert [list(f) for f in rbac_filters(routes[2])] == [
        ["rules"],
        ["rules"],
        ["shadowRules", "shadowRulesStatPrefix"],
    ]


def test_an_rbac_filter_the_route_cannot_carry_is_refused() -> None:
    stray = {
        "name": "envoy.filters.http.rbac",
        "typedConfig": {"@type": "x", "rules": {"action": "DENY"}},
    }
    with pytest.raises(TranslationError, match=r"http_filters\[1\]"):
        rbac_route.split([stray, stray])
