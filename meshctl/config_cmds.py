"""`meshctl apply`, `get <kind>`, `delete`, `proxy-status`, `proxy-config`."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import msgspec

from mesh.bus import Bus
from mesh.errors import MeshError
from mesh.messages import (
    ApplyReply,
    ApplyRequest,
    DeleteReply,
    DeleteRequest,
    EndpointsGetReply,
    EndpointsGetRequest,
    GetResourcesReply,
    GetResourcesRequest,
    ProxyStatusEntry,
    ResourceDocument,
    ResourceRef,
)
from mesh.resources import KINDS, ResourceError, resolve_kind
from mesh.resources.kubernetes import is_workload, skip_notice
from mesh.resources.registry import registry_kind
from mesh.status_pages import read_proxy_status
from meshctl import envoy_views
from meshctl.analysis import Message, ResourceName, parse_files
from meshctl.analyze_cmd import print_messages, run_analysis
from meshctl.common import (
    CLIError,
    add_output_flag,
    emit,
    print_table,
    read_documents,
    with_bus,
    with_namespace,
)
from meshctl.output import plain

# how long `apply` and `delete` wait for the config service; the request carries the
# deadline, and a request arriving after it is refused, never applied
WRITE_TIMEOUT_S = 10.0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ap = sub.add_parser("apply", help="create or update resources from YAML (all-or-nothing)")
    ap.add_argument(
        "-f", "--filename", action="append", required=True, help="file, directory or - (repeatable)"
    )
    ap.add_argument(
        "-n",
        "--namespace",
        default="",
        help="namespace of the documents that name none (a document naming another is refused)",
    )
    ap.add_argument("--dry-run", action="store_true", help="validate only")
    add_output_flag(ap, aliases={"text": "table"})
    ap.set_defaults(func=cmd_apply)

    de = sub.add_parser("delete", help="delete resources: -f FILE, or KIND NAME")
    de.add_argument("kind", nargs="?", default="", help="resource kind (vs, dr, gw, ...)")
    de.add_argument("names", nargs="*", help="names of the resources to delete")
    de.add_argument(
        "-f",
        "--filename",
        action="append",
        default=[],
        help="delete the resources these files define (repeatable)",
    )
    de.add_argument(
        "-n",
        "--namespace",
        default="",
        help="namespace (default: default); with -f, of the documents that name none",
    )
    de.add_argument(
        "--ignore-not-found", action="store_true", help="exit 0 when a resource does not exist"
    )
    de.set_defaults(func=cmd_delete)

    ps = sub.add_parser(
        "proxy-status",
        help="each proxy's config sync state, per subject",
        description="Per proxy and config subject: APPLIED, the revision the proxy applied; "
        "CHANGED, the revision at which the control plane last published a different "
        "config for it; STATE: SYNCED, STALE (applied rN, latest rM), REJECTED: reason, "
        "or WAITING.",
    )
    add_output_flag(ps)
    ps.set_defaults(func=cmd_proxy_status)

    pc = sub.add_parser("proxy-config", help="routes / endpoints in force in one proxy")
    pc.add_argument(
        "what", choices=["routes", "endpoints", "all"], help="what to show: routes, endpoints, all"
    )
    pc.add_argument("proxy", help="proxy instance id (or a unique prefix of it)")
    pc.add_argument("--admin", help="admin URL of the proxy (default: looked up in the registry)")
    add_output_flag(pc)
    pc.set_defaults(func=cmd_proxy_config)


# ---------------------------------------------------------------- apply


def _kind_label(kind: str) -> str:
    info = KINDS.get(kind)
    group = info.group if info is not None else ""  # "" for Kubernetes' core group
    written = info.written_kind if info is not None else kind
    return f"{written.lower()}.{group}" if group else written.lower()


def cmd_apply(args: argparse.Namespace) -> int:
    read = with_namespace(read_documents(args.filename), args.namespace)
    # workload kinds (Deployment, ServiceAccount, ...) next to mesh resources in the
    # files people have: skipped with how to run them, instead of refusing the file
    skipped = [skip_notice(str(d.body.get("kind")), d.body) for d in read if is_workload(d.body)]
    docs = [d for d in read if not is_workload(d.body)]
    if not docs:
        return _print_skipped(skipped, args.output, reply=None)

    async def run(bus: Bus) -> int:
        reply = await bus.request(
            bus.subjects.config_apply,
            ApplyRequest(
                documents=docs,
                dry_run=args.dry_run,
                deadline_unix=time.time() + WRITE_TIMEOUT_S,
            ),
            ApplyReply,
            timeout=WRITE_TIMEOUT_S,
        )
        messages = await _analyze_applied(bus, docs, reply)
        if args.output in ("json", "yaml"):
            data = _plain(reply)
            data["analysis"] = [m.as_dict() for m in messages]
            data["skipped"] = skipped
            emit(data, args.output, lambda: None)
            return 0
        suffix = " (dry run)" if args.dry_run else ""
        for r in reply.results:
            print(f"{_kind_label(r.ref.kind)}/{r.ref.name} {r.action}{suffix}")
        _print_skipped(skipped, args.output, reply)
        print_messages(messages)
        return 0

    return with_bus(run)(args)


def _print_skipped(skipped: list[str], output: str, reply: ApplyReply | None) -> int:
    if output in ("json", "yaml"):
        if reply is None:  # nothing else was sent: the document is the skips alone
            emit({"results": [], "skipped": skipped}, output, lambda: None)
    else:
        for line in skipped:
            print(line)
    return 0


async def _analyze_applied(
    bus: Bus, docs: list[ResourceDocument], reply: ApplyReply
) -> list[Message]:
    """Analyzer messages about the resources just applied (or dry-run applied: the
    documents are laid over the live config either way). The apply has succeeded
    whatever this finds; an analysis that cannot run is reported, not fatal."""
    applied = [ResourceName(r.ref.kind, r.ref.namespace, r.ref.name) for r in reply.results]
    files, _ = parse_files(docs)
    try:
        return await run_analysis(bus, files, only=applied)
    except MeshError as e:
        print(f"note: could not analyze the applied resources: {e}", file=sys.stderr)
        return []


# ---------------------------------------------------------------- get


def _summary(kind: str, body: dict[str, Any]) -> str:
    spec = body.get("spec", {})
    if kind == "VirtualService":
        gws = ",".join(spec.get("gateways", []))
        return f"hosts={','.join(spec.get('hosts', []))}" + (f" gateways={gws}" if gws else "")
    if kind == "DestinationRule":
        subsets = ",".join(s.get("name", "") for s in spec.get("subsets", []))
        return f"host={spec.get('host', '')}" + (f" subsets={subsets}" if subsets else "")
    if kind == "Gateway":
        sel = ",".join(f"{k}={v}" for k, v in spec.get("selector", {}).items())
        return f"selector={sel}"
    if kind in ("HTTPRoute", "GRPCRoute"):
        parents = ",".join(
            p.get("name", "") + (f":{p['port']}" if "port" in p else "")
            for p in spec.get("parentRefs", [])
        )
        return f"parents={parents} rules={len(spec.get('rules') or [])}"
    if kind == "Service":
        sel = ",".join(f"{k}={v}" for k, v in spec.get("selector", {}).items())
        return f"selector={sel}"
    labels = (spec.get("selector") or {}).get("matchLabels", {})
    sel = ",".join(f"{k}={v}" for k, v in labels.items())
    scope = f" selector={sel}" if sel else ""
    if kind == "PeerAuthentication":
        ports = ",".join(
            f"{p}:{m.get('mode', 'UNSET')}" for p, m in (spec.get("portLevelMtls") or {}).items()
        )
        mode = (spec.get("mtls") or {}).get("mode", "UNSET")
        return f"mode={mode}" + (f" ports={ports}" if ports else "") + scope
    if kind == "AuthorizationPolicy":
        return f"action={spec.get('action', 'ALLOW')} rules={len(spec.get('rules') or [])}" + scope
    return scope.strip()


async def get_resources(bus: Bus, args: argparse.Namespace) -> int:
    try:
        kind = resolve_kind(args.kind)
    except ResourceError as e:
        raise CLIError(f"error: {e.message}") from None
    reply = await bus.request(
        bus.subjects.config_get,
        GetResourcesRequest(
            kind=kind, namespace=args.namespace or ("default" if args.name else ""), name=args.name
        ),
        GetResourcesReply,
    )
    if args.output in ("json", "yaml"):
        items = [r.body for r in reply.resources]
        data: Any = (
            items[0]
            if args.name and len(items) == 1
            else {"apiVersion": "v1", "kind": "List", "items": items}
        )
        emit(data, args.output, lambda: None)
        return 0
    rows = [
        [r.ref.namespace, r.ref.name, r.revision, _summary(kind, r.body)] for r in reply.resources
    ]
    if not rows:
        print(f"No {kind} resources found.", file=sys.stderr)
        return 0
    print_table(rows, ["NAMESPACE", "NAME", "REVISION", "SUMMARY"])
    return 0


# ---------------------------------------------------------------- delete


def cmd_delete(args: argparse.Namespace) -> int:
    refs: list[ResourceRef] = []
    if args.filename:
        for doc in with_namespace(read_documents(args.filename), args.namespace):
            if is_workload(doc.body):
                continue  # never applied (see cmd_apply)
            meta = doc.body.get("metadata") or {}
            refs.append(
                ResourceRef(
                    kind=registry_kind(str(doc.body.get("kind", "")), doc.body.get("apiVersion")),
                    namespace=str(meta.get("namespace") or "default"),
                    name=str(meta.get("name", "")),
                )
            )
    elif args.kind and args.names:
        namespace = args.namespace or "default"
        refs = [ResourceRef(kind=args.kind, namespace=namespace, name=n) for n in args.names]
    else:
        raise CLIError("error: give -f FILE, or KIND NAME [NAME ...]")

    async def run(bus: Bus) -> int:
        reply = await bus.request(
            bus.subjects.config_delete,
            DeleteRequest(refs=refs, deadline_unix=time.time() + WRITE_TIMEOUT_S),
            DeleteReply,
            timeout=WRITE_TIMEOUT_S,
        )
        for r in reply.deleted:
            print(f"{_kind_label(r.kind)}/{r.name} deleted")
        for r in reply.not_found:
            print(f"error: {r.kind} {r.namespace}/{r.name} not found", file=sys.stderr)
        return 1 if reply.not_found and not args.ignore_not_found else 0

    return with_bus(run)(args)


# ---------------------------------------------------------------- proxy-status / proxy-config


PROXY_STATUS_HEADERS = ["PROXY", "SERVICE", "CONFIG", "APPLIED", "CHANGED", "STATE"]


def sync_state(e: ProxyStatusEntry) -> str:
    """The plain-language state of one subscription.

    APPLIED is the revision of the config the proxy applied; CHANGED the revision at
    which the control plane last published a different config for that subject. A
    proxy that fetched (at start, after a reconnect, every ~30 s) gets the unchanged
    config stamped with the newest revision of the whole config, so APPLIED is often
    above CHANGED: that is in sync, not ahead (the former LATEST column read as if
    the proxy were ahead of the control plane).
    """
    if e.state == "SYNCED":
        return "SYNCED"
    if e.state == "STALE":
        return f"STALE (applied r{e.applied_revision}, latest r{e.latest_revision})"
    if e.state == "REJECTED":
        kept = f"r{e.applied_revision} in force" if e.applied_revision else "nothing applied"
        return f"REJECTED: {e.reason or 'no reason given'} ({kept})"
    return "WAITING (nothing applied yet)"


def proxy_status_rows(entries: list[ProxyStatusEntry]) -> list[list[str]]:
    return [
        [
            e.proxy,
            f"{e.service}.{e.namespace}",
            _subject_label(e.subject),
            f"r{e.applied_revision}" if e.applied_revision else "-",
            f"r{e.latest_revision}" if e.latest_revision else "-",
            sync_state(e),
        ]
        for e in entries
    ]


def cmd_proxy_status(args: argparse.Namespace) -> int:
    async def run(bus: Bus) -> int:
        entries = await read_proxy_status(bus)

        def table() -> None:
            if not entries:
                print("No proxies have reported yet.", file=sys.stderr)
                return
            print_table(proxy_status_rows(entries), PROXY_STATUS_HEADERS)

        emit([{**_plain(e), "summary": sync_state(e)} for e in entries], args.output, table)
        return 0

    return with_bus(run)(args)


def _subject_label(subject: str) -> str:
    parts = subject.split(".")
    return f"{parts[-2]}/{parts[-1]} ({parts[-3]})" if len(parts) >= 4 else subject


def _plain(msg: msgspec.Struct) -> Any:
    return plain(msg)


def admin_url(bus: Bus, proxy: str) -> Any:
    async def find() -> str:
        reply = await bus.request(
            bus.subjects.registry_get, EndpointsGetRequest(), EndpointsGetReply
        )
        matches = [
            e
            for s in reply.sets
            for e in s.endpoints
            if e.instance == proxy or e.instance.startswith(proxy)
        ]
        if not matches:
            raise CLIError(
                f"error: no registered proxy named {proxy!r} (see `meshctl get endpoints`)"
            )
        if len(matches) > 1 and not any(e.instance == proxy for e in matches):
            names = ", ".join(e.instance for e in matches)
            raise CLIError(f"error: {proxy!r} is ambiguous: {names}")
        exact = next((e for e in matches if e.instance == proxy), matches[0])
        if not exact.admin:
            raise CLIError(f"error: proxy {exact.instance} registered no admin address")
        return exact.admin

    return find()


def http_json(url: str, allow_status: tuple[int, ...] = ()) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code in allow_status:
            return json.loads(e.read())
        raise CLIError(f"error: cannot read {url}: {e}") from None
    except OSError as e:
        raise CLIError(f"error: cannot read {url}: {e}") from None


def _outlier_state(outlier: dict[str, Any] | None) -> str:
    """The OUTLIER column: `-` without outlier detection, `ok`, or `EJECTED <left>s`;
    with how many times the endpoint was ejected so far (`(2x)`)."""
    if not outlier:
        return "-"
    times = outlier.get("times_ejected", 0)
    suffix = f" ({times}x)" if times else ""
    if outlier.get("ejected"):
        left = outlier.get("ejected_for_s") or 0
        return f"EJECTED {left:.0f}s{suffix}"
    return f"ok{suffix}"


def cmd_proxy_config(args: argparse.Namespace) -> int:
    async def run(bus: Bus) -> int:
        admin = args.admin or await admin_url(bus, args.proxy)
        if args.what == "endpoints":
            data = http_json(f"{admin}/clusters")
        else:
            data = http_json(f"{admin}/config_dump")
            if args.what == "routes" and not envoy_views.is_envoy_dump(data):
                data = {k: v.get("route_table") for k, v in data.get("destinations", {}).items()}

        def table() -> None:
            if envoy_views.is_envoy_clusters(data):
                print_table(
                    envoy_views.endpoint_rows(data),
                    ["DESTINATION", "SUBSET", "INSTANCE", "ADDRESS", "HEALTH", "ACTIVE", "OUTLIER"],
                )
            elif envoy_views.is_envoy_dump(data) and args.what == "routes":
                print_table(
                    envoy_views.route_rows(data),
                    ["DESTINATION", "RULE", "MATCHES", "ROUTE", "REVISION"],
                )
            elif args.what == "endpoints":
                rows = [
                    [
                        c["destination"],
                        c.get("subset") or "-",
                        e["instance"],
                        e["address"],
                        e["health"],
                        e.get("active_requests", 0),
                        _outlier_state(e.get("outlier")),
                    ]
                    for c in data.get("clusters", [])
                    for e in c.get("endpoints", [])
                ]
                print_table(
                    rows,
                    ["DESTINATION", "SUBSET", "INSTANCE", "ADDRESS", "HEALTH", "ACTIVE", "OUTLIER"],
                )
            elif args.what == "routes":
                rows = []
                for dest, table_ in data.items():
                    if not table_:
                        continue
                    http = table_.get("http") or [
                        {"name": "default", "route": [{"destination": {"host": table_["host"]}}]}
                    ]
                    for rule in http:
                        targets = ",".join(
                            f"{r['destination']['host']}"
                            + (
                                f"/{r['destination']['subset']}"
                                if r["destination"].get("subset")
                                else ""
                            )
                            + (
                                f" {r.get('weight', 100)}%"
                                if len(rule.get("route", [])) > 1
                                else ""
                            )
                            for r in rule.get("route", [])
                        ) or ("redirect" if rule.get("redirect") else "direct-response")
                        rows.append(
                            [
                                dest,
                                rule.get("name", ""),
                                len(rule.get("match", [])),
                                targets,
                                table_["revision"],
                            ]
                        )
                print_table(rows, ["DESTINATION", "RULE", "MATCHES", "ROUTE", "REVISION"])
            else:
                print(json.dumps(data, indent=2))

        emit(data, args.output, table)
        return 0

    return with_bus(run)(args)
