"""The multi-host harness's pure parts: names, addresses, build commands, nft rulesets."""

from __future__ import annotations

import pytest

from tests.hosts.plan import (
    HostFirewall,
    PlanError,
    link_rules,
    plan_network,
    run_of,
    stale_namespaces,
    teardown_commands,
)
from tests.hosts.plan import build_commands as build


def test_hosts_get_their_own_namespace_and_address_in_the_runs_subnet() -> None:
    plan = plan_network("4242", ["cp1", "cp2", "app1"])
    assert [h.netns for h in plan.hosts] == ["mwh-4242-cp1", "mwh-4242-cp2", "mwh-4242-app1"]
    addresses = [h.address for h in plan.hosts]
    assert len(set(addresses)) == 3
    assert all(h.address != plan.operator_address for h in plan.hosts)
    assert all(__import__("ipaddress").ip_address(a) in plan.subnet for a in addresses)
    assert plan.host("cp2").address == addresses[1]
    with pytest.raises(PlanError, match="no host 'db'"):
        plan.host("db")


def test_two_runs_use_different_subnets() -> None:
    assert plan_network("4242", ["a"]).subnet != plan_network("4243", ["a"]).subnet


@pytest.mark.parametrize(
    ("run", "hosts", "error"),
    [
        ("abc", ["a"], "run id must be digits"),
        ("1", ["a", "a"], "repeat"),
        ("1", ["Bad"], "host name 'Bad'"),
        ("1", ["sw"], "host name 'sw'"),
        ("1", ["averyverylonghostname"], "1-10"),
        ("1", [], "1 to 200 hosts"),
        ("123456789012345", ["a"], "too long for an interface name"),
    ],
)
def test_bad_plans_are_refused_with_what_is_wrong(run: str, hosts: list[str], error: str) -> None:
    with pytest.raises(PlanError, match=error):
        plan_network(run, hosts)


def test_build_commands_create_every_namespace_veth_and_address() -> None:
    plan = plan_network("7", ["cp1", "app1"])
    cmds = [" ".join(c) for c in build(plan)]
    assert cmds[0] == "ip netns add mwh-7-sw"
    for h in plan.hosts:
        assert f"ip netns add {h.netns}" in cmds
        assert f"ip -n {h.netns} link set lo up" in cmds
        assert f"ip -n {h.netns} addr add {h.address}/24 dev eth0" in cmds
        assert f"ip -n mwh-7-sw link set v-{h.name} master br0 up" in cmds
    assert f"ip addr add {plan.operator_address}/24 dev mwh7" in cmds
    assert teardown_commands("7", plan.namespaces())[0] == ["ip", "link", "del", "mwh7"]


def test_stale_namespaces_are_ours_from_dead_runs_only() -> None:
    existing = ["mwh-11-cp1", "mwh-11-sw", "mwh-12-cp1", "mwi-5-x", "other", "mwh-x-cp1"]
    assert run_of("mwh-11-cp1") == "11"
    assert run_of("other") is None
    assert stale_namespaces(existing, alive=["12"]) == ["mwh-11-cp1", "mwh-11-sw"]


def test_a_cut_drops_both_directions_and_heals_per_direction() -> None:
    fw = HostFirewall().with_rules(link_rules(["10.0.0.2"], "both"))
    text = fw.ruleset()
    assert "ip daddr 10.0.0.2 drop" in text.split("chain out")[1]
    assert "ip saddr 10.0.0.2 drop" in text.split("chain out")[0]
    egress_only = fw.without(["10.0.0.2"], "ingress").ruleset()
    assert "ip saddr" not in egress_only
    assert "ip daddr 10.0.0.2 drop" in egress_only
    assert "drop" not in fw.without(["10.0.0.2"], "both").ruleset()


def test_loss_replaces_a_cut_on_the_same_link_and_is_a_random_drop() -> None:
    fw = HostFirewall().with_rules(link_rules(["10.0.0.2", "10.0.0.3"], "egress"))
    fw = fw.with_rules(link_rules(["10.0.0.2"], "egress", loss_percent=5))
    out = fw.ruleset().split("chain out")[1]
    assert "ip daddr 10.0.0.2 numgen random mod 100 < 5 drop" in out
    assert "ip daddr 10.0.0.2 drop" not in out
    assert "ip daddr 10.0.0.3 drop" in out


def test_ruleset_replaces_the_table_whole_even_on_a_fresh_host() -> None:
    lines = HostFirewall().ruleset().splitlines()
    assert lines[:2] == ["table inet mwh {}", "delete table inet mwh"]


@pytest.mark.parametrize(("percent", "direction"), [(0, "both"), (101, "both"), (5, "up")])
def test_bad_link_rules_are_refused(percent: int, direction: str) -> None:
    with pytest.raises(PlanError):
        link_rules(["10.0.0.2"], direction, percent)  # type: ignore[arg-type]


def test_a_delayed_host_is_replugged_through_its_link_namespace_and_back() -> None:
    from tests.hosts.plan import delay_commands, link_namespace, undelay_commands

    plan = plan_network("9", ["cp1", "app2"])
    link = link_namespace("9", "app2")
    assert link == "mwh-9-dlapp2" and run_of(link) == "9"
    on = [" ".join(c) for c in delay_commands(plan, "app2")]
    assert on[0] == f"ip netns add {link}"
    assert f"ip -n mwh-9-sw link set v-app2 netns {link}" in on
    assert "ip -n mwh-9-sw link set l-app2 master br0 up" in on
    off = [" ".join(c) for c in undelay_commands(plan, "app2")]
    assert off == [
        f"ip -n {link} link set v-app2 netns mwh-9-sw",
        "ip -n mwh-9-sw link set v-app2 master br0 up",
        f"ip netns del {link}",
    ]


def test_every_host_sends_frames_no_larger_than_the_mtu() -> None:
    cmds = [" ".join(c) for c in build(plan_network("7", ["cp1"]))]
    assert "ip -n mwh-7-cp1 link set eth0 gso_max_segs 1" in cmds


def test_the_delayer_fills_in_tcp_checksums() -> None:
    import struct

    from tests.hosts.delayer import fix_checksums

    ip_header = bytes.fromhex("450000280001000040060000") + bytes([10, 0, 0, 1, 10, 0, 0, 2])
    tcp = struct.pack("!HHIIBBHHH", 1234, 80, 1, 0, 0x50, 0x02, 1024, 0, 0)
    frame = b"\xff" * 12 + b"\x08\x00" + ip_header + tcp
    fixed = fix_checksums(frame)
    checksum = struct.unpack("!H", fixed[14 + 20 + 16 : 14 + 20 + 18])[0]
    assert checksum != 0
    # a correct checksum sums (with the pseudo header) to 0xFFFF
    from tests.hosts.delayer import _fold, _sum16

    pseudo = ip_header[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    assert _fold(_sum16(pseudo) + _sum16(fixed[34:])) == 0
    assert fix_checksums(b"\x00" * 20) == b"\x00" * 20  # not IPv4: unchanged
