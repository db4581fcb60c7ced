"""`meshctl serve <service>`: run one control-plane replica (what `up`, the container
image and systemd units run)."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable

from mesh import errors, logs
from mesh.port_owner import port_in_use
from mesh.service import ControlPlaneService, ServiceConfig
from meshctl.common import CLIError


def _registry() -> type[ControlPlaneService]:
    from services.registry import RegistryService

    return RegistryService


def _config() -> type[ControlPlaneService]:
    from services.config import ConfigService

    return ConfigService


def _ca() -> type[ControlPlaneService]:
    from services.ca import CAService

    return CAService


def _telemetry() -> type[ControlPlaneService]:
    from services.telemetry import TelemetryService

    return TelemetryService


# each service is imported only by the command that runs it: importing all four would
# slow every `meshctl` command (the CLI is the composition root: docs/architecture.md §1)
SERVICES: dict[str, Callable[[], type[ControlPlaneService]]] = {
    "registry": _registry,
    "config": _config,
    "ca": _ca,
    "telemetry": _telemetry,
}


def service_class(name: str) -> type[ControlPlaneService]:
    return SERVICES[name]()


def available_services() -> list[str]:
    """The control-plane services `meshctl serve` runs, in no particular order."""
    return list(SERVICES)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run one control-plane service replica")
    p.add_argument("service", choices=sorted(SERVICES))
    p.add_argument(
        "--nats",
        default=os.environ.get("MESH_NATS", "nats://127.0.0.1:4222"),
        help="NATS URLs, comma-separated (env MESH_NATS)",
    )
    p.add_argument(
        "--etcd",
        default=os.environ.get("MESH_ETCD", "http://127.0.0.1:2379"),
        help="etcd URLs, comma-separated (env MESH_ETCD)",
    )
    p.add_argument(
        "--prefix",
        default=os.environ.get("MESH_PREFIX", "mesh"),
        help="subject prefix; the etcd key prefix is /<prefix>/",
    )
    p.add_argument(
        "--http-host",
        default=os.environ.get("MESH_HTTP_HOST", "127.0.0.1"),
        help="address of /healthz, /readyz, /metrics (and the dashboard) (env MESH_HTTP_HOST)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=int(os.environ.get("MESH_HTTP_PORT", "0")),
        help="port of that HTTP listener; 0 picks a free one (env MESH_HTTP_PORT)",
    )
    p.add_argument(
        "--replica",
        default=os.environ.get("MESH_REPLICA", ""),
        help="replica id (default: host-pid)",
    )
    p.add_argument("--election-ttl", type=int, default=5, help="leader lease TTL in seconds")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="service-specific option (repeatable)",
    )
    p.add_argument(
        "--otlp-endpoint",
        default=os.environ.get("MESH_OTLP_ENDPOINT", ""),
        metavar="URL",
        help="telemetry: export spans and request metrics over OTLP to this collector, "
        "e.g. http://127.0.0.1:4318 (grpc: http://127.0.0.1:4317; https for TLS) "
        "(env MESH_OTLP_ENDPOINT)",
    )
    p.add_argument(
        "--otlp-protocol",
        choices=("http/protobuf", "http/json", "grpc"),
        default=os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        help="telemetry: OTLP transport (env OTEL_EXPORTER_OTLP_PROTOCOL; default http/protobuf)",
    )
    p.add_argument(
        "--otlp-metrics-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="telemetry: export the request metrics every this many seconds (default 60)",
    )
    p.add_argument(
        "--otlp-header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="telemetry: a header sent with every OTLP export, e.g. for auth (repeatable)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logs.configure()
    options = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"meshctl serve: --set expects KEY=VALUE, got {item!r}")
        options[key] = value
    if args.otlp_endpoint:
        options["otlp-endpoint"] = args.otlp_endpoint
        options.setdefault("otlp-protocol", args.otlp_protocol)
    if args.otlp_metrics_interval is not None:
        options["otlp-metrics-interval-s"] = str(args.otlp_metrics_interval)
    if args.otlp_header:
        for item in args.otlp_header:
            if "=" not in item:
                raise SystemExit(
                    "meshctl serve: --otlp-header expects NAME=VALUE (entry without =)"
                )
        options["otlp-headers"] = ",".join(args.otlp_header)
    taken = port_in_use("--http-port", args.http_port, args.http_host)
    if taken:
        raise CLIError(taken)
    config = ServiceConfig(
        nats=[u for u in args.nats.split(",") if u],
        etcd=[u for u in args.etcd.split(",") if u],
        prefix=args.prefix,
        etcd_prefix=f"/{args.prefix}/",
        http_host=args.http_host,
        http_port=args.http_port,
        replica=args.replica,
        election_ttl=args.election_ttl,
        nats_user=os.environ.get("MESH_NATS_USER"),
        nats_password=os.environ.get("MESH_NATS_PASSWORD"),
        etcd_user=os.environ.get("MESH_ETCD_USER"),
        etcd_password=os.environ.get("MESH_ETCD_PASSWORD"),
        options=options,
    )
    try:
        service = service_class(args.service)(config)
    except errors.BadRequest as e:
        # an option refused (`--set`, `--otlp-*`, or OTEL_EXPORTER_OTLP_PROTOCOL): say
        # which, without a traceback
        raise CLIError(f"meshctl serve {args.service}: {e}") from None
    # the default loop on purpose: grpc.aio (etcd) is not supported on uvloop, and the
    # control plane is not the data path
    asyncio.run(service.run())
    return 0
