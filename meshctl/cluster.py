"""`meshctl up`, `down`, `status`: the local cluster and the control plane's health."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mesh.port_owner import port_in_use
from mesh.servers import ServerError
from meshctl import cluster_state, devcluster, serverstatus
from meshctl.common import (
    CLIError,
    add_output_flag,
    emit,
    print_table,
    progress,
    read_cluster,
    state_dir,
)
from meshctl.foreground import StopRequested, StopSignals, run_tolerant, tolerant
from meshctl.serve import available_services
from proxy.settings import DATAPLANES


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    up = sub.add_parser("up", help="start a local cluster: nats-server, etcd and the control plane")
    up.add_argument(
        "--replicas", type=int, default=1, help="replicas of each control-plane service"
    )
    up.add_argument("--detach", action="store_true", help="return once everything is ready")
    up.add_argument(
        "--secure",
        action="store_true",
        help="etcd with authentication, only the control plane holding credentials "
        "(always on with --replicas above 1; NATS always has per-role users)",
    )
    up.add_argument(
        "--demo",
        action="store_true",
        help="also run the bookinfo demo: its services under sidecars, an ingress gateway",
    )
    up.add_argument(
        "--demo-load",
        type=float,
        default=3.0,
        metavar="RPS",
        help="with --demo: background requests/s on the product page (default 3, 0: none)",
    )
    up.add_argument(
        "--ingress-port",
        type=int,
        default=0,
        help="with --demo: the ingress gateway's port (default 8080 if free, else any)",
    )
    up.add_argument(
        "--dataplane",
        choices=DATAPLANES,
        default="python",
        help="with --demo: the data plane of every demo sidecar and the gateway: our Python "
        "proxy (default) or Envoy configured over xDS",
    )
    up.add_argument(
        "--intercept",
        action="store_true",
        help="with --demo: run each app in its own network namespace with its traffic "
        "captured, no HTTP_PROXY (Linux, root; `meshctl sidecar --intercept`)",
    )
    up.add_argument(
        "--fresh",
        action="store_true",
        help="start clean: remove what an earlier cluster kept in the state dir (etcd and "
        "NATS data: applied resources, CA roots, tokens) before starting",
    )
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop everything `meshctl up` started")
    down.add_argument(
        "--purge",
        action="store_true",
        help="also remove the cluster's kept state (etcd and NATS data, logs) after stopping, "
        "so the next `meshctl up` starts clean",
    )
    down.set_defaults(func=cmd_down)

    st = sub.add_parser("status", help="control-plane replicas, their health and leaders")
    add_output_flag(st)
    st.set_defaults(func=cmd_status)


def _check_intercept() -> None:
    """Said before anything starts, rather than by every demo sidecar failing."""
    from proxy.intercept import netns

    try:
        netns.require_net_admin()
    except netns.InterceptError as e:
        raise CLIError(str(e)) from None


def cmd_up(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        raise CLIError("--replicas must be at least 1")
    if args.demo_load < 0:
        raise CLIError("--demo-load must be 0 (off) or more requests/s")
    services = [s for s in devcluster.SERVICE_ORDER if s in available_services()]
    demo = None
    if args.demo:
        missing = {"registry", "ca", "config"} - set(services)
        if missing:
            raise CLIError(f"--demo needs the {', '.join(sorted(missing))} service(s)")
        if args.intercept:
            _check_intercept()
        demo = devcluster.DemoSettings(
            load_rps=args.demo_load,
            ingress_port=args.ingress_port,
            dataplane=args.dataplane,
            intercept=args.intercept,
        )
    elif args.dataplane != "python":
        raise CLIError("--dataplane applies to the demo's proxies: add --demo")
    elif args.intercept:
        raise CLIError("--intercept applies to the demo's apps: add --demo")
    taken = port_in_use("--ingress-port", args.ingress_port) if args.demo else None
    if taken:
        raise CLIError(taken)
    with StopSignals().installed() as signals:
        try:
            return _run_cluster(args, services, demo, signals)
        except StopRequested as e:
            # a stop signal during start-up: what had started is stopped already
            tolerant(progress)(f"stopped ({signal.Signals(e.signum).name} during start-up)")
            return 128 + e.signum


def _run_cluster(
    args: argparse.Namespace,
    services: list[str],
    demo: devcluster.DemoSettings | None,
    signals: StopSignals,
) -> int:
    """Start the cluster, then (unless --detach) wait for a stop signal and stop it.
    Output failing (EPIPE, a closed terminal) never skips the stop."""
    say = tolerant(progress)
    cluster = devcluster.DevCluster(
        state_dir(args),
        replicas=args.replicas,
        services=services,
        report=say,
        demo=demo,
        etcd_auth=args.secure or args.replicas > 1,
        fresh=args.fresh,
    )
    say(
        f"meshctl up: {args.replicas} replica(s) of {', '.join(services)} in {cluster.state_dir}/"
        + (" + the bookinfo demo" if demo else "")
    )
    try:
        cluster.start()
    except ServerError as e:
        raise CLIError(f"meshctl up failed: {e}") from None
    try:
        run_tolerant(lambda: print_summary(cluster.cluster_document(), cluster.state_dir))
        if args.detach:
            return 0
        signals.raising = False
        say("running in the foreground; Ctrl-C (or `meshctl down`) stops everything")
        while not signals.requested.wait(0.5):
            dead = cluster.exited()
            if dead:
                say(f"  warning: exited: {', '.join(dead)} (see {cluster.state_dir}/logs/)")
    finally:
        if not args.detach or signals.requested.is_set():
            signals.raising = False
            say("stopping ...")
            cluster.stop()
            (cluster.state_dir / devcluster.CLUSTER_FILE).unlink(missing_ok=True)
            say("stopped")
    return 0


def print_summary(doc: dict[str, Any], where: Any) -> None:
    print("Meshwork local cluster")
    print(f"  nats:      {', '.join(doc['nats'])}")
    print(f"  etcd:      {', '.join(doc['etcd'])}")
    for service, replicas in doc["services"].items():
        print(
            f"  {service + ':':<10} " + ", ".join(f"{r['replica']} {r['http']}" for r in replicas)
        )
    if "telemetry" in doc:
        print(f"  metrics:   {doc['telemetry']['metrics']}")
        print(f"  dashboard: {doc['telemetry']['metrics'].removesuffix('/metrics')}/")
    if doc.get("ingress"):
        print(f"  ingress:   {doc['ingress']}")
    for name, sc in doc.get("sidecars", {}).items():
        print(f"  {'sidecar:':<10} {name} admin {sc['admin']} inbound {sc['inbound']}")
    if doc.get("credentials"):
        etcd = ", etcd authentication on" if doc.get("etcd_credentials") else ""
        print(f"  security:  NATS users per role (admin, control, sidecar){etcd}")
    print(f"  state:     {where}/cluster.json (0600: it holds the passwords)")
    if doc.get("ingress"):
        print(f"\nBookinfo: {doc['ingress']}/productpage  (HTML: ?format=html)")
        print('  try: meshctl top   |   the tour: README.md, "Demo: bookinfo"')
    sys.stdout.flush()


def cmd_down(args: argparse.Namespace) -> int:
    d = state_dir(args)
    say = tolerant(progress)  # `meshctl down | head -1` still stops everything
    say(f"meshctl down: {d}/")
    devcluster.down(d, say)
    _remove_stale_interception(say)
    say("everything stopped")
    if args.purge:
        removed = cluster_state.purge(d)
        say(
            f"purged {', '.join(removed)} from {d}/: the next `meshctl up` starts clean"
            if removed
            else f"nothing to purge in {d}/"
        )
    return 0


def _remove_stale_interception(say: Any) -> None:
    """Namespaces and rules of intercepted sidecars that had to be killed (they clean
    up after themselves when they stop; docs/architecture.md §5.4)."""
    from proxy.intercept import netns

    try:
        netns.require_net_admin()
    except netns.InterceptError:
        return  # nothing of ours can be there
    removed = netns.remove_stale()
    if removed:
        say(f"  removed the namespaces of killed intercepted sidecars: {', '.join(removed)}")


def _health(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
            return dict(json.loads(r.read()))
    except Exception:
        return None


def collect_status(doc: dict[str, Any]) -> dict[str, Any]:
    replicas = [(svc, r) for svc, rs in doc.get("services", {}).items() for r in rs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        healths = list(pool.map(lambda sr: _health(sr[1]["http"]), replicas))
    services: dict[str, list[dict[str, Any]]] = {}
    for (svc, r), h in zip(replicas, healths, strict=True):
        services.setdefault(svc, []).append(
            {
                "replica": r["replica"],
                "pid": r["pid"],
                "http": r["http"],
                "healthy": bool(h and h.get("ready")),
                "leader": bool(h and h.get("leader")),
                "uptime_s": h.get("uptime_s") if h else None,
            }
        )
    servers = serverstatus.servers_status(doc)
    return {
        "nats": doc.get("nats", []),
        "etcd": doc.get("etcd", []),
        "nats_nodes": servers["nats"],
        "etcd_members": servers["etcd"],
        "services": services,
    }


def cmd_status(args: argparse.Namespace) -> int:
    status = collect_status(read_cluster(args))
    healthy = all(r["healthy"] for rs in status["services"].values() for r in rs) and all(
        n["healthy"] for n in status["nats_nodes"] + status["etcd_members"]
    )

    def table() -> None:
        nats_rows = [
            [
                n["name"],
                n["url"],
                "healthy" if n["healthy"] else "DOWN",
                "" if n["connections"] is None else n["connections"],
                ",".join(n["routes_to"]) or "-",
                n["jetstream_leader"] or "-",
            ]
            for n in status["nats_nodes"]
        ]
        print_table(nats_rows, ["NATS", "URL", "HEALTH", "CONNS", "ROUTES TO", "JS META LEADER"])
        print()
        etcd_rows = [
            [
                m["name"],
                m["url"],
                "healthy" if m["healthy"] else "DOWN",
                "leader" if m["leader"] else "",
                "" if m["raft_term"] is None else m["raft_term"],
            ]
            for m in status["etcd_members"]
        ]
        print_table(etcd_rows, ["ETCD", "URL", "HEALTH", "ROLE", "RAFT TERM"])
        print()
        rows = []
        for svc, rs in status["services"].items():
            for r in rs:
                rows.append(
                    [
                        svc,
                        r["replica"],
                        r["pid"],
                        "healthy" if r["healthy"] else "DOWN",
                        "leader" if r["leader"] else "",
                        r["http"],
                    ]
                )
        print_table(rows, ["SERVICE", "REPLICA", "PID", "HEALTH", "ROLE", "HTTP"])

    emit(status, args.output, table)
    return 0 if healthy else 1
