"""`meshctl explain`: simulate one request through the mesh and say what happens, and why.

The I/O shell of `meshctl.simulate`: it resolves the caller in the registry, fetches
the compiled config the proxies hold (`config.fetch` for the destination's RouteTable
and each target's RouteTable and InboundPolicy, `registry.get` for endpoints, as
proxy/destinations.py and proxy/inbound_policy.py do), optionally reads the caller
sidecar's `/clusters` for outlier ejections, and prints the report.

Exit codes: 0 the request would be served; 3 it would be refused (403 RBAC, 404/502
NR, 503 NC/UH, an abort fault on every request), also when only part of a weighted
split is refused; 1 explain itself failed (no cluster, unknown caller, bad request).
"""

from __future__ import annotations

import argparse
import json
import re
import urllib.error
import urllib.request
from typing import Any

from mesh import errors
from mesh.bus import Bus
from mesh.compiled import InboundPolicy, RouteTable
from mesh.hosts import ServiceRef, service_of_host
from mesh.identity import principal as principal_of
from mesh.messages import (
    Endpoint,
    EndpointSet,
    EndpointsGetReply,
    EndpointsGetRequest,
    FetchRequest,
)
from meshctl.common import CLIError, with_bus
from meshctl.output import add_output_flag, emit
from meshctl.simulate import (
    Caller,
    DestinationVerdict,
    RouteVerdict,
    SimulationError,
    explain_destination,
    explain_outbound,
    final_refusal,
    parse_request,
    refused_share,
    target_service,
)

EXIT_REFUSED = 3
# `reviews-v2`: a trailing `-v<digits>...` names the version
_VERSION = re.compile(r"v\d[\w.]*")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "explain",
        help="simulate a request: which route, subset, endpoints and policies apply, and why",
        description=(
            "Explain what the mesh would do with one request, from the config the proxies "
            "hold. Exit 0: served; 3: refused (403, 404, 502, 503); 1: explain failed."
        ),
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="caller: a proxy instance id (or unique prefix, e.g. productpage-v1), "
        "a service name, or NS/SERVICE[-VERSION]",
    )
    p.add_argument("method", help="HTTP method, e.g. GET")
    p.add_argument("url", help="request URL, e.g. http://reviews:9080/reviews/0")
    p.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        help="request header 'Name: value' (repeatable)",
    )
    p.add_argument(
        "--source-label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="caller label, added to (or overriding) the registered ones (repeatable)",
    )
    p.add_argument(
        "--plaintext",
        action="store_true",
        help="the caller has no sidecar: it connects without mTLS and has no principal",
    )
    add_output_flag(p, aliases={"text": "table"})
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        request = parse_request(args.method, args.url, args.header)
    except SimulationError as e:
        raise CLIError(f"error: {e}") from None
    extra = _label_flags(args.source_label)

    async def run(bus: Bus) -> int:
        everything = await bus.request(
            bus.subjects.registry_get, EndpointsGetRequest(), EndpointsGetReply
        )
        caller, caller_endpoint = resolve_caller(args.source, everything.sets, extra)
        if args.plaintext:
            caller = Caller(caller.namespace, caller.labels, "", caller.instance)
        ref = target_service(request, caller)
        table = await _fetch_route(bus, ref) if ref else None
        route = explain_outbound(request, caller, table, _endpoints(everything.sets, ref))
        for dest in route.destinations:
            target = _service_of(dest)
            if target is None:
                explain_destination(dest, request, caller, None, None, None)
                continue
            target_table = table if target == ref else await _fetch_route(bus, target)
            inbound = await _fetch_inbound(bus, target)
            explain_destination(
                dest, request, caller, target_table, _endpoints(everything.sets, target), inbound
            )
        if caller_endpoint is not None and caller_endpoint.admin:
            _attach_health(route, caller_endpoint.admin)
        report = to_report(args, caller, route)
        emit(report, args.output, lambda: print(render(report)))
        return EXIT_REFUSED if report["verdict"]["refused"] else 0

    return with_bus(run)(args)


def _label_flags(entries: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise CLIError(f"error: --source-label {entry!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def resolve_caller(
    source: str, sets: list[EndpointSet], extra: dict[str, str]
) -> tuple[Caller, Endpoint | None]:
    """The caller named by `--from`: a registered instance (exact id, or a unique
    prefix such as `productpage-v1`), else a service (`svc`, `ns/svc`, `ns/svc-v1`)
    whose labels are those a sidecar of it would carry."""
    instances = [(s, e) for s in sets for e in s.endpoints]
    exact = [(s, e) for s, e in instances if e.instance == source]
    prefixed = exact or [(s, e) for s, e in instances if e.instance.startswith(source)]
    if prefixed:
        services = {(s.namespace, s.service, e.version) for s, e in prefixed}
        if len(services) > 1:
            names = ", ".join(sorted(e.instance for _, e in prefixed))
            raise CLIError(f"error: --from {source!r} is ambiguous: {names}")
        s, e = prefixed[0]
        return _caller(s.namespace, s.service, e.version, e, extra), e
    namespace, _, rest = source.rpartition("/")
    namespace = namespace or "default"
    for s in sets:
        if s.namespace != namespace:
            continue
        if s.service == rest:
            return _caller(namespace, rest, "", s.endpoints[0] if s.endpoints else None, extra), (
                s.endpoints[0] if s.endpoints else None
            )
        if rest.startswith(f"{s.service}-"):
            version = rest[len(s.service) + 1 :]
            for e in s.endpoints:
                if e.version == version or e.labels.get("version") == version:
                    return _caller(namespace, s.service, version, e, extra), e
    if not rest:
        raise CLIError("error: --from: give a proxy instance, SERVICE or NS/SERVICE[-VERSION]")
    # not registered: the labels and identity a sidecar of that service would have
    service, version = rest, ""
    head, _, tail = rest.rpartition("-")
    if head and _VERSION.fullmatch(tail):
        service, version = head, tail
    return _caller(namespace, service, version, None, extra), None


def _caller(
    namespace: str, service: str, version: str, ep: Endpoint | None, extra: dict[str, str]
) -> Caller:
    labels = {"app": service, **({"version": version} if version else {})}
    if ep is not None:
        labels.update(ep.labels)
    labels.update(extra)
    principal = ""
    if ep is not None and ep.identity:
        try:
            principal = principal_of(ep.identity)
        except ValueError:
            principal = ""
    if not principal:
        principal = f"cluster.local/ns/{namespace}/sa/{service}"
    return Caller(namespace, labels, principal, ep.instance if ep else "")


def _service_of(dest: DestinationVerdict) -> ServiceRef | None:
    return service_of_host(dest.destination.destination.host)


def _endpoints(sets: list[EndpointSet], ref: ServiceRef | None) -> EndpointSet | None:
    if ref is None:
        return None
    return next(
        (s for s in sets if s.namespace == ref.namespace and s.service == ref.name),
        EndpointSet(namespace=ref.namespace, service=ref.name, revision=0),
    )


async def _fetch_route(bus: Bus, ref: ServiceRef) -> RouteTable | None:
    try:
        return await bus.request(
            bus.subjects.config_fetch,
            FetchRequest(namespace=ref.namespace, name=ref.name),
            RouteTable,
        )
    except errors.NotFound:
        return None


async def _fetch_inbound(bus: Bus, ref: ServiceRef) -> InboundPolicy | None:
    try:
        return await bus.request(
            bus.subjects.config_fetch,
            FetchRequest(kind="inbound", namespace=ref.namespace, name=ref.name),
            InboundPolicy,
        )
    except errors.NotFound:
        return None


def _attach_health(route: RouteVerdict, admin: str) -> None:
    """Outlier state from the caller sidecar's /clusters, when it answers: best effort,
    the rest of the report stands without it."""
    try:
        with urllib.request.urlopen(f"{admin}/clusters", timeout=2) as r:
            data = json.loads(r.read())
    except (OSError, urllib.error.URLError, ValueError):
        return
    attach_health(route, data)


def attach_health(route: RouteVerdict, clusters: dict[str, Any]) -> None:
    """Mark each candidate endpoint with the state the caller's sidecar holds for it
    (`healthy`, `EJECTED 25s`), from its admin `/clusters` document."""
    states: dict[tuple[str, str, str], str] = {}
    for cluster in clusters.get("clusters", []):
        for e in cluster.get("endpoints", []):
            outlier = e.get("outlier") or {}
            state = e.get("health", "")
            if outlier.get("ejected"):
                state = f"EJECTED {outlier.get('ejected_for_s') or 0:.0f}s"
            key = (cluster.get("destination", ""), cluster.get("subset") or "")
            states[(*key, e.get("instance", ""))] = state
    for dest in route.destinations:
        subset = dest.destination.destination.subset
        for ev in dest.endpoints:
            ev.health = states.get((dest.service, subset, ev.endpoint.instance), "")


# ---------------------------------------------------------------- report


def to_report(args: argparse.Namespace, caller: Caller, route: RouteVerdict) -> dict[str, Any]:
    refusal = final_refusal(route)
    return {
        "request": {"method": args.method.upper(), "url": args.url, "headers": args.header},
        "caller": {
            "instance": caller.instance,
            "namespace": caller.namespace,
            "labels": dict(caller.labels),
            "principal": caller.principal,
        },
        "destination": str(route.service) if route.service else None,
        "config_revision": route.revision,
        "rules": route.rules,
        "route": (
            {"name": route.route.name, "origin": route.route.origin} if route.route else None
        ),
        "local_answer": route.local_answer,
        "policy": route.policy,
        "destinations": [_dest_report(d) for d in route.destinations],
        "verdict": {
            "refused": refusal is not None,
            "refused_percent": round(refused_share(route), 1),
            "status": refusal.status if refusal else None,
            "flag": refusal.flag if refusal else "",
            "reason": refusal.reason if refusal else "",
        },
    }


def _dest_report(d: DestinationVerdict) -> dict[str, Any]:
    target = d.destination.destination
    return {
        "host": target.host,
        "subset": target.subset,
        "weight": d.destination.weight,
        "share_percent": round(d.share, 1),
        "subset_labels": d.subset_labels,
        "path": d.request_path,
        "authority": d.request_authority,
        "refusal": d.refusal.__dict__ if d.refusal else None,
        "endpoints": [
            {
                "instance": e.endpoint.instance,
                "address": e.endpoint.address,
                "status": e.endpoint.status,
                "health": e.health,
                "mtls_mode": e.mtls_mode,
                "mtls_source": e.mtls_source,
                "authorization": {
                    "allowed": e.authz_allowed,
                    "reason": e.authz_reason,
                    "policies": e.policies,
                },
                "rate_limits": e.rate_limits,
                "refusal": e.refusal.__dict__ if e.refusal else None,
            }
            for e in d.endpoints
        ],
    }


def render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    req, caller = report["request"], report["caller"]
    who = caller["instance"] or "(not registered)"
    lines.append(f"Request   {req['method']} {req['url']}")
    lines.append(
        f"From      {who} ns={caller['namespace']} "
        f"labels={_kv(caller['labels'])} principal={caller['principal'] or 'none (plaintext)'}"
    )
    if report["destination"]:
        lines.append(f"To        {report['destination']} (config r{report['config_revision']})")
    if report["rules"]:
        lines.append("")
        lines.append("Route rules (first match wins):")
        for r in report["rules"]:
            label = f"http[{r['rule']}]" + (f" match[{r['match']}]" if r["match"] >= 0 else "")
            name = f" {r['name']}" if r["name"] else ""
            origin = f" ({r['origin']})" if r["origin"] else ""
            if r["matched"]:
                lines.append(f"  MATCH    {label}{name}{origin}")
            else:
                lines.append(f"  no       {label}{name}{origin}: {r['reason']}")
    if report["local_answer"]:
        lines.append(f"Answered by the caller's sidecar: {report['local_answer']}")
    policy = report["policy"]
    if policy:
        retries = policy["retries"]
        default = " (default)" if retries["default"] else ""
        lines.append("")
        lines.append(
            f"Policy    timeout={policy['timeout_ms'] or 'none'}"
            f"{'ms' if policy['timeout_ms'] else ''} "
            f"retries={retries['attempts']}{default} on {','.join(retries['retry_on'])}"
        )
        if "fault" in policy:
            lines.append(f"          fault={json.dumps(policy['fault'])}")
        if "mirror" in policy:
            lines.append(f"          mirror={json.dumps(policy['mirror'])}")
    for d in report["destinations"]:
        lines.append("")
        subset = f" subset {d['subset']}" if d["subset"] else ""
        lines.append(
            f"Destination {d['host']}{subset}  weight {d['weight']} "
            f"({d['share_percent']}% of traffic)"
        )
        if d["refusal"]:
            r = d["refusal"]
            lines.append(f"  REFUSED {r['status']} [{r['flag']}] {r['reason']}")
        for e in d["endpoints"]:
            health = f" {e['health']}" if e["health"] else ""
            lines.append(f"  endpoint {e['instance']} {e['address']} {e['status']}{health}")
            lines.append(f"    mTLS {e['mtls_mode']}, set by {e['mtls_source']}")
            authz = e["authorization"]
            lines.append(
                f"    authorization: {'ALLOW' if authz['allowed'] else 'DENY'} - {authz['reason']}"
            )
            for p in authz["policies"]:
                state = "matches" if p["matched"] else "does not match"
                lines.append(f"      {p['action']} {p['policy']} {state}")
                for why in p["why"]:
                    lines.append(f"        {why}")
            for rl in e["rate_limits"]:
                lines.append(
                    f"    rate limit {rl['policy']}: total {rl['total_rps'] or '-'} rps, "
                    f"per caller {rl['per_caller_rps'] or '-'} rps"
                )
            if e["refusal"]:
                r = e["refusal"]
                lines.append(f"    REFUSED {r['status']} [{r['flag']}] {r['reason']}")
    verdict = report["verdict"]
    lines.append("")
    if verdict["refused"]:
        lines.append(
            f"Verdict   REFUSED {verdict['status']} {verdict['flag']}: {verdict['reason']}"
        )
    else:
        lines.append("Verdict   SERVED")
    return "\n".join(lines)


def _kv(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"
