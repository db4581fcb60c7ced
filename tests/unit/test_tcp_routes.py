"""VirtualService `tcp` / `tls` rules: validation, compilation, per-connection route and
destination choice (pure; Istio's tcp-traffic-shifting semantics)."""

from __future__ import annotations

import random
import ssl
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mesh.compiled import Destination, GatewayServer, L4Match, L4Route, WeightedDestination
from mesh.hosts import ServiceRef
from mesh.resources import Resource, ResourceError, load_yaml, parse_resource
from meshctl.analysis import analyze, build_context
from proxy.routing import ConnectionAttrs, NoDestinationError, select_l4_route
from proxy.tcp import TcpTarget, client_hello_sni, route_target, tcp_target
from services.config.compile import compile_gateway_config, compile_route_table, services_named
from tests.unit.test_analysis import BOOKINFO, DR_REVIEWS
from tests.unit.test_analysis import _resources as analysis_resources

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "tcp-echo"
TCP_ECHO = ServiceRef("default", "tcp-echo")
FQDN = "tcp-echo.default.svc.cluster.local"


def parse(text: str) -> list[Resource]:
    return [
        parse_resource(doc, source="-", index=i, default_namespace="default")
        for i, doc in enumerate(load_yaml(text, "-"))
    ]


def vs(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "tcp-echo"},
        "spec": {"hosts": ["tcp-echo"], **spec},
    }


def dest(host: str = "tcp-echo", subset: str = "", weight: int = 0) -> dict[str, Any]:
    d: dict[str, Any] = {"destination": {"host": host, **({"subset": subset} if subset else {})}}
    return {**d, "weight": weight} if weight else d


def rejection(body: dict[str, Any]) -> ResourceError:
    with pytest.raises(ResourceError) as info:
        parse_resource(body, source="t.yaml", index=0)
    return info.value


# ---------------------------------------------------------------- validation


def test_tcp_and_tls_rules_are_accepted() -> None:
    resource = parse_resource(
        vs(
            hosts=["tcp-echo", "*.example.com"],
            tcp=[
                {
                    "match": [
                        {
                            "port": 9000,
                            "sourceLabels": {"app": "sleep"},
                            "destinationSubnets": ["10.0.0.0/8", "::1"],
                            "sourceNamespace": "default",
                            "gateways": ["mesh"],
                        }
                    ],
                    "route": [dest(subset="v1", weight=80), dest(subset="v2", weight=20)],
                }
            ],
            tls=[{"match": [{"sniHosts": ["a.example.com"]}], "route": [dest()]}],
        ),
        source="t.yaml",
        index=0,
    )
    assert resource.kind == "VirtualService"


@pytest.mark.parametrize(
    ("spec", "path", "message"),
    [
        ({"tcp": [{"match": [{"port": 9000}]}]}, "spec.tcp[0].route", "at least one route"),
        (
            {"tcp": [{"route": [dest(subset="v1", weight=70), dest(subset="v2", weight=20)]}]},
            "spec.tcp[0].route",
            "weights must add up to 100, got 90",
        ),
        (
            {"tcp": [{"match": [{"destinationSubnets": ["10.0.0.300/8"]}], "route": [dest()]}]},
            "spec.tcp[0].match[0].destinationSubnets[0]",
            "IP address or a CIDR",
        ),
        ({"tcp": [{"match": [{"port": 0}], "route": [dest()]}]}, "spec.tcp[0].match[0].port", ""),
        (
            {"tcp": [{"route": [{"destination": {"host": "*.x"}}]}]},
            "spec.tcp[0].route[0].destination.host",
            "not a wildcard",
        ),
        ({"tls": [{"route": [dest()]}]}, "spec.tls[0].match", "at least one match"),
        (
            {"tls": [{"match": [{"port": 443}], "route": [dest()]}]},
            "spec.tls[0].match[0].sniHosts",
            "at least one SNI host",
        ),
        (
            {"tls": [{"match": [{"sniHosts": ["other.example.org"]}], "route": [dest()]}]},
            "spec.tls[0].match[0].sniHosts[0]",
            "not within any of the VirtualService's hosts",
        ),
    ],
)
def test_bad_l4_rules_are_refused_with_their_path(
    spec: dict[str, Any], path: str, message: str
) -> None:
    error = rejection(vs(**spec))
    assert error.path == path
    assert message in error.message


# ---------------------------------------------------------------- compilation


def test_the_tasks_mesh_rules_compile_into_the_route_table() -> None:
    resources = parse((EXAMPLES / "tcp-echo-20-v2-mesh.yaml").read_text())
    assert TCP_ECHO in services_named(resources)
    table = compile_route_table(resources, TCP_ECHO, revision=3)
    assert table.http == ()
    assert table.tcp == (
        L4Route(
            match=(L4Match(port=9000),),
            route=(
                WeightedDestination(Destination(FQDN, "v1", 9000), weight=80),
                WeightedDestination(Destination(FQDN, "v2", 9000), weight=20),
            ),
            origin="VirtualService/default/tcp-echo",
        ),
    )
    assert [s.name for s in table.subsets] == ["v1", "v2"]


def test_rules_bound_to_a_gateway_only_stay_off_sidecars() -> None:
    text = (EXAMPLES / "tcp-echo-20-v2.yaml").read_text()
    # the task's file binds its rules to tcp-echo-gateway: no sidecar takes them
    resources = parse(text)
    assert compile_route_table(resources, TCP_ECHO, revision=1).tcp == ()


def test_a_lone_destination_takes_every_connection_and_a_foreign_match_drops_the_rule() -> None:
    resources = parse_resource(
        vs(
            tcp=[
                {"match": [{"gateways": ["some-gateway"]}], "route": [dest(subset="v2")]},
                {"route": [dest(subset="v1", weight=0)]},
            ]
        ),
        source="-",
        index=0,
        default_namespace="default",
    )
    table = compile_route_table([resources], TCP_ECHO, revision=1)
    assert table.tcp == (
        L4Route(
            route=(WeightedDestination(Destination(FQDN, "v1"), weight=100),),
            origin="VirtualService/default/tcp-echo",
        ),
    )


# ---------------------------------------------------------------- route choice


def route(*matches: L4Match, subset: str = "v1") -> L4Route:
    return L4Route(
        match=matches,
        route=(WeightedDestination(Destination(FQDN, subset), weight=100),),
        origin=subset,
    )


SLEEP = {"app": "sleep", "version": "v1"}


@pytest.mark.parametrize(
    ("match", "conn", "taken"),
    [
        (L4Match(port=9000), ConnectionAttrs(9000), True),
        (L4Match(port=9000), ConnectionAttrs(9001), False),
        (L4Match(source_labels={"app": "sleep"}), ConnectionAttrs(1, source_labels=SLEEP), True),
        (L4Match(source_labels={"app": "other"}), ConnectionAttrs(1, source_labels=SLEEP), False),
        (L4Match(source_namespace="prod"), ConnectionAttrs(1, source_namespace="prod"), True),
        (L4Match(source_namespace="prod"), ConnectionAttrs(1, source_namespace="dev"), False),
        (
            L4Match(destination_subnets=("127.0.0.0/8",)),
            ConnectionAttrs(1, destination_ip="127.0.0.1"),
            True,
        ),
        (
            L4Match(destination_subnets=("10.0.0.1",)),
            ConnectionAttrs(1, destination_ip="127.0.0.1"),
            False,
        ),
        (L4Match(destination_subnets=("::1/128",)), ConnectionAttrs(1, destination_ip="::1"), True),
        (L4Match(destination_subnets=("10.0.0.0/8",)), ConnectionAttrs(1), False),
        (L4Match(gateways=("mesh",)), ConnectionAttrs(1), True),
        (L4Match(gateways=("istio-system/gw",)), ConnectionAttrs(1), False),
        (
            L4Match(gateways=("istio-system/gw",)),
            ConnectionAttrs(1, gateway="istio-system/gw"),
            True,
        ),
        (L4Match(sni_hosts=("*.example.com",)), ConnectionAttrs(1, sni="a.example.com"), True),
        (L4Match(sni_hosts=("a.example.com",)), ConnectionAttrs(1, sni="b.example.com"), False),
        (L4Match(sni_hosts=("a.example.com",)), ConnectionAttrs(1), False),
    ],
)
def test_match_conditions(match: L4Match, conn: ConnectionAttrs, taken: bool) -> None:
    chosen = select_l4_route([route(match)], conn)
    assert (chosen is not None) is taken


def test_first_matching_rule_wins_and_a_rule_without_match_takes_the_rest() -> None:
    routes = [route(L4Match(port=9001), subset="a"), route(subset="b"), route(subset="c")]
    assert select_l4_route(routes, ConnectionAttrs(9001)) == routes[0]
    assert select_l4_route(routes, ConnectionAttrs(9000)) == routes[1]
    # a rule's matches are ORed
    either = route(L4Match(port=1), L4Match(port=2))
    assert select_l4_route([either], ConnectionAttrs(2)) == either


def test_no_matching_rule_goes_to_the_addressed_service() -> None:
    routes = [route(L4Match(port=9001))]
    assert tcp_target(routes, TCP_ECHO, ConnectionAttrs(9000), 0.5) == TcpTarget(TCP_ECHO, "", 9000)
    assert tcp_target((), TCP_ECHO, ConnectionAttrs(9000), 0.5) == TcpTarget(TCP_ECHO, "", 9000)


def test_weighted_split_follows_the_weights() -> None:
    split = L4Route(
        route=(
            WeightedDestination(Destination(FQDN, "v1", 9000), weight=80),
            WeightedDestination(Destination(FQDN, "v2", 9000), weight=20),
        ),
        origin="VirtualService/default/tcp-echo",
    )
    rand = random.Random(7)
    seen = Counter(
        tcp_target([split], TCP_ECHO, ConnectionAttrs(31400), rand.random()).subset
        for _ in range(10_000)
    )
    assert 7_700 < seen["v1"] < 8_300  # mean 8000, sd 40
    # the destination's port replaces the addressed one
    chosen = tcp_target([split], TCP_ECHO, ConnectionAttrs(31400), 0.9)
    assert chosen == TcpTarget(TCP_ECHO, "v2", 9000, "VirtualService/default/tcp-echo")


def test_a_destination_outside_the_mesh_is_no_route() -> None:
    outside = L4Route(route=(WeightedDestination(Destination("db.example.com"), weight=100),))
    with pytest.raises(NoDestinationError, match=r"db\.example\.com is not a mesh service"):
        tcp_target([outside], TCP_ECHO, ConnectionAttrs(9000), 0.1)


# ---------------------------------------------------------------- gateway servers


def client_hello(server_hostname: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl), as a gateway reads it."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    if server_hostname is None:
        context.check_hostname = False
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_sni_of_a_real_client_hello() -> None:
    hello = client_hello("A.Example.com")
    assert client_hello_sni(hello) == "a.example.com"
    # byte by byte, it asks for more until the first record is complete
    assert all(client_hello_sni(hello[:n]) is None for n in range(0, len(hello) - 1, 37))
    # a ClientHello without SNI (an IP literal), and bytes that are not TLS
    assert client_hello_sni(client_hello("127.0.0.1")) == ""
    assert client_hello_sni(b"GET / HTTP/1.1\r\n") == ""
    assert client_hello_sni(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") == ""


def gateway_doc(server: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "gw"},
        "spec": {"selector": {"istio": "ingressgateway"}, "servers": [server]},
    }


def test_tcp_and_tls_passthrough_servers_are_accepted() -> None:
    for server in (
        {"port": {"number": 31400, "name": "tcp", "protocol": "TCP"}, "hosts": ["*"]},
        {
            "port": {"number": 443, "name": "tls", "protocol": "TLS"},
            "tls": {"mode": "PASSTHROUGH"},
            "hosts": ["*.example.com"],
        },
    ):
        parse_resource(gateway_doc(server), source="-", index=0)


@pytest.mark.parametrize(
    ("tls", "protocol", "path", "message"),
    [
        (None, "TLS", "spec.servers[0].tls", "needs tls.mode: PASSTHROUGH"),
        (
            {"mode": "AUTO_PASSTHROUGH"},
            "TLS",
            "spec.servers[0].tls.mode",
            "AUTO_PASSTHROUGH is not",
        ),
        ({"mode": "SIMPLE"}, "HTTPS", "spec.servers[0].port.protocol", "HTTPS is not supported"),
        ({"mode": "SIMPLE"}, "TLS", "spec.servers[0].tls.mode", "SIMPLE is not supported"),
        ({"mode": "PASSTHROUGH"}, "TCP", "spec.servers[0].tls.mode", "needs port.protocol TLS"),
    ],
)
def test_gateway_tls_modes_we_do_not_serve_are_refused_by_name(
    tls: dict[str, str] | None, protocol: str, path: str, message: str
) -> None:
    server: dict[str, Any] = {
        "port": {"number": 443, "name": "tls", "protocol": protocol},
        "hosts": ["*"],
    }
    if tls is not None:
        server["tls"] = tls
    error = rejection(gateway_doc(server))
    assert error.path == path
    assert message in error.message


def test_gateway_config_carries_the_tasks_tcp_rules() -> None:
    resources = parse((EXAMPLES / "tcp-echo-all-v1.yaml").read_text())
    labels = {"istio": "ingressgateway", "app": "istio-ingressgateway"}
    config = compile_gateway_config(resources, "default", labels, 1)
    assert config.servers == (GatewayServer(port=31400, protocol="TCP", hosts=("*",)),)
    assert config.tcp == (
        L4Route(
            match=(L4Match(port=31400),),
            route=(WeightedDestination(Destination(FQDN, "v1", 9000), weight=100),),
            origin="VirtualService/default/tcp-echo",
        ),
    )
    attrs = ConnectionAttrs(31400, gateway="default/tcp-echo-gateway")
    assert route_target(config.tcp, attrs, 0.3) == TcpTarget(
        TCP_ECHO, "v1", 9000, "VirtualService/default/tcp-echo"
    )
    # another port of the gateway: no rule, no default route at a gateway
    assert route_target(config.tcp, ConnectionAttrs(31401, gateway=config.name), 0.3) is None


def test_analysis_checks_the_subsets_tcp_rules_name() -> None:
    text = (
        DR_REVIEWS
        + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  tcp:
  - route: [{destination: {host: reviews, subset: v3, port: {number: 9080}}}]
"""
    )
    messages = analyze(build_context(analysis_resources(text), BOOKINFO))
    assert [(m.code, str(m.resource)) for m in messages] == [
        ("IST0101", "VirtualService reviews.default")
    ]
    assert '"reviews+v3"' in messages[0].text
