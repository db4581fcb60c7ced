"""Validation of a VirtualService's L4 rules: `tcp[]` and `tls[]` (SNI passthrough).

The rules are Istio's (`validateTCPRoute`, `validateTLSRoute`): a rule needs a
`route`; a `tls` rule needs at least one `match`, each with at least one SNI host
that falls within the VirtualService's hosts; subnets are IPs or CIDRs; weights
follow the same rule as `http` routes (0..100, adding up to 100 when several).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from mesh.hosts import host_matches
from mesh.resources import checks
from mesh.resources.errors import Issue, field, item, key
from mesh.resources.networking import (
    L4MatchAttributes,
    RouteDestination,
    Server,
    TCPRoute,
    TLSMatchAttributes,
    TLSRoute,
)


def validate_l4_routes(
    tcp: Sequence[TCPRoute], tls: Sequence[TLSRoute], hosts: Sequence[str], path: str
) -> list[Issue]:
    out: list[Issue] = []
    for i, rule in enumerate(tcp):
        rule_path = item(field(path, "tcp"), i)
        if not rule.route:
            out.append(Issue(field(rule_path, "route"), "a tcp rule needs at least one route"))
        for j, match in enumerate(rule.match):
            _l4_match(match, item(field(rule_path, "match"), j), out)
        _route_destinations(rule.route, field(rule_path, "route"), out)
    for i, tls_rule in enumerate(tls):
        rule_path = item(field(path, "tls"), i)
        if not tls_rule.match:
            out.append(
                Issue(field(rule_path, "match"), "a tls rule needs at least one match (sniHosts)")
            )
        if not tls_rule.route:
            out.append(Issue(field(rule_path, "route"), "a tls rule needs at least one route"))
        for j, tls_match in enumerate(tls_rule.match):
            match_path = item(field(rule_path, "match"), j)
            _tls_match(tls_match, hosts, match_path, out)
        _route_destinations(tls_rule.route, field(rule_path, "route"), out)
    return out


# Istio's server TLS modes and what we do with them
PASSTHROUGH = "PASSTHROUGH"
_TERMINATING = ("SIMPLE", "MUTUAL", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL")


def validate_server_tls(server: Server, protocol: str, path: str) -> list[Issue]:
    """A Gateway server's `tls`: protocol TLS needs `mode: PASSTHROUGH` (routed by SNI
    with VirtualService `tls` rules); other modes are refused by name."""
    out: list[Issue] = []
    tls_path = field(path, "tls")
    mode = server.tls.mode.upper() if server.tls is not None else ""
    if protocol == "TLS" and server.tls is None:
        out.append(Issue(tls_path, "a TLS server needs tls.mode: PASSTHROUGH"))
    if server.tls is None:
        return out
    mode_path = field(tls_path, "mode")
    if mode == "AUTO_PASSTHROUGH":
        out.append(
            Issue(
                mode_path,
                f"{mode_path} AUTO_PASSTHROUGH is not supported (it routes by Istio's "
                "SNI naming of clusters, for multi-network east-west gateways); use "
                "PASSTHROUGH with VirtualService tls rules",
            )
        )
    elif mode in _TERMINATING:
        out.append(
            Issue(mode_path, f"{mode_path} {mode} is not supported (supported: PASSTHROUGH)")
        )
    elif mode != PASSTHROUGH:
        out.append(Issue(mode_path, f"must be PASSTHROUGH, got {server.tls.mode!r}"))
    elif protocol != "TLS":
        out.append(Issue(mode_path, f"PASSTHROUGH needs port.protocol TLS, got {protocol}"))
    return out


def _l4_match(match: L4MatchAttributes, path: str, out: list[Issue]) -> None:
    _common(
        match.destination_subnets,
        match.port,
        match.source_labels,
        match.gateways,
        match.source_namespace,
        path,
        out,
    )


def _tls_match(
    match: TLSMatchAttributes, hosts: Sequence[str], path: str, out: list[Issue]
) -> None:
    sni_path = field(path, "sniHosts")
    if not match.sni_hosts:
        out.append(Issue(sni_path, "must list at least one SNI host"))
    for i, sni in enumerate(match.sni_hosts):
        problem = checks.host(sni)
        if problem is None and not _within_hosts(sni, hosts):
            problem = (
                f"SNI host {sni!r} is not within any of the VirtualService's hosts "
                f"({', '.join(hosts) or 'none'})"
            )
        if problem is not None:
            out.append(Issue(item(sni_path, i), problem))
    _common(
        match.destination_subnets,
        match.port,
        match.source_labels,
        match.gateways,
        match.source_namespace,
        path,
        out,
    )


def _within_hosts(sni: str, hosts: Sequence[str]) -> bool:
    """Istio's rule: an SNI host must be a subset of one of the VirtualService's hosts
    (compared as written: `sniHosts` are matched against the ClientHello verbatim)."""
    name = sni.lower().rstrip(".")
    # host_matches covers Istio's SubsetOf: `*.a.example.com` is within `*.example.com`
    return any(host_matches(h.lower().rstrip("."), name) for h in hosts)


def _common(
    subnets: Sequence[str],
    port: int | None,
    source_labels: Mapping[str, str],
    gateways: Sequence[str],
    source_namespace: str,
    path: str,
    out: list[Issue],
) -> None:
    for i, subnet in enumerate(subnets):
        try:
            ipaddress.ip_network(subnet, strict=False)
        except ValueError:
            out.append(
                Issue(
                    item(field(path, "destinationSubnets"), i),
                    f"must be an IP address or a CIDR block, got {subnet!r}",
                )
            )
    if port is not None:
        problem = checks.port(port)
        if problem is not None:
            out.append(Issue(field(path, "port"), problem))
    for name, value in source_labels.items():
        problem = checks.label_key(name) or checks.label_value(value)
        if problem is not None:
            out.append(Issue(key(field(path, "sourceLabels"), name), problem))
    for i, ref in enumerate(gateways):
        problem = checks.gateway_ref(ref)
        if problem is not None:
            out.append(Issue(item(field(path, "gateways"), i), problem))
    if source_namespace:
        problem = checks.dns_label(source_namespace)
        if problem is not None:
            out.append(Issue(field(path, "sourceNamespace"), problem))


def _route_destinations(routes: Sequence[RouteDestination], path: str, out: list[Issue]) -> None:
    for i, dest in enumerate(routes):
        dest_path = item(path, i)
        d_path = field(dest_path, "destination")
        problem = checks.host(dest.destination.host, wildcard=False)
        if problem is not None:
            out.append(Issue(field(d_path, "host"), problem))
        if dest.destination.subset:
            problem = checks.dns_label(dest.destination.subset)
            if problem is not None:
                out.append(Issue(field(d_path, "subset"), problem))
        if dest.destination.port is not None:
            problem = checks.port(dest.destination.port.number)
            if problem is not None:
                out.append(Issue(field(d_path, "port.number"), problem))
        if not 0 <= dest.weight <= 100:
            out.append(
                Issue(field(dest_path, "weight"), f"must be between 0 and 100, got {dest.weight}")
            )
    total = sum(d.weight for d in routes)
    if len(routes) > 1 and total != 100:
        out.append(Issue(path, f"weights must add up to 100, got {total}"))


__all__ = ["PASSTHROUGH", "validate_l4_routes", "validate_server_tls"]
