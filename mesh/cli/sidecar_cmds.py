"""`meshctl sidecar` and `meshctl gateway`: run a proxy (the data plane)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
from typing import Any

from mesh import logs
from mesh.cli.common import CLIError, nats_credentials, nats_urls, prefix


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"labels must be k=v[,k=v...], got {item!r}")
        out[key] = value
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", "-n", default=os.environ.get("MESH_NAMESPACE", "default"))
    p.add_argument("--labels", type=_labels, default={}, help="extra labels k=v,k=v")
    p.add_argument("--bind", default="127.0.0.1", help="address of the inbound/gateway listener")
    p.add_argument("--admin-port", type=int, default=0)
    p.add_argument("--instance", default="", help="instance id (default: generated)")
    p.add_argument("--ttl", type=int, default=10, help="registration TTL in seconds")
    p.add_argument("--drain-timeout", type=float, default=10.0)


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sc = sub.add_parser(
        "sidecar", help="run a sidecar proxy next to an app (optionally starting the app)"
    )
    sc.add_argument("--service", required=True)
    sc.add_argument("--version", default="")
    sc.add_argument(
        "--app-port", type=int, required=True, help="port the app listens on (127.0.0.1)"
    )
    sc.add_argument(
        "--tcp-port",
        type=int,
        action="append",
        default=[],
        help="TCP port the app serves on 127.0.0.1, relayed from the mesh (repeatable)",
    )
    sc.add_argument(
        "--tcp-upstream",
        action="append",
        default=[],
        metavar="SERVICE[.NS]:PORT=LOCALPORT",
        help="relay 127.0.0.1:LOCALPORT to SERVICE's TCP PORT, load balanced (repeatable)",
    )
    sc.add_argument("--inbound-port", type=int, default=0)
    sc.add_argument("--outbound-port", type=int, default=0)
    sc.add_argument("--service-account", default="")
    _common(sc)
    sc.add_argument("app", nargs=argparse.REMAINDER, help="-- command to run the app")
    sc.set_defaults(func=cmd_sidecar)

    gw = sub.add_parser("gateway", help="run an ingress gateway (no app)")
    gw.add_argument(
        "--port", type=int, required=True, help="plaintext listener for traffic entering the mesh"
    )
    gw.add_argument("--name", default="ingressgateway", help="gateway workload name")
    _common(gw)
    gw.set_defaults(func=cmd_gateway)


def _run(settings: Any, app: list[str]) -> int:
    proxy = importlib.import_module("proxy.sidecar")
    sidecar = proxy.Sidecar(settings, app)
    try:
        import uvloop

        return int(uvloop.run(sidecar.run()))
    except ImportError:
        return int(asyncio.run(sidecar.run()))


def _settings(args: argparse.Namespace, **kw: Any) -> Any:
    settings_mod = importlib.import_module("proxy.settings")
    user, password = nats_credentials(args, role="sidecar")
    return settings_mod.SidecarSettings(
        namespace=args.namespace,
        labels=args.labels,
        nats=nats_urls(args),
        prefix=prefix(args),
        bind_host=args.bind,
        admin_port=args.admin_port,
        instance=args.instance,
        register_ttl=args.ttl,
        drain_timeout=args.drain_timeout,
        nats_user=user,
        nats_password=password,
        **kw,
    )


def cmd_sidecar(args: argparse.Namespace) -> int:
    logs.configure()
    app = list(args.app)
    if app and app[0] == "--":
        app = app[1:]
    if not 0 < args.app_port < 65536:
        raise CLIError(f"--app-port must be in 1..65535, got {args.app_port}")
    tcp = importlib.import_module("proxy.tcp")
    for spec in args.tcp_upstream:
        try:
            tcp.parse_tcp_upstream(spec, args.namespace)
        except ValueError as e:
            raise CLIError(f"--tcp-upstream {spec!r}: {e}") from None
    settings = _settings(
        args,
        service=args.service,
        version=args.version,
        app_port=args.app_port,
        tcp_ports=args.tcp_port,
        tcp_upstreams=args.tcp_upstream,
        inbound_port=args.inbound_port,
        outbound_port=args.outbound_port,
        service_account=args.service_account,
    )
    return _run(settings, app)


def cmd_gateway(args: argparse.Namespace) -> int:
    logs.configure()
    labels = {"istio": args.name, **args.labels}
    args.labels = labels
    settings = _settings(args, service=args.name, gateway=True, gateway_port=args.port)
    return _run(settings, [])
