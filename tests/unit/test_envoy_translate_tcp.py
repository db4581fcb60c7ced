"""The Envoy translation of VirtualService `tcp` rules: one filter chain per rule
(subnets as prefix ranges), weighted clusters per subset and port, the addressed
service as the default chain."""

from __future__ import annotations

from typing import Any

import msgspec

from mesh.compiled import (
    Destination,
    GatewayConfig,
    GatewayServer,
    L4Match,
    L4Route,
    RouteTable,
    Subset,
    WeightedDestination,
)
from mesh.hosts import ServiceRef
from mesh.messages import Endpoint, EndpointSet
from proxy.envoy.translate import MeshView, referenced_hosts, translate
from proxy.envoy.translate.protos import to_dict
from proxy.tcp import TcpUpstream
from tests.unit.test_envoy_translate_golden import sidecar, spiffe

ECHO = ServiceRef("default", "tcp-echo")
FQDN = ECHO.fqdn
LISTENER = f"outbound_tcp|9000|{FQDN}"


def echo_endpoints() -> EndpointSet:
    ident = spiffe("default", "tcp-echo")
    return EndpointSet(
        namespace="default",
        service="tcp-echo",
        revision=3,
        endpoints=[
            Endpoint(
                instance=f"echo-{v}",
                address=f"10.0.0.{i}:15006",
                version=v,
                identity=ident,
                tcp_listeners={"9000": f"10.0.0.{i}:1900{i}", "9001": f"10.0.0.{i}:1910{i}"},
            )
            for i, v in ((1, "v1"), (2, "v2"))
        ],
    )


def table(*routes: L4Route) -> RouteTable:
    return RouteTable(
        namespace="default",
        service="tcp-echo",
        host=FQDN,
        revision=3,
        subsets=(Subset("v1", {"version": "v1"}), Subset("v2", {"version": "v2"})),
        tcp=routes,
    )


def to(subset: str, weight: int, port: int = 0) -> WeightedDestination:
    return WeightedDestination(Destination(FQDN, subset, port), weight=weight)


def chains(*routes: L4Route, labels: dict[str, str] | None = None) -> tuple[Any, list[Any]]:
    node = sidecar(
        tcp_upstreams=(TcpUpstream(ECHO, 9000, 19000),),
        **({"labels": labels} if labels is not None else {}),
    )
    view = MeshView(destinations={FQDN: (table(*routes), echo_endpoints())})
    out = translate(node, view)
    return out, to_dict(out.listeners[LISTENER])["filterChains"]


def proxy_of(chain: dict[str, Any]) -> dict[str, Any]:
    (f,) = chain["filters"]
    assert f["name"] == "envoy.filters.network.tcp_proxy"
    return dict(f["typedConfig"])


def relays(out: Any, cluster: str) -> list[str]:
    cla = to_dict(out.endpoints[cluster])
    return sorted(
        f"{lb['endpoint']['address']['socketAddress']['address']}:"
        f"{lb['endpoint']['address']['socketAddress']['portValue']}"
        for group in cla.get("endpoints", [])
        for lb in group["lbEndpoints"]
    )


def test_80_20_becomes_weighted_clusters_per_subset() -> None:
    out, (chain,) = chains(L4Route(match=(L4Match(port=9000),), route=(to("v1", 80), to("v2", 20))))
    assert "filterChainMatch" not in chain
    assert proxy_of(chain)["weightedClusters"] == {
        "clusters": [
            {"name": f"outbound|9000|v1|{FQDN}", "weight": 80},
            {"name": f"outbound|9000|v2|{FQDN}", "weight": 20},
        ]
    }
    assert relays(out, f"outbound|9000|v1|{FQDN}") == ["10.0.0.1:19001"]
    assert relays(out, f"outbound|9000|v2|{FQDN}") == ["10.0.0.2:19002"]


def test_no_rule_for_this_port_or_caller_is_the_default_route() -> None:
    _, (chain,) = chains(
        L4Route(match=(L4Match(port=9001),), route=(to("v2", 100),)),
        L4Route(match=(L4Match(source_labels={"app": "other"}),), route=(to("v2", 100),)),
    )
    assert proxy_of(chain)["cluster"] == f"outbound|9000||{FQDN}"


def test_destination_port_and_subnets() -> None:
    out, (by_subnet, default) = chains(
        L4Route(
            match=(L4Match(destination_subnets=("10.1.0.0/16", "192.168.0.7")),),
            route=(to("v2", 100, port=9001),),
        )
    )
    assert by_subnet["filterChainMatch"] == {
        "prefixRanges": [
            {"addressPrefix": "10.1.0.0", "prefixLen": 16},
            {"addressPrefix": "192.168.0.7", "prefixLen": 32},
        ]
    }
    assert proxy_of(by_subnet)["cluster"] == f"outbound|9001|v2|{FQDN}"
    assert relays(out, f"outbound|9001|v2|{FQDN}") == ["10.0.0.2:19102"]
    assert proxy_of(default)["cluster"] == f"outbound|9000||{FQDN}"


def test_rule_hosts_are_followed() -> None:
    other = "db.default.svc.cluster.local"
    node = sidecar(tcp_upstreams=(TcpUpstream(ECHO, 9000, 19000),))
    routes = table(L4Route(route=(WeightedDestination(Destination(other), weight=100),)))
    view = MeshView(destinations={FQDN: (routes, echo_endpoints())})
    assert other in referenced_hosts(node, view)


# ---------------------------------------------------------------- gateway servers


def gateway_out(config: GatewayConfig) -> Any:
    node = sidecar(
        role="gateway",
        service="ingressgateway",
        labels={"istio": "ingressgateway"},
        inbound=None,
        outbound=None,
        app_port=0,
        gateway_listeners=(("127.0.0.1", 8080),),
    )
    view = MeshView(destinations={FQDN: (table(), echo_endpoints())}, gateway=config)
    return translate(node, view)


def test_tls_passthrough_server_routes_by_server_names() -> None:
    config = GatewayConfig(
        namespace="default",
        name="default/edge",
        revision=1,
        servers=(GatewayServer(port=443, protocol="TLS", hosts=("*.example.com",)),),
        tls=(
            L4Route(
                match=(L4Match(port=443, sni_hosts=("a.example.com",)),),
                route=(to("v1", 100, port=9000),),
            ),
            L4Route(
                match=(L4Match(port=8443, sni_hosts=("b.example.com",)),),
                route=(to("v2", 100, port=9000),),
            ),
        ),
    )
    listener = to_dict(gateway_out(config).listeners["gateway|127.0.0.1|443"])
    assert [f["name"] for f in listener["listenerFilters"]] == [
        "envoy.filters.listener.tls_inspector"
    ]
    # the rule for port 8443 does not apply to this server; no chain: closed
    (chain,) = listener["filterChains"]
    assert chain["filterChainMatch"] == {"serverNames": ["a.example.com"]}
    assert proxy_of(chain)["cluster"] == f"outbound|9000|v1|{FQDN}"


def test_tcp_server_without_rules_closes_connections() -> None:
    config = GatewayConfig(
        namespace="default",
        name="default/edge",
        revision=1,
        servers=(GatewayServer(port=31400, protocol="TCP", hosts=("*",)),),
    )
    out = gateway_out(config)
    (chain,) = to_dict(out.listeners["gateway|127.0.0.1|31400"])["filterChains"]
    assert proxy_of(chain)["cluster"] == "BlackHoleCluster"
    assert "loadAssignment" not in to_dict(out.clusters["BlackHoleCluster"])


def test_sidecar_tls_rules_are_server_name_chains_before_the_tcp_ones() -> None:
    tls_rule = L4Route(
        match=(L4Match(port=9000, sni_hosts=("a.example.com",)),),
        route=(to("v2", 100),),
    )
    node = sidecar(tcp_upstreams=(TcpUpstream(ECHO, 9000, 19000),))
    routes = msgspec.structs.replace(table(), tls=(tls_rule,))
    out = translate(node, MeshView(destinations={FQDN: (routes, echo_endpoints())}))
    listener = to_dict(out.listeners[LISTENER])
    assert [f["name"] for f in listener["listenerFilters"]] == [
        "envoy.filters.listener.tls_inspector"
    ]
    # no ClientHello in time (a server-first protocol): the tcp rules, as in Python
    assert listener["continueOnListenerFiltersTimeout"] is True
    by_sni, default = listener["filterChains"]
    assert by_sni["filterChainMatch"] == {"serverNames": ["a.example.com"]}
    assert proxy_of(by_sni)["cluster"] == f"outbound|9000|v2|{FQDN}"
    assert proxy_of(default)["cluster"] == f"outbound|9000||{FQDN}"


def test_connect_rule_takes_the_tls_rule_covering_the_connect_host_else_tcp() -> None:
    """A CONNECT to a ServiceEntry host on Envoy: the first `tls` rule holding here
    whose SNI hosts cover the CONNECT host, else the first `tcp` rule, else none."""
    from proxy.envoy.translate.tcp import connect_rule

    other = L4Route(
        match=(L4Match(port=443, gateways=("mesh",), sni_hosts=("other.example.test",)),),
        route=(to("v1", 100),),
        origin="other",
    )
    covering = L4Route(
        match=(L4Match(port=443, gateways=("mesh",), sni_hosts=("*.example.test",)),),
        route=(to("v2", 100),),
        origin="covering",
    )
    at_gateway = L4Route(
        match=(L4Match(port=443, gateways=("default/gw",), sni_hosts=("api.example.test",)),),
        route=(to("v1", 100),),
        origin="gateway",
    )
    fallback = L4Route(match=(L4Match(port=443),), route=(to("v1", 100),), origin="tcp")
    node = sidecar()
    routes = msgspec.structs.replace(table(fallback), tls=(at_gateway, other, covering))
    assert connect_rule(routes, node, 443, "api.example.test") == covering
    assert connect_rule(routes, node, 443, "api.other.test") == fallback
    assert connect_rule(routes, node, 8443, "api.example.test") is None


def test_tcp_cluster_to_a_gateway_tls_server_has_no_mtls() -> None:
    """A gateway's TCP / TLS server port (`plain_tcp_ports`) takes the bytes as sent:
    its endpoint carries no identity metadata, so no mTLS socket matches it."""
    plain = msgspec.structs.replace(
        echo_endpoints(),
        endpoints=[
            msgspec.structs.replace(ep, plain_tcp_ports=[9000]) for ep in echo_endpoints().endpoints
        ],
    )
    node = sidecar(tcp_upstreams=(TcpUpstream(ECHO, 9000, 19000),))
    name = f"outbound|9000||{FQDN}"

    def identified(endpoints: EndpointSet) -> list[bool]:
        out = translate(node, MeshView(destinations={FQDN: (table(), endpoints)}))
        lbs = to_dict(out.endpoints[name])["endpoints"][0]["lbEndpoints"]
        return ["metadata" in lb for lb in lbs]

    assert identified(echo_endpoints()) == [True, True]
    assert identified(plain) == [False, False]


def test_tcp_cluster_takes_the_destination_rule_for_its_port() -> None:
    """As the Python relay's TCP cluster (architecture §5.1): the subset's policy for
    the port; `consistentHash.useSourceIp` is the tcp_proxy's hash on the client."""
    from mesh.compiled import (
        ConnectionPool,
        ConsistentHash,
        LoadBalancer,
        OutlierDetection,
        TrafficPolicy,
    )

    policy = TrafficPolicy(
        load_balancer=LoadBalancer(consistent_hash=ConsistentHash(use_source_ip=True)),
        connection_pool=ConnectionPool(max_connections=1, connect_timeout_ms=250),
        outlier_detection=OutlierDetection(consecutive_5xx_errors=1),
    )
    node = sidecar(tcp_upstreams=(TcpUpstream(ECHO, 9000, 19000),))
    hashed = msgspec.structs.replace(table(), traffic_policy=policy)
    out = translate(node, MeshView(destinations={FQDN: (hashed, echo_endpoints())}))
    cluster = to_dict(out.clusters[f"outbound|9000||{FQDN}"])
    assert cluster["lbPolicy"] == "RING_HASH"
    assert cluster["circuitBreakers"]["thresholds"][0]["maxConnections"] == 1
    assert cluster["connectTimeout"] == "0.250s"
    assert cluster["outlierDetection"]["consecutive5xx"] == 1
    (chain,) = to_dict(out.listeners[LISTENER])["filterChains"]
    assert proxy_of(chain)["hashPolicy"] == [{"sourceIp": {}}]
    # without the hash key: no hash policy on the relay
    _out, (plain,) = chains()
    assert "hashPolicy" not in proxy_of(plain)
