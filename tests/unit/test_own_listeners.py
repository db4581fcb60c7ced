"""`proxy.own_listeners`: which passthrough destinations are this sidecar's own
listeners (ALLOW_ANY must never forward to them, docs/architecture.md §5.5)."""

from __future__ import annotations

import pytest

from proxy.envoy.translate.egress import own_listener_routes
from proxy.envoy.translate.model import ProxyNode
from proxy.own_listeners import is_local_address, names_own_listener


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.9.8.7", "0.0.0.0", "::1", "::", "::ffff:127.0.0.1", "::1%lo"],
)
def test_loopback_and_unspecified_addresses_are_local(address: str) -> None:
    assert is_local_address(address)


@pytest.mark.parametrize("address", ["192.0.2.10", "203.0.113.5", "2001:db8::1", "not-an-ip"])
def test_addresses_of_other_hosts_are_not_local(address: str) -> None:
    assert not is_local_address(address)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "[::1]", "0.0.0.0", "[::ffff:127.0.0.1]", "127.1.2.3"]
)
async def test_own_port_on_this_host_is_named_however_it_is_spelled(host: str) -> None:
    assert await names_own_listener(host, 15001, {15001, 15006})


async def test_other_ports_and_hosts_are_not_own_listeners() -> None:
    assert not await names_own_listener("127.0.0.1", 8080, {15001})
    assert not await names_own_listener("192.0.2.10", 15001, {15001})


def _node(**fields: object) -> ProxyNode:
    base: dict[str, object] = dict(
        namespace="default", service="sleep", version="v1", labels={},
        identity="spiffe://cluster.local/ns/default/sa/sleep", trust_domain="cluster.local",
        role="sidecar", inbound=("127.0.0.1", 15006), outbound=("127.0.0.1", 15001),
        app_port=8080,
    )  # fmt: skip
    base.update(fields)
    return ProxyNode(**base)  # type: ignore[arg-type]


def test_envoy_refuses_authorities_naming_its_outbound_and_capture_listeners() -> None:
    import re

    routes = own_listener_routes(_node(capture=("100.127.0.1", 15002)))
    assert all(r["directResponse"]["status"] == 508 for r in routes)
    assert sum("connectMatcher" in r["match"] for r in routes) == len(routes) // 2

    def refused(authority: str) -> bool:
        for route in routes:
            (header,) = route["match"]["headers"]
            match = header["stringMatch"]
            if "exact" in match and match["exact"] == authority.lower():
                return True
            # RE2 syntax that Python's re reads the same way
            if "safeRegex" in match and re.fullmatch(match["safeRegex"]["regex"], authority):
                return True
        return False

    for authority in ("127.0.0.1:15001", "LOCALHOST:15001", "localhost.:15002", "[::1]:15001",
                      "0.0.0.0:15001", "100.127.0.1:15002", "[::ffff:127.0.0.1]:15001",
                      "127.0.0.1:15002", "100.127.0.1:15001"):  # fmt: skip
        assert refused(authority), authority
    for authority in ("127.0.0.1:8080", "example.com:15001", "100.127.0.10:15002",
                      "10.0.0.1:15001", "127.0.0.1:150011"):  # fmt: skip
        assert not refused(authority), authority
    assert own_listener_routes(_node(outbound=None, inbound=None)) == []
