"""The nftables rulesets of transparent interception (pure: settings in, text out).

Two forms, after Istio's `istio-iptables` and Linkerd's `proxy-init`
(docs/architecture.md §5.4):

- **netns** (`meshctl sidecar --intercept`): the app runs in its own network namespace
  joined to the host by a veth pair; the sidecar stays in the host namespace.
  `host_ruleset` goes in the host namespace and captures what arrives from the app's
  veth: UDP/53 to the sidecar's DNS server, every other TCP connection (less the
  excluded CIDRs and ports) to the capture listener. A redirect in the host's
  `prerouting` keeps the original destination in the host's conntrack, where the
  capture listener reads it (`SO_ORIGINAL_DST`); the sidecar's own traffic never
  enters through that veth, so it cannot loop. `app_ruleset` goes in the app's
  namespace: connections from the sidecar to the app's ports are DNATed to
  127.0.0.1 (with `route_localnet`), so an app listening on loopback is reached.
- **pod** (`meshctl intercept-init`, an init container): sidecar and app share one
  namespace, as in a Kubernetes pod. `pod_ruleset` redirects outbound TCP in `output`
  except the sidecar's own (by uid, gid or mark) and inbound TCP to the app's ports to
  the sidecar's inbound listener.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = [
    "InterceptSettings",
    "NetnsAddresses",
    "PodSettings",
    "app_ruleset",
    "delete_table",
    "host_ruleset",
    "parse_cidrs",
    "parse_ports",
    "pod_ruleset",
]

DNS_PORT = 53
# the app namespace's own table (gone with the namespace)
APP_TABLE = "mwi_app"
POD_TABLE = "meshwork"


@dataclass(frozen=True, slots=True)
class InterceptSettings:
    """What is captured: `--exclude-outbound-cidrs`, `--exclude-ports` (outbound
    destination ports), `--exclude-inbound-ports`, `--opaque-ports` (TCP, no protocol
    detection; not a rule, read by the capture listener)."""

    exclude_outbound_cidrs: tuple[str, ...] = ()
    exclude_ports: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    opaque_ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class NetnsAddresses:
    """One intercepted app's names and addresses (netns form). `ident` is short hex,
    so every name fits Linux's 15-character interface names."""

    ident: str
    host_ip: str  # the host side of the veth (gateway of the app's namespace)
    app_ip: str
    prefix_len: int = 30

    @property
    def namespace(self) -> str:
        return f"mwi-{self.ident}"

    @property
    def host_if(self) -> str:
        return f"mwi{self.ident}h"

    @property
    def app_if(self) -> str:
        return f"mwi{self.ident}a"

    @property
    def table(self) -> str:
        return f"mwi_{self.ident}"


def parse_cidrs(text: str, flag: str) -> tuple[str, ...]:
    """`10.0.0.0/8,192.168.1.1` -> normalised IPv4 networks; ValueError naming `flag`."""
    out: list[str] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{flag}: {item!r} is not a CIDR (e.g. 10.0.0.0/8)") from None
        if net.version != 4:
            raise ValueError(f"{flag}: {item!r}: only IPv4 is intercepted")
        out.append(str(net))
    return tuple(dict.fromkeys(out))


def parse_ports(text: str, flag: str) -> tuple[int, ...]:
    """`3306,25` -> ports; ValueError naming `flag` and the bad item."""
    out: list[int] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if not (item.isascii() and item.isdigit()) or not 0 < int(item) < 65536:
            raise ValueError(f"{flag}: {item!r} is not a port in 1..65535")
        out.append(int(item))
    return tuple(dict.fromkeys(out))


def _set(items: tuple[str, ...] | tuple[int, ...] | list[int]) -> str:
    return "{ " + ", ".join(str(i) for i in items) + " }"


def _outbound_exclusions(settings: InterceptSettings, indent: str) -> list[str]:
    lines = []
    if settings.exclude_outbound_cidrs:
        lines.append(f"{indent}ip daddr {_set(settings.exclude_outbound_cidrs)} return")
    if settings.exclude_ports:
        lines.append(f"{indent}tcp dport {_set(settings.exclude_ports)} return")
    return lines


def _dns_redirects(dns_port: int, indent: str) -> list[str]:
    """DNS to the sidecar's resolver, over UDP and TCP (a truncated answer is asked
    again over TCP)."""
    return [
        f"{indent}udp dport {DNS_PORT} redirect to :{dns_port}",
        f"{indent}tcp dport {DNS_PORT} redirect to :{dns_port}",
    ]


def delete_table(table: str) -> str:
    """Removes `table` (nft -f); `add` first so that a missing table is no error."""
    return f"add table ip {table}\ndelete table ip {table}\n"


def host_ruleset(
    addresses: NetnsAddresses, settings: InterceptSettings, *, capture_port: int, dns_port: int
) -> str:
    """The host namespace's table for one intercepted app (replaces an older one).

    Connections the app makes arrive on `host_if`: DNS (UDP and TCP 53) goes to the DNS server
    (`dns_port`, 0: not captured), TCP to the capture listener, unless excluded.
    Excluded traffic is routed by the host (forwarded and masqueraded only where the
    host forwards, `net.ipv4.ip_forward`; we do not change that)."""
    if not 0 < capture_port < 65536:
        raise ValueError(f"capture port must be in 1..65535, got {capture_port}")
    t, i = addresses.table, "        "
    lines = [
        *delete_table(t).splitlines(),
        f"table ip {t} {{",
        "    chain prerouting {",
        "        type nat hook prerouting priority dstnat; policy accept;",
        f'{i}iifname != "{addresses.host_if}" return',
    ]
    if dns_port:
        lines += _dns_redirects(dns_port, i)
    lines += _outbound_exclusions(settings, i)
    lines += [
        f"{i}meta l4proto tcp redirect to :{capture_port}",
        "    }",
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        f'{i}ip saddr {addresses.app_ip} oifname != "{addresses.host_if}" masquerade',
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def app_ruleset(addresses: NetnsAddresses, app_ports: list[int]) -> str:
    """The app namespace's table: the sidecar's connections to the app's ports (and
    `--exclude-inbound-ports`, which host processes may then reach directly) are
    DNATed to 127.0.0.1, where an unchanged app listens. Needs `route_localnet` on
    `app_if` (set by the applier)."""
    ports = sorted(set(app_ports))
    if not ports:
        raise ValueError("an intercepted app needs at least one port")
    return (
        "\n".join(
            [
                *delete_table(APP_TABLE).splitlines(),
                f"table ip {APP_TABLE} {{",
                "    chain prerouting {",
                "        type nat hook prerouting priority dstnat; policy accept;",
                f'        iifname "{addresses.app_if}" ip daddr {addresses.app_ip} '
                f"tcp dport {_set(ports)} dnat to 127.0.0.1",
                "    }",
                "}",
            ]
        )
        + "\n"
    )


@dataclass(frozen=True, slots=True)
class PodSettings:
    """The pod form (`meshctl intercept-init`): the sidecar's own traffic is told apart
    by `proxy_uid`, `proxy_gid` or `proxy_mark` (at least one)."""

    capture_port: int
    inbound_port: int
    inbound_ports: tuple[int, ...]  # the app's ports; redirected to `inbound_port`
    proxy_uid: int | None = None
    proxy_gid: int | None = None
    proxy_mark: int | None = None
    dns_port: int = 0
    intercept: InterceptSettings = InterceptSettings()


def pod_ruleset(pod: PodSettings) -> str:
    """Istio's `istio-iptables` rules as one nftables table, for a namespace shared by
    sidecar and app. Outbound (`output`): the proxy's own traffic, loopback and
    exclusions pass; DNS to `dns_port`; other TCP to `capture_port`. Inbound
    (`prerouting`): TCP to the app's ports, less `exclude_inbound_ports`, to the
    sidecar's inbound listener."""
    if pod.proxy_uid is None and pod.proxy_gid is None and pod.proxy_mark is None:
        raise ValueError("the proxy's own traffic needs --proxy-uid, --proxy-gid or --proxy-mark")
    for name, port in (("capture port", pod.capture_port), ("inbound port", pod.inbound_port)):
        if not 0 < port < 65536:
            raise ValueError(f"{name} must be in 1..65535, got {port}")
    i = "        "
    lines = [
        *delete_table(POD_TABLE).splitlines(),
        f"table ip {POD_TABLE} {{",
        "    chain prerouting {",
        "        type nat hook prerouting priority dstnat; policy accept;",
        f"{i}fib daddr type local tcp dport {pod.inbound_port} return",
    ]
    excluded = pod.intercept.exclude_inbound_ports
    if excluded:
        lines.append(f"{i}tcp dport {_set(excluded)} return")
    if pod.inbound_ports:
        lines.append(
            f"{i}tcp dport {_set(sorted(set(pod.inbound_ports)))} redirect to :{pod.inbound_port}"
        )
    lines += [
        "    }",
        "    chain output {",
        "        type nat hook output priority -100; policy accept;",
    ]
    if pod.proxy_uid is not None:
        lines.append(f"{i}meta skuid {pod.proxy_uid} return")
    if pod.proxy_gid is not None:
        lines.append(f"{i}meta skgid {pod.proxy_gid} return")
    if pod.proxy_mark is not None:
        lines.append(f"{i}meta mark {pod.proxy_mark:#x} return")
    lines.append(f'{i}oifname "lo" return')
    if pod.dns_port:
        lines += _dns_redirects(pod.dns_port, i)
    lines += _outbound_exclusions(pod.intercept, i)
    lines += [f"{i}meta l4proto tcp redirect to :{pod.capture_port}", "    }", "}"]
    return "\n".join(lines) + "\n"
