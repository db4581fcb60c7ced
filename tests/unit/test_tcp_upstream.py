"""The TCP relay's pure core (proxy.tcp): `--tcp-upstream` parsing and endpoint
addresses (endpoint choice is the cluster's: tests/unit/test_tcp_cluster.py)."""

from __future__ import annotations

import pytest

from mesh.hosts import ServiceRef
from mesh.messages import Endpoint
from proxy.tcp import (
    TcpUpstream,
    listener_address,
    parse_tcp_upstream,
    relay_address,
    tcp_endpoints,
)

# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "namespace", "service", "port", "local_port"),
    [
        ("redis:6379=16379", "default", ServiceRef("default", "redis"), 6379, 16379),
        ("redis:6379=16379", "shop", ServiceRef("shop", "redis"), 6379, 16379),
        ("redis.cache:6379=16379", "shop", ServiceRef("cache", "redis"), 6379, 16379),
        ("redis.cache.svc:1=65535", "shop", ServiceRef("cache", "redis"), 1, 65535),
        ("redis.cache.svc.cluster.local:6379=7000", "x", ServiceRef("cache", "redis"), 6379, 7000),
        ("  Redis:6379=16379 ", "default", ServiceRef("default", "redis"), 6379, 16379),
        ("pg-main:5432=5432", "default", ServiceRef("default", "pg-main"), 5432, 5432),
    ],
)
def test_parse_tcp_upstream(
    text: str, namespace: str, service: ServiceRef, port: int, local_port: int
) -> None:
    assert parse_tcp_upstream(text, namespace) == TcpUpstream(service, port, local_port)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected SERVICE[.NAMESPACE]:PORT=LOCALPORT"),
        ("redis:6379", "expected SERVICE[.NAMESPACE]:PORT=LOCALPORT"),
        ("=16379", "expected SERVICE[.NAMESPACE]:PORT=LOCALPORT"),
        ("redis=16379", "missing :PORT"),
        (":6379=16379", "missing :PORT"),
        ("redis:=16379", "PORT must be a port in 1..65535, got ''"),
        ("redis:0=16379", "PORT must be a port in 1..65535, got '0'"),
        ("redis:65536=16379", "PORT must be a port in 1..65535, got '65536'"),
        ("redis:-1=16379", "PORT must be a port in 1..65535, got '-1'"),
        ("redis:http=16379", "PORT must be a port in 1..65535, got 'http'"),
        ("redis:6379=", "LOCALPORT must be a port in 1..65535, got ''"),
        ("redis:6379=0", "LOCALPORT must be a port in 1..65535, got '0'"),
        ("redis:6379=99999", "LOCALPORT must be a port in 1..65535, got '99999'"),
        ("redis:6379=16379=1", "LOCALPORT must be a port in 1..65535, got '16379=1'"),
        ("redis:6379:1=16379", "'redis:6379' is not a service name"),
        ("re dis:6379=16379", "'re dis' is not a service name"),
        ("api.example.com:443=8443", "'api.example.com' is not a mesh service"),
        ("redis..cache:6379=1", "'redis..cache' is not a mesh service"),
        ("-redis:6379=16379", "'-redis' is not a mesh service"),
        ("redis.cache.svc.other.domain:1=2", "is not a mesh service"),
    ],
)
def test_parse_tcp_upstream_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_tcp_upstream(text, "default")
    assert message in str(e.value)


def test_listener_name_names_service_namespace_and_port() -> None:
    upstream = parse_tcp_upstream("redis.cache:6379=16379", "default")
    assert upstream.listener == "tcp-outbound:redis.cache:6379"


# ---------------------------------------------------------------- endpoints


def endpoint(instance: str, status: str = "healthy", **listeners: str) -> Endpoint:
    return Endpoint(
        instance=instance,
        address=f"{instance}:15006",
        tcp_listeners={k.removeprefix("p"): v for k, v in listeners.items()},
        status=status,  # type: ignore[arg-type]
    )


def names(eps: list[Endpoint]) -> list[str]:
    return [ep.instance for ep in eps]


@pytest.mark.parametrize(
    ("eps", "port", "expected"),
    [
        ([], 6379, []),
        ([endpoint("a", p6379="h:1"), endpoint("b", p5432="h:2")], 6379, ["a"]),
        ([endpoint("a", p6379="h:1"), endpoint("b", p5432="h:2")], 5432, ["b"]),
        ([endpoint("a", p6379="h:1")], 80, []),
        # draining ones are left out while some other one serves...
        (
            [endpoint("a", "draining", p6379="h:1"), endpoint("b", p6379="h:2")],
            6379,
            ["b"],
        ),
        # ...an endpoint serving another port does not count as serving this one...
        (
            [endpoint("a", "draining", p6379="h:1"), endpoint("b", p5432="h:2")],
            6379,
            ["a"],
        ),
        # ...and when all are draining, all are kept: they still answer
        (
            [endpoint("a", "draining", p6379="h:1"), endpoint("b", "draining", p6379="h:2")],
            6379,
            ["a", "b"],
        ),
    ],
)
def test_tcp_endpoints(eps: list[Endpoint], port: int, expected: list[str]) -> None:
    assert names(tcp_endpoints(eps, port)) == expected


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        ("10.0.0.7:40123", ("10.0.0.7", 40123)),
        ("node-3.local:1", ("node-3.local", 1)),
        ("[::1]:65535", ("::1", 65535)),
    ],
)
def test_relay_address(listener: str, expected: tuple[str, int]) -> None:
    assert relay_address(endpoint("a", p6379=listener), 6379) == expected


@pytest.mark.parametrize("listener", ["", "10.0.0.7", ":80", "h:0", "h:70000", "h:x", "[]:80"])
def test_relay_address_rejects_bad_registrations(listener: str) -> None:
    with pytest.raises(ValueError, match=r"^a: bad TCP listener"):
        relay_address(endpoint("a", p6379=listener), 6379)


def test_relay_address_of_undeclared_port() -> None:
    with pytest.raises(ValueError, match="for port 5432"):
        relay_address(endpoint("a", p6379="h:1"), 5432)


def test_listener_address_brackets_ipv6() -> None:
    assert listener_address("127.0.0.1", 5) == "127.0.0.1:5"
    assert listener_address("::1", 5) == "[::1]:5"
