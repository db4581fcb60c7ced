"""Analyzers of traffic resources: VirtualService references, unreachable rules,
conflicting hosts, DestinationRule subsets without instances."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator

import msgspec

from mesh.hosts import ServiceRef, canonical_host, host_matches
from mesh.resources import (
    MESH_GATEWAY,
    DestinationRuleSpec,
    HTTPMatchRequest,
    HTTPRoute,
    Resource,
    VirtualServiceSpec,
)

from .context import Context, name_of, selects, service_of
from .messages import (
    CONFLICTING_MESH_GATEWAY_VS_HOSTS,
    REFERENCED_RESOURCE_NOT_FOUND,
    SUBSET_MATCHES_NO_INSTANCE,
    VIRTUAL_SERVICE_INEFFECTIVE_MATCH,
    VIRTUAL_SERVICE_UNREACHABLE_RULE,
    Message,
    message,
)


def _virtual_services(ctx: Context) -> Iterator[tuple[Resource, VirtualServiceSpec]]:
    for r in ctx.resources:
        if isinstance(r.spec, VirtualServiceSpec):
            yield r, r.spec


def subsets_of(ctx: Context, service: ServiceRef) -> tuple[str, ...] | None:
    """The subset names of the one DestinationRule that applies to `service` (the
    config service's choice: own namespace first, exact host over wildcard, longest
    wildcard, oldest), or None when no DestinationRule applies."""
    best: tuple[tuple[bool, bool, int, int], DestinationRuleSpec] | None = None
    for position, resource in enumerate(ctx.resources):
        spec = resource.spec
        if not isinstance(spec, DestinationRuleSpec):
            continue
        pattern = canonical_host(spec.host, resource.metadata.namespace)
        if not host_matches(pattern, service.fqdn):
            continue
        rank = (
            resource.metadata.namespace != service.namespace,
            pattern != service.fqdn,
            -len(pattern),
            position,
        )
        if best is None or rank < best[0]:
            best = (rank, spec)
    return None if best is None else tuple(s.name for s in best[1].subsets)


def destination_references(ctx: Context) -> list[Message]:
    """IST0101: a route (or mirror) to a subset no DestinationRule defines, to a host
    with no registered instance, or a VirtualService bound to a missing Gateway."""
    out: list[Message] = []
    gateways = {(r.metadata.namespace, r.metadata.name) for r in ctx.of_kind("Gateway")}
    for resource, spec in _virtual_services(ctx):
        ns = resource.metadata.namespace
        where = name_of(resource)
        for gw in spec.gateways:
            if gw == MESH_GATEWAY:
                continue
            gw_ns, _, gw_name = gw.rpartition("/")
            if (gw_ns or ns, gw_name) not in gateways:
                text = f'Referenced gateway not found: "{gw}"'
                out.append(message(REFERENCED_RESOURCE_NOT_FOUND, where, text))
        seen: set[tuple[str, str]] = set()
        l4_targets = [
            [(d.destination.host, d.destination.subset) for d in rule.route] for rule in spec.tcp
        ] + [[(d.destination.host, d.destination.subset) for d in rule.route] for rule in spec.tls]
        http_targets: list[list[tuple[str, str]]] = []
        for rule in spec.http:
            targets = [(d.destination.host, d.destination.subset) for d in rule.route]
            if rule.mirror is not None:
                targets.append((rule.mirror.host, rule.mirror.subset))
            http_targets.append(targets)
        # `tcp` / `tls` rules send to hosts and subsets too (a missing subset: closed, NC)
        for targets in (*http_targets, *l4_targets):
            for host, subset in targets:
                if (host, subset) in seen:
                    continue
                seen.add((host, subset))
                ref = service_of(host, ns)
                if ref is None:
                    continue
                if not ctx.service_known(ref):
                    out.append(
                        message(
                            REFERENCED_RESOURCE_NOT_FOUND,
                            where,
                            f'Referenced host not found: "{host}" (no instance of {ref} '
                            "is registered)",
                        )
                    )
                if subset:
                    defined = subsets_of(ctx, ref)
                    if defined is None or subset not in defined:
                        known = ", ".join(defined) if defined else "no DestinationRule"
                        out.append(
                            message(
                                REFERENCED_RESOURCE_NOT_FOUND,
                                where,
                                "Referenced host+subset in destinationrule not found: "
                                f'"{host}+{subset}" (defined: {known}; requests to it '
                                "fail 503 NC)",
                            )
                        )
    return out


def _rule_name(rule: HTTPRoute, index: int) -> str:
    return f'"{rule.name}"' if rule.name else f"#{index}"


def _match_name(match: HTTPMatchRequest, index: int) -> str:
    return f'"{match.name}"' if match.name else f"#{index}"


def _conditions(match: HTTPMatchRequest) -> str:
    """A match's conditions as canonical JSON (its name left out), to spot duplicates."""
    data = msgspec.to_builtins(match)
    data.pop("name", None)
    return json.dumps(data, sort_keys=True)


def _catch_all(rule: HTTPRoute) -> bool:
    return not rule.match or any(_conditions(m) == "{}" for m in rule.match)


def unreachable_rules(ctx: Context) -> list[Message]:
    """IST0130 / IST0131, as Istio's analyzer: a second rule without matches, a rule
    whose every match repeats an earlier one, a repeated match; and (Meshwork adds)
    any rule after one that matches every request."""
    out: list[Message] = []
    for resource, spec in _virtual_services(ctx):
        where = name_of(resource)
        seen: dict[str, str] = {}
        catch_all: str | None = None
        for i, rule in enumerate(spec.http):
            name = _rule_name(rule, i)
            if catch_all is not None:
                reason = (
                    "only the last rule can have no matches"
                    if not rule.match
                    else f"rule {catch_all} before it matches every request"
                )
                out.append(
                    message(
                        VIRTUAL_SERVICE_UNREACHABLE_RULE,
                        where,
                        f"VirtualService rule {name} not used ({reason}).",
                    )
                )
                continue
            if _catch_all(rule):
                catch_all = name
                continue
            duplicates = 0
            for j, match in enumerate(rule.match):
                key = _conditions(match)
                if key in seen:
                    duplicates += 1
                    out.append(
                        message(
                            VIRTUAL_SERVICE_INEFFECTIVE_MATCH,
                            where,
                            f"VirtualService rule {name} match {_match_name(match, j)} is not "
                            f"used (duplicate/overlapping match in rule {seen[key]}).",
                        )
                    )
                else:
                    seen[key] = name
            if duplicates == len(rule.match):
                out.append(
                    message(
                        VIRTUAL_SERVICE_UNREACHABLE_RULE,
                        where,
                        f"VirtualService rule {name} not used (all matches used by prior rules).",
                    )
                )
    return out


def conflicting_hosts(ctx: Context) -> list[Message]:
    """IST0109: two VirtualServices bound to the mesh gateway (sidecars) for one host."""
    by_host: dict[str, list[Resource]] = defaultdict(list)
    for resource, spec in _virtual_services(ctx):
        if spec.gateways and MESH_GATEWAY not in spec.gateways:
            continue
        for host in {canonical_host(h, resource.metadata.namespace) for h in spec.hosts}:
            by_host[host].append(resource)
    out: list[Message] = []
    for host, owners in sorted(by_host.items()):
        if len(owners) < 2:
            continue
        names = ",".join(sorted(f"{r.metadata.namespace}/{r.metadata.name}" for r in owners))
        for resource in owners:
            out.append(
                message(
                    CONFLICTING_MESH_GATEWAY_VS_HOSTS,
                    name_of(resource),
                    f"The VirtualServices {names} associated with mesh gateway define the same "
                    f"host {host} which can lead to undefined behavior. This can be fixed by "
                    "merging the conflicting VirtualServices into a single resource.",
                )
            )
    return out


def subsets_without_instances(ctx: Context) -> list[Message]:
    """MW0101: a DestinationRule subset whose labels no registered instance carries
    (traffic routed to it fails 503 UH). Only for services with instances at all."""
    out: list[Message] = []
    for resource in ctx.of_kind("DestinationRule"):
        spec = resource.spec
        assert isinstance(spec, DestinationRuleSpec)
        ref = service_of(spec.host, resource.metadata.namespace)
        if ref is None:
            continue
        labels = [
            w.labels for w in ctx.workloads if (w.namespace, w.service) == (ref.namespace, ref.name)
        ]
        if not labels:
            continue
        for subset in spec.subsets:
            if not any(selects(subset.labels, have) for have in labels):
                wanted = ",".join(f"{k}={v}" for k, v in sorted(subset.labels.items()))
                out.append(
                    message(
                        SUBSET_MATCHES_NO_INSTANCE,
                        name_of(resource),
                        f'Subset "{subset.name}" ({wanted}) matches no registered instance of '
                        f"{ref}: requests routed to it fail 503 UH.",
                    )
                )
    return out
