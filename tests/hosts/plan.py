"""The pure half of the multi-host harness: names, addresses, the `ip` commands that
build a network of hosts, and the nftables rulesets that cut a link or make it lossy.
No I/O here: `tests/hosts/network.py` runs what these functions return.

Layout (docs/architecture.md, "Several hosts on one machine"): every run has an id
(`<pid>`), a "switch" namespace `mwh-<run>-sw` holding the bridge `br0`, one namespace
per host `mwh-<run>-<host>` whose `eth0` is a veth plugged into that bridge, and a
veth `mwh<run>` in the root namespace on the same bridge (address `.1`), through which
the test process itself reaches every host (the "operator's laptop"). Names carry the
run id, so what a killed run left is found and removed by the next one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

PREFIX = "mwh-"
SWITCH = "sw"
IFNAMSIZ = 15  # Linux interface names: at most 15 bytes
HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")
Direction = Literal["egress", "ingress", "both"]
NFT_TABLE = "mwh"


class PlanError(ValueError):
    """A host network that cannot be built as asked (names, counts, percentages)."""


def namespace(run: str, host: str) -> str:
    return f"{PREFIX}{run}-{host}"


def root_link(run: str) -> str:
    """The root namespace's veth on the bridge."""
    name = f"mwh{run}"
    if len(name) > IFNAMSIZ:
        raise PlanError(f"run id {run!r} is too long for an interface name ({name!r})")
    return name


def run_of(netns_name: str) -> str | None:
    """The run id in one of our namespace names, None for anybody else's namespace."""
    if not netns_name.startswith(PREFIX):
        return None
    run, sep, _host = netns_name[len(PREFIX) :].partition("-")
    return run if sep and run.isdigit() else None


def stale_namespaces(existing: Iterable[str], alive: Iterable[str]) -> list[str]:
    """Our namespaces whose run is not among the `alive` run ids (its process is gone)."""
    live = set(alive)
    return sorted(n for n in existing if (r := run_of(n)) is not None and r not in live)


def subnet_for(run: str) -> ipaddress.IPv4Network:
    """A /24 in 10/8 chosen from the run id: two runs side by side do not share routes
    in the root namespace."""
    n = int(run)
    return ipaddress.IPv4Network(f"10.{200 + n % 50}.{(n // 50) % 250}.0/24")


@dataclass(frozen=True)
class HostPlan:
    name: str
    netns: str
    address: str


@dataclass(frozen=True)
class NetworkPlan:
    run: str
    subnet: ipaddress.IPv4Network
    hosts: tuple[HostPlan, ...]

    @property
    def switch(self) -> str:
        return namespace(self.run, SWITCH)

    @property
    def operator_address(self) -> str:
        return str(self.subnet.network_address + 1)

    def host(self, name: str) -> HostPlan:
        for h in self.hosts:
            if h.name == name:
                return h
        raise PlanError(f"no host {name!r} in this network (hosts: {self.names()})")

    def names(self) -> str:
        return ", ".join(h.name for h in self.hosts)

    def namespaces(self) -> list[str]:
        return [self.switch, *(h.netns for h in self.hosts)]


def plan_network(run: str, host_names: Sequence[str]) -> NetworkPlan:
    if not run.isdigit():
        raise PlanError(f"run id must be digits (a pid), got {run!r}")
    if len(set(host_names)) != len(host_names):
        raise PlanError(f"host names repeat: {list(host_names)}")
    for name in host_names:
        if not HOST_NAME.match(name) or name == SWITCH:
            raise PlanError(
                f"host name {name!r}: 1-10 lower-case letters/digits, starting with a letter, "
                f"not {SWITCH!r}"
            )
    if not 1 <= len(host_names) <= 200:
        raise PlanError(f"1 to 200 hosts, got {len(host_names)}")
    root_link(run)  # checks the length
    subnet = subnet_for(run)
    hosts = tuple(
        HostPlan(name, namespace(run, name), str(subnet.network_address + 11 + i))
        for i, name in enumerate(host_names)
    )
    return NetworkPlan(run, subnet, hosts)


def build_commands(plan: NetworkPlan) -> list[list[str]]:
    """`ip` invocations that build the network, in order."""
    sw = plan.switch
    bits = plan.subnet.prefixlen
    link = root_link(plan.run)
    cmds: list[list[str]] = [
        ["ip", "netns", "add", sw],
        ["ip", "-n", sw, "link", "set", "lo", "up"],
        ["ip", "-n", sw, "link", "add", "br0", "type", "bridge"],
        ["ip", "-n", sw, "link", "set", "br0", "up"],
        # the operator's leg: root namespace <-> bridge
        ["ip", "link", "add", link, "type", "veth", "peer", "name", "op", "netns", sw],
        ["ip", "-n", sw, "link", "set", "op", "master", "br0", "up"],
        ["ip", "addr", "add", f"{plan.operator_address}/{bits}", "dev", link],
        ["ip", "link", "set", link, "gso_max_segs", "1"],
        ["ip", "link", "set", link, "up"],
    ]
    for h in plan.hosts:
        port = f"v-{h.name}"
        cmds += [
            ["ip", "netns", "add", h.netns],
            ["ip", "-n", h.netns, "link", "set", "lo", "up"],
            [
                "ip",
                "-n",
                sw,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                h.netns,
            ],
            ["ip", "-n", sw, "link", "set", port, "master", "br0", "up"],
            ["ip", "-n", h.netns, "addr", "add", f"{h.address}/{bits}", "dev", "eth0"],
            # no frame above the MTU: the user-space delayer (delayer.py) relays frames
            ["ip", "-n", h.netns, "link", "set", "eth0", "gso_max_segs", "1"],
            ["ip", "-n", h.netns, "link", "set", "eth0", "up"],
        ]
    return cmds


def link_namespace(run: str, host: str) -> str:
    """The namespace a delayed host's link runs through (delayer.py)."""
    return namespace(run, f"dl{host}")


def delay_commands(plan: NetworkPlan, host: str) -> list[list[str]]:
    """Re-plug `host`'s switch port into a link namespace, joined to the bridge by a
    new veth: the delayer relays frames between the two (`v-<host>` <-> `uplink`)."""
    sw, link, port = plan.switch, link_namespace(plan.run, plan.host(host).name), f"v-{host}"
    return [
        ["ip", "netns", "add", link],
        ["ip", "-n", sw, "link", "set", port, "netns", link],
        [
            "ip",
            "-n",
            sw,
            "link",
            "add",
            f"l-{host}",
            "type",
            "veth",
            "peer",
            "name",
            "uplink",
            "netns",
            link,
        ],
        ["ip", "-n", sw, "link", "set", f"l-{host}", "master", "br0", "up"],
        ["ip", "-n", link, "link", "set", "dev", port, "promisc", "on"],
        ["ip", "-n", link, "link", "set", "dev", port, "up"],
        ["ip", "-n", link, "link", "set", "dev", "uplink", "gso_max_segs", "1"],
        ["ip", "-n", link, "link", "set", "dev", port, "gso_max_segs", "1"],
        ["ip", "-n", link, "link", "set", "dev", "uplink", "promisc", "on"],
        ["ip", "-n", link, "link", "set", "dev", "uplink", "up"],
    ]


def undelay_commands(plan: NetworkPlan, host: str) -> list[list[str]]:
    sw, link, port = plan.switch, link_namespace(plan.run, plan.host(host).name), f"v-{host}"
    return [
        ["ip", "-n", link, "link", "set", port, "netns", sw],
        ["ip", "-n", sw, "link", "set", port, "master", "br0", "up"],
        ["ip", "netns", "del", link],  # takes uplink, and so l-<host>, with it
    ]


def teardown_commands(run: str, namespaces: Iterable[str]) -> list[list[str]]:
    """Deleting a namespace deletes its veth ends (and so their peers) and the bridge;
    the root namespace's veth goes with its peer in the switch namespace, but is
    deleted explicitly too in case the switch was never made."""
    return [["ip", "link", "del", root_link(run)], *(["ip", "netns", "del", n] for n in namespaces)]


# ---------------------------------------------------------------- link faults


@dataclass(frozen=True)
class LinkRule:
    """Drop packets between this host and `peer` (an address) in one direction, all of
    them (a cut) or `loss_percent` of them at random."""

    peer: str
    direction: Literal["egress", "ingress"]
    loss_percent: int = 100

    def nft(self) -> str:
        match = f"ip daddr {self.peer}" if self.direction == "egress" else f"ip saddr {self.peer}"
        if self.loss_percent >= 100:
            return f"{match} drop"
        return f"{match} numgen random mod 100 < {self.loss_percent} drop"


def link_rules(
    peers: Iterable[str], direction: Direction, loss_percent: int = 100
) -> list[LinkRule]:
    if not 0 < loss_percent <= 100:
        raise PlanError(f"loss must be 1-100 percent, got {loss_percent}")
    if direction not in ("egress", "ingress", "both"):
        raise PlanError(f"direction must be egress, ingress or both, got {direction!r}")
    dirs: list[Literal["egress", "ingress"]] = (
        ["egress", "ingress"] if direction == "both" else [direction]
    )
    return [LinkRule(p, d, loss_percent) for p in peers for d in dirs]


@dataclass(frozen=True)
class HostFirewall:
    """Every link rule in force on one host; the ruleset replaces the table whole."""

    rules: frozenset[LinkRule] = field(default_factory=frozenset)

    def with_rules(self, added: Iterable[LinkRule]) -> HostFirewall:
        new = list(added)
        # a peer+direction has one rule: a new loss figure replaces a cut and vice versa
        keys = {(r.peer, r.direction) for r in new}
        kept = {r for r in self.rules if (r.peer, r.direction) not in keys}
        return HostFirewall(frozenset(kept | set(new)))

    def without(self, peers: Iterable[str], direction: Direction) -> HostFirewall:
        gone = set(peers)
        dirs = {"egress", "ingress"} if direction == "both" else {direction}
        return HostFirewall(
            frozenset(r for r in self.rules if not (r.peer in gone and r.direction in dirs))
        )

    def ruleset(self) -> str:
        """An nft script that (re)creates table `inet mwh` with exactly these rules.
        `add table` first, so that the `delete` never fails on a fresh host."""
        out = [f"table inet {NFT_TABLE} {{}}", f"delete table inet {NFT_TABLE}"]
        out.append(f"table inet {NFT_TABLE} {{")
        for chain, hook, direction in (("in", "input", "ingress"), ("out", "output", "egress")):
            out.append(f"  chain {chain} {{")
            out.append(f"    type filter hook {hook} priority 0; policy accept;")
            for rule in sorted(self.rules, key=lambda r: (r.peer, r.loss_percent)):
                if rule.direction == direction:
                    out.append(f"    {rule.nft()}")
            out.append("  }")
        out.append("}")
        return "\n".join(out) + "\n"
