"""The nftables rulesets of interception (proxy.intercept.rules): text from settings."""

from __future__ import annotations

import pytest

from proxy.intercept.rules import (
    InterceptSettings,
    NetnsAddresses,
    PodSettings,
    app_ruleset,
    host_ruleset,
    parse_cidrs,
    parse_ports,
    pod_ruleset,
)

ADDRESSES = NetnsAddresses("0a1b2c3d", host_ip="100.127.0.1", app_ip="100.127.0.2")


def test_names_carry_the_id_and_fit_interface_names() -> None:
    assert ADDRESSES.namespace == "mwi-0a1b2c3d"
    assert ADDRESSES.table == "mwi_0a1b2c3d"
    assert (ADDRESSES.host_if, ADDRESSES.app_if) == ("mwi0a1b2c3dh", "mwi0a1b2c3da")
    assert max(len(ADDRESSES.host_if), len(ADDRESSES.app_if)) <= 15


def test_host_ruleset_captures_the_apps_tcp_and_dns_after_exclusions() -> None:
    text = host_ruleset(
        ADDRESSES,
        InterceptSettings(exclude_outbound_cidrs=("192.0.2.0/24",), exclude_ports=(3306, 25)),
        capture_port=15001,
        dns_port=15053,
    )
    assert text == (
        "add table ip mwi_0a1b2c3d\n"
        "delete table ip mwi_0a1b2c3d\n"
        "table ip mwi_0a1b2c3d {\n"
        "    chain prerouting {\n"
        "        type nat hook prerouting priority dstnat; policy accept;\n"
        '        iifname != "mwi0a1b2c3dh" return\n'
        "        udp dport 53 redirect to :15053\n"
        "        tcp dport 53 redirect to :15053\n"
        "        ip daddr { 192.0.2.0/24 } return\n"
        "        tcp dport { 3306, 25 } return\n"
        "        meta l4proto tcp redirect to :15001\n"
        "    }\n"
        "    chain postrouting {\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        '        ip saddr 100.127.0.2 oifname != "mwi0a1b2c3dh" masquerade\n'
        "    }\n"
        "}\n"
    )


def test_host_ruleset_without_exclusions_or_dns() -> None:
    text = host_ruleset(ADDRESSES, InterceptSettings(), capture_port=15001, dns_port=0)
    assert "udp dport" not in text and "return\n        meta l4proto" in text
    assert "ip daddr" not in text
    with pytest.raises(ValueError, match="capture port"):
        host_ruleset(ADDRESSES, InterceptSettings(), capture_port=0, dns_port=0)


def test_app_ruleset_dnats_the_sidecars_connections_to_loopback() -> None:
    text = app_ruleset(ADDRESSES, [9080, 6379, 9080])
    assert (
        '        iifname "mwi0a1b2c3da" ip daddr 100.127.0.2 tcp dport { 6379, 9080 } '
        "dnat to 127.0.0.1\n"
    ) in text
    assert text.startswith("add table ip mwi_app\ndelete table ip mwi_app\n")
    with pytest.raises(ValueError, match="at least one port"):
        app_ruleset(ADDRESSES, [])


def test_pod_ruleset_skips_the_proxys_own_traffic_first() -> None:
    text = pod_ruleset(
        PodSettings(
            capture_port=15001,
            inbound_port=15006,
            inbound_ports=(9080,),
            proxy_uid=1337,
            proxy_gid=1337,
            dns_port=15053,
            intercept=InterceptSettings(exclude_inbound_ports=(15021,), exclude_ports=(5432,)),
        )
    )
    output = text[text.index("chain output") :]
    lines = [line.strip() for line in output.splitlines()[2:-2]]
    assert lines == [
        "meta skuid 1337 return",
        "meta skgid 1337 return",
        'oifname "lo" return',
        "udp dport 53 redirect to :15053",
        "tcp dport 53 redirect to :15053",
        "tcp dport { 5432 } return",
        "meta l4proto tcp redirect to :15001",
    ]
    prerouting = text[text.index("chain prerouting") : text.index("chain output")]
    assert "tcp dport { 15021 } return" in prerouting
    assert "tcp dport { 9080 } redirect to :15006" in prerouting


def test_pod_ruleset_needs_a_way_to_tell_the_proxy_apart() -> None:
    with pytest.raises(ValueError, match="--proxy-uid"):
        pod_ruleset(PodSettings(capture_port=15001, inbound_port=15006, inbound_ports=()))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("10.0.0.0/8, 192.168.1.1", ("10.0.0.0/8", "192.168.1.1/32")),
        ("10.1.2.3/8", ("10.0.0.0/8",)),
    ],
)
def test_parse_cidrs(text: str, expected: tuple[str, ...]) -> None:
    assert parse_cidrs(text, "--exclude-outbound-cidrs") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("10.0.0.0/33", "'10.0.0.0/33' is not a CIDR"), ("::1/128", "only IPv4"), ("x", "'x' is not")],
)
def test_parse_cidrs_names_the_flag_and_the_item(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="--exclude-outbound-cidrs") as exc:
        parse_cidrs(text, "--exclude-outbound-cidrs")
    assert message in str(exc.value)


def test_parse_ports() -> None:
    assert parse_ports("3306, 25,3306", "--opaque-ports") == (3306, 25)
    for bad in ("0", "65536", "ssh", "-1"):
        with pytest.raises(ValueError, match=f"--opaque-ports: '{bad}' is not a port"):
            parse_ports(bad, "--opaque-ports")


def test_interception_without_privilege_is_refused_clearly(monkeypatch) -> None:
    from proxy.intercept import netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(netns, "_has_cap_net_admin", lambda: False)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: f"/usr/sbin/{tool}")
    with pytest.raises(netns.InterceptError, match="needs root or CAP_NET_ADMIN"):
        netns.require_net_admin()
    monkeypatch.setattr(netns, "_has_cap_net_admin", lambda: True)
    netns.require_net_admin()
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "nft" else "/x")
    with pytest.raises(netns.InterceptError, match="needs nft on PATH"):
        netns.require_net_admin()
