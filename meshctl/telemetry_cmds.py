"""`meshctl top`, `stat`, `logs`, `trace`, `graph`: the telemetry service's HTTP API
for people (docs/architecture.md §7).

The service is found through `--telemetry URL`, else `MESH_TELEMETRY`, else
cluster.json (`telemetry.metrics` without `/metrics`, or the first
`services.telemetry[].http`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from meshctl.common import CLIError, read_cluster
from meshctl.output import add_output_flag, emit, emit_record, print_table

HTTP_TIMEOUT = 5.0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    top = sub.add_parser(
        "top", help="live table of the mesh's edges: requests/s, success, latency, gRPC statuses"
    )
    _common(top)
    top.add_argument(
        "--window", type=float, default=10.0, help="seconds of traffic per row (default 10)"
    )
    top.add_argument("--interval", type=float, default=1.0, help="refresh period in seconds")
    top.add_argument(
        "--count",
        type=int,
        default=0,
        help="stop after this many refreshes (default: until Ctrl-C)",
    )
    add_output_flag(top, help_suffix="; json/yaml: one document per refresh (JSON Lines)")
    top.set_defaults(func=cmd_top)

    stat = sub.add_parser("stat", help="one snapshot of the mesh's edges")
    _common(stat)
    stat.add_argument("--window", type=float, default=60.0, help="seconds of traffic (default 60)")
    add_output_flag(stat)
    stat.set_defaults(func=cmd_stat)

    logs = sub.add_parser("logs", help="access records of a service's proxies")
    _common(logs)
    logs.add_argument("service", nargs="?", default="", help="reporting service (default: all)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    logs.add_argument(
        "--tail", type=int, default=50, help="recent records to print first (default 50)"
    )
    add_output_flag(
        logs,
        aliases={"text": "table"},
        help_suffix="; table: Envoy-style access-log lines; json: one object per line",
    )
    logs.set_defaults(func=cmd_logs)

    trace = sub.add_parser("trace", help="one trace as a tree of spans with durations")
    _common(trace)
    trace.add_argument("trace_id", help="trace id (from `meshctl logs` or x-b3-traceid)")
    add_output_flag(trace, aliases={"tree": "table"}, help_suffix="; table: a tree of spans")
    trace.set_defaults(func=cmd_trace)

    graph = sub.add_parser("graph", help="the service graph (Graphviz dot or JSON)")
    _common(graph)
    graph.add_argument("--window", type=float, default=60.0, help="seconds of traffic (default 60)")
    add_output_flag(
        graph,
        extra=("dot",),
        default="dot",
        help_suffix="; dot: Graphviz (pipe to `dot -Tsvg`); table: the edges",
    )
    graph.set_defaults(func=cmd_graph)


add_parser = add_parsers  # the name `meshctl.main` calls on command modules


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--telemetry", help="telemetry service URL (env MESH_TELEMETRY; default from cluster.json)"
    )


# ---------------------------------------------------------------- finding and calling the service


def telemetry_url(args: argparse.Namespace) -> str:
    explicit = getattr(args, "telemetry", None) or os.environ.get("MESH_TELEMETRY")
    if explicit:
        return str(explicit).rstrip("/")
    cluster = read_cluster(args)
    metrics = (cluster.get("telemetry") or {}).get("metrics")
    if metrics:
        return str(metrics).removesuffix("/metrics").rstrip("/")
    replicas = (cluster.get("services") or {}).get("telemetry") or []
    for replica in replicas:
        if replica.get("http"):
            return str(replica["http"]).rstrip("/")
    raise CLIError("no telemetry service in cluster.json; pass --telemetry URL")


def get_json(base: str, path: str, **query: Any) -> Any:
    url = _url(base, path, query)
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise CLIError(f"error: {_error_text(e)}") from None
    except (urllib.error.URLError, OSError) as e:
        raise CLIError(f"error: telemetry service unreachable at {base}: {e}") from None


def stream_lines(base: str, path: str, **query: Any) -> Iterator[dict[str, Any]]:
    url = _url(base, path, query)
    try:
        with urllib.request.urlopen(url, timeout=None) as resp:
            for raw in resp:
                line = raw.strip()
                if line:
                    yield json.loads(line)
    except urllib.error.HTTPError as e:
        raise CLIError(f"error: {_error_text(e)}") from None
    except (urllib.error.URLError, OSError) as e:
        raise CLIError(f"error: telemetry service unreachable at {base}: {e}") from None


def _url(base: str, path: str, query: dict[str, Any]) -> str:
    q = {k: v for k, v in query.items() if v not in (None, "")}
    return f"{base}{path}" + (f"?{urllib.parse.urlencode(q)}" if q else "")


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(e.read()).get("error", e.reason))
    except (ValueError, OSError, AttributeError):
        return f"HTTP {e.code} {e.reason}"


# ---------------------------------------------------------------- top / stat


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}ms"


GRPC_STATUSES_SHOWN = 3


def grpc_cell(statuses: dict[str, int]) -> str:
    """An edge's gRPC statuses as shares of its gRPC requests, most frequent first
    (`OK 95.0% UNAVAILABLE 5.0%`); `-` without gRPC traffic."""
    total = sum(statuses.values())
    if not total:
        return "-"
    ranked = sorted(statuses.items(), key=lambda item: (-item[1], item[0]))
    cell = " ".join(f"{name} {n / total * 100:.1f}%" for name, n in ranked[:GRPC_STATUSES_SHOWN])
    hidden = len(ranked) - GRPC_STATUSES_SHOWN
    return cell + (f" +{hidden} more" if hidden > 0 else "")


def edge_rows(edges: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            f"{e['source']}.{e['source_namespace']}",
            f"{e['destination']}.{e['destination_namespace']}",
            f"{e['rps']:.1f}",
            f"{e['success_rate'] * 100:.2f}%",
            _ms(e["p50_ms"]),
            _ms(e["p90_ms"]),
            _ms(e["p99_ms"]),
            # a telemetry service older than the field sends none
            grpc_cell(e.get("grpc_statuses") or {}),
        ]
        for e in edges
    ]


EDGE_HEADERS = ["SOURCE", "DESTINATION", "RPS", "SUCCESS", "P50", "P90", "P99", "GRPC"]


def cmd_stat(args: argparse.Namespace) -> int:
    graph = get_json(telemetry_url(args), "/api/graph", window=args.window)
    emit(graph["edges"], args.output, lambda: print_table(edge_rows(graph["edges"]), EDGE_HEADERS))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    base = telemetry_url(args)
    tty = sys.stdout.isatty()
    shown = 0
    try:
        while True:
            graph = get_json(base, "/api/graph", window=args.window)
            if args.output == "table":
                if tty:
                    print("\033[H\033[2J", end="")
                stamp = datetime.datetime.now().strftime("%H:%M:%S")
                edges = len(graph["edges"])
                print(
                    f"meshctl top — {stamp} — last {args.window:g}s — {edges} edges "
                    "(Ctrl-C to stop)"
                )
                print_table(edge_rows(graph["edges"]), EDGE_HEADERS)
                sys.stdout.flush()
            else:
                record = {"time": time.time(), "window_s": args.window, "edges": graph["edges"]}
                emit_record(record, args.output)
            shown += 1
            if args.count and shown >= args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


# ---------------------------------------------------------------- logs


def format_access(r: dict[str, Any]) -> str:
    """One record in the spirit of Envoy's default access-log line."""
    t = datetime.datetime.fromtimestamp(r["time_ns"] / 1e9, datetime.UTC)
    stamp = t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
    request = f'"{r["method"]} {r["path"]} {r.get("protocol", "http").upper()}"'
    sizes = f"{r.get('bytes_received', 0)} {r.get('bytes_sent', 0)}"
    peers = f"{r.get('source_workload', '-')} -> {r.get('destination_workload', '-')}"
    hosts = f'"{r.get("authority", "")}" "{r.get("upstream_host", "") or "-"}"'
    ids = f"request_id={r.get('request_id') or '-'} trace_id={r.get('trace_id') or '-'}"
    return (
        f"[{stamp}] {request} {r['status']} {r.get('response_flags', '-')} {sizes} "
        f"{r['duration_ms']:.1f}ms {peers} {hosts} reporter={r['reporter']} "
        f"proxy={r.get('proxy_service', '-')} {ids}"
    )


def cmd_logs(args: argparse.Namespace) -> int:
    base = telemetry_url(args)

    def show(r: dict[str, Any]) -> None:
        if args.output == "table":
            print(format_access(r), flush=True)
        else:
            emit_record(r, args.output)

    try:
        if args.follow:
            for r in stream_lines(
                base, "/api/access", service=args.service, limit=args.tail, follow=1
            ):
                show(r)
            return 0
        for r in get_json(base, "/api/access", service=args.service, limit=args.tail)["records"]:
            show(r)
    except KeyboardInterrupt:
        return 0
    return 0


# ---------------------------------------------------------------- trace


def format_tree(trace: dict[str, Any]) -> list[str]:
    start = trace["start_ns"]
    lines = [
        f"trace {trace['trace_id']}  {trace['spans']} spans  {trace['duration_ms']:.3f} ms  "
        f"services: {', '.join(trace['services'])}"
    ]

    def walk(node: dict[str, Any], prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└─ " if last else "├─ ")
        offset = (node["start_ns"] - start) / 1e6
        status = node.get("status_code", 0) or "-"
        flags = (" ERROR" if node.get("error") else "") + (
            " (parent missing)" if node.get("orphan") else ""
        )
        lines.append(
            f"{prefix}{branch}{node['service']} {node['kind']} {node['name']}  "
            f"{node['duration_ms']:.3f} ms  +{offset:.3f} ms  {status}{flags}"
        )
        children = node.get("children", [])
        child_prefix = prefix if top else prefix + ("   " if last else "│  ")
        for i, child in enumerate(children):
            walk(child, child_prefix, i == len(children) - 1, False)

    for root in trace["roots"]:
        walk(root, "", True, True)
    return lines


def cmd_trace(args: argparse.Namespace) -> int:
    trace = get_json(
        telemetry_url(args), f"/api/traces/{urllib.parse.quote(args.trace_id.lower())}"
    )
    emit(trace, args.output, lambda: print("\n".join(format_tree(trace))))
    return 0


# ---------------------------------------------------------------- graph


def to_dot(graph: dict[str, Any]) -> str:
    lines = [
        "digraph mesh {",
        "  rankdir=LR;",
        '  node [shape=box, style=rounded, fontname="Helvetica"];',
    ]
    for n in graph["nodes"]:
        lines.append(f'  "{n["id"]}" [label="{n["workload"]}\\n{n["namespace"]}"];')
    for e in graph["edges"]:
        label = f"{e['rps']:.1f} rps\\n{e['success_rate'] * 100:.1f}% ok\\np99 {_ms(e['p99_ms'])}"
        color = "red" if e["success_rate"] < 0.99 else "black"
        lines.append(f'  "{e["from"]}" -> "{e["to"]}" [label="{label}", color={color}];')
    lines.append("}")
    return "\n".join(lines)


def cmd_graph(args: argparse.Namespace) -> int:
    graph = get_json(telemetry_url(args), "/api/graph", window=args.window)
    if args.output == "dot":
        print(to_dot(graph))
    else:
        emit(graph, args.output, lambda: print_table(edge_rows(graph["edges"]), EDGE_HEADERS))
    return 0
