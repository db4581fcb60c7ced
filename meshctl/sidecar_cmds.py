"""`meshctl sidecar` and `meshctl gateway`: run a proxy (the data plane)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import os
from typing import Any

from mesh import logs
from mesh.port_owner import port_in_use
from meshctl.common import (
    CLIError,
    nats_credentials,
    nats_urls,
    prefix,
    read_cluster,
    state_dir,
)
from proxy.settings import DATAPLANES, ENVOY_TELEMETRY_MODES


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"labels must be k=v[,k=v...], got {item!r}")
        out[key] = value
    return out


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage, got {text!r}") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100, got {text}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--namespace",
        "-n",
        default=os.environ.get("MESH_NAMESPACE", "default"),
        help="namespace of the workload (default: MESH_NAMESPACE or default)",
    )
    p.add_argument("--labels", type=_labels, default={}, help="extra labels k=v,k=v")
    p.add_argument(
        "--bind",
        default="127.0.0.1",
        help="address of the inbound/gateway listener; a sidecar registers it, so on several "
        "hosts give this host's address (not 0.0.0.0)",
    )
    p.add_argument(
        "--admin-port",
        type=int,
        default=0,
        help="port of the admin listener (/ready, /stats/prometheus, /config_dump; 0: any)",
    )
    p.add_argument("--instance", default="", help="instance id (default: generated)")
    p.add_argument("--ttl", type=int, default=10, help="registration TTL in seconds")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="seconds a stopping proxy keeps serving in-flight requests (default 10)",
    )
    p.add_argument("--token", default=None, help="bootstrap token for the first certificate")
    p.add_argument("--token-file", default=None, help="read the bootstrap token from a file")
    p.add_argument(
        "--no-mtls",
        action="store_true",
        help="plaintext between sidecars, no certificate (development only)",
    )
    p.add_argument(
        "--no-config-signatures",
        action="store_true",
        help="apply config without verifying the control plane's signature "
        "(development only: a mesh without a CA)",
    )
    p.add_argument(
        "--cluster-id",
        default=os.environ.get("MESH_CLUSTER_ID", "Kubernetes"),
        help="cluster name in the source_cluster/destination_cluster metric labels "
        "(Istio's CLUSTER_ID; default: MESH_CLUSTER_ID or Kubernetes)",
    )
    p.add_argument(
        "--trust-domain",
        default=os.environ.get("MESH_TRUST_DOMAIN", "cluster.local"),
        help="SPIFFE trust domain of the mesh (default: MESH_TRUST_DOMAIN or cluster.local)",
    )
    p.add_argument(
        "--trace-sampling",
        type=_percent,
        default=os.environ.get("MESH_TRACE_SAMPLING", "1"),
        metavar="PERCENT",
        help="percentage of new traces sampled (default 1, or MESH_TRACE_SAMPLING)",
    )
    p.add_argument(
        "--dataplane",
        choices=DATAPLANES,
        default=os.environ.get("MESH_DATAPLANE", "python"),
        help="what carries the traffic: our Python proxy (default, or MESH_DATAPLANE) or an "
        "Envoy process this sidecar configures over xDS (needs mTLS)",
    )
    p.add_argument(
        "--envoy-on-demand",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("MESH_ENVOY_ON_DEMAND", "1") != "0",
        help="with --dataplane envoy: give Envoy a destination when a request first names "
        "it (VHDS), the default; --no-envoy-on-demand (or MESH_ENVOY_ON_DEMAND=0) gives "
        "it every service in the registry from the start (a gateway follows the hosts its "
        "routes name, an intercepting sidecar every service, either way)",
    )
    p.add_argument(
        "--envoy-telemetry",
        choices=ENVOY_TELEMETRY_MODES,
        default=os.environ.get("MESH_ENVOY_TELEMETRY", "stats"),
        help="with --dataplane envoy: how request metrics are counted: stats (the "
        "default, or MESH_ENVOY_TELEMETRY) has Envoy count them (this process reads its "
        "counters each second) and logs only 4xx/5xx, flagged and 1%% of the other "
        "requests as access records; access-log sends every request to this process "
        "over Envoy's gRPC access log (an access record for each, several times the CPU)",
    )
    p.add_argument(
        "--jwks-ca-file",
        default=os.environ.get("MESH_JWKS_CA_FILE", ""),
        help="CA bundle (PEM) for RequestAuthentication jwksUri servers (default: the system's)",
    )
    p.add_argument(
        "--no-telemetry",
        action="store_true",
        help="record no metrics, spans or access logs (to measure what telemetry costs)",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sc = sub.add_parser(
        "sidecar", help="run a sidecar proxy next to an app (optionally starting the app)"
    )
    sc.add_argument("--service", required=True, help="name of the service the app serves")
    sc.add_argument("--version", default="", help="version label of this instance (e.g. v1)")
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
    sc.add_argument(
        "--inbound-port", type=int, default=0, help="port of the mesh-facing listener (0: any)"
    )
    sc.add_argument(
        "--outbound-port",
        type=int,
        default=0,
        help="port of the app's HTTP proxy on 127.0.0.1 (HTTP_PROXY; 0: any)",
    )
    sc.add_argument(
        "--service-account",
        default="",
        help="service account in the workload's SPIFFE ID (default: the service name)",
    )
    sc.add_argument(
        "--app-protocol",
        choices=("http", "http2", "grpc"),
        default="http",
        help="what the app speaks on --app-port: HTTP/1.1 (http), or HTTP/2 cleartext "
        "(http2, grpc), like Istio's port naming",
    )
    sc.add_argument(
        "--intercept",
        action="store_true",
        help="run the app in its own network namespace and capture its outbound TCP and "
        "DNS (no HTTP_PROXY needed; Linux, root or CAP_NET_ADMIN)",
    )
    sc.add_argument(
        "--capture-port",
        type=int,
        default=0,
        help="pod form: the rules were installed by `meshctl intercept-init` in this "
        "namespace; serve the capture listener on 127.0.0.1:PORT (its --capture-port)",
    )
    sc.add_argument(
        "--dns-port",
        type=int,
        default=0,
        help="pod form: serve the DNS server on 127.0.0.1:PORT (intercept-init's --dns-port)",
    )
    sc.add_argument(
        "--exclude-outbound-cidrs",
        default="",
        metavar="CIDR[,CIDR...]",
        help="with --intercept: destinations not captured (Istio's excludeOutboundIPRanges)",
    )
    sc.add_argument(
        "--exclude-ports",
        default="",
        metavar="PORT[,PORT...]",
        help="with --intercept: outbound destination ports not captured",
    )
    sc.add_argument(
        "--exclude-inbound-ports",
        default="",
        metavar="PORT[,PORT...]",
        help="with --intercept: app ports host processes reach directly, not via the sidecar",
    )
    sc.add_argument(
        "--opaque-ports",
        default="",
        metavar="PORT[,PORT...]",
        help="with --intercept: destination ports relayed as TCP without protocol detection "
        "(server-first protocols: MySQL, SMTP; Linkerd's opaque ports)",
    )
    _common(sc)
    sc.add_argument("app", nargs=argparse.REMAINDER, help="-- command to run the app")
    sc.set_defaults(func=cmd_sidecar)

    gw = sub.add_parser("gateway", help="run an ingress gateway (no app)")
    gw.add_argument(
        "--port", type=int, required=True, help="plaintext listener for traffic entering the mesh"
    )
    gw.add_argument("--name", default="", help="gateway workload name (default: ingressgateway)")
    gw.add_argument(
        "--egress",
        action="store_true",
        help="egress role (Istio's egress gateway): named istio-egressgateway in "
        "istio-system unless --name/-n say otherwise, labels istio=egressgateway and "
        "app=istio-egressgateway, reached by sidecars over mTLS",
    )
    _common(gw)
    # resolved in cmd_gateway: the egress role has its own default namespace
    gw.set_defaults(func=cmd_gateway, namespace=None)


def _check_ports(ports: list[tuple[str, int, str]]) -> None:
    """Each (flag, port, host) free, else an error naming the flag, the port and who
    holds it: said before anything starts, instead of a traceback from the bind."""
    taken = [msg for flag, port, host in ports if (msg := port_in_use(flag, port, host))]
    if taken:
        raise CLIError("\n".join(taken))


def _run(settings: Any, app: list[str]) -> int:
    from proxy import sidecar as proxy

    sidecar = proxy.Sidecar(settings, app)
    try:
        try:
            import uvloop

            return int(uvloop.run(sidecar.run()))
        except ImportError:
            return int(asyncio.run(sidecar.run()))
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        # taken between the check and the bind
        raise CLIError(f"a port is in use: {e.strerror or e}") from None


def _bootstrap_token(args: argparse.Namespace, service_account: str) -> str:
    """--token, --token-file or MESH_TOKEN; else, next to a cluster started by
    `meshctl up` (its cluster.json), mint one from that cluster's CA: the local
    development path, so `meshctl sidecar ...` works with no extra step."""
    from mesh import errors
    from proxy import identity_client

    try:
        token = str(identity_client.resolve_token(args.token, args.token_file, os.environ))
    except errors.MeshError as e:
        raise CLIError(str(e)) from None
    if token:
        return token
    if not read_cluster(args, required=False).get("services", {}).get("ca"):
        raise CLIError(
            "no bootstrap token: pass --token, --token-file or MESH_TOKEN "
            "(`meshctl token create -n NAMESPACE --sa SERVICE_ACCOUNT`), or --no-mtls"
        )
    from meshctl import ca_cmds

    return str(ca_cmds.mint_token(args, args.namespace, service_account, wait=True))


def _cluster_state_dir(args: argparse.Namespace) -> str:
    """The state dir of the local cluster this proxy runs against, where it records
    itself for `meshctl down`: only when the cluster's NATS is the one used (a sidecar
    given only `--nats` of some other mesh has none)."""
    cluster = read_cluster(args, required=False)
    if not cluster:
        return ""
    used = set(nats_urls(args))
    if not used & set(cluster.get("nats", [])):
        return ""
    return str(state_dir(args).resolve())


def registrable_bind(address: str) -> str | None:
    """Why `--bind address` cannot be what the proxy registers (None: it can). The
    bind address is the registered one, and other hosts dial it: a wildcard would send
    them to their own loopback (docs/architecture.md §2.2)."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return None  # a host name: registered as given
    if ip.is_unspecified:
        return (
            f"--bind {address}: the bind address is the address this proxy registers, and "
            f"other hosts cannot reach {address}; pass this host's address (e.g. the pod IP)"
        )
    return None


def _settings(args: argparse.Namespace, **kw: Any) -> Any:
    from proxy import settings as settings_mod

    user, password = nats_credentials(args, role="sidecar")
    mtls = not args.no_mtls
    if args.dataplane == "envoy" and not mtls:
        raise CLIError("--dataplane envoy needs mTLS: drop --no-mtls")
    if mtls:
        account = kw.get("service_account") or kw["service"]
        kw["token"] = _bootstrap_token(args, account)
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
        mtls=mtls,
        trust_domain=args.trust_domain,
        cluster_id=args.cluster_id,
        telemetry=not args.no_telemetry,
        trace_sampling=args.trace_sampling,
        config_signatures=not args.no_config_signatures,
        dataplane=args.dataplane,
        envoy_on_demand=args.envoy_on_demand,
        envoy_telemetry=args.envoy_telemetry,
        jwks_ca_file=args.jwks_ca_file,
        cluster_state_dir=_cluster_state_dir(args),
        **kw,
    )


def cmd_sidecar(args: argparse.Namespace) -> int:
    logs.configure()
    # (a gateway may listen on every interface: clients outside the mesh reach it)
    wrong = registrable_bind(args.bind)
    if wrong:
        raise CLIError(wrong)
    app = list(args.app)
    if app and app[0] == "--":
        app = app[1:]
    if not 0 < args.app_port < 65536:
        raise CLIError(f"--app-port must be in 1..65535, got {args.app_port}")
    from proxy import tcp

    for spec in args.tcp_upstream:
        try:
            tcp.parse_tcp_upstream(spec, args.namespace)
        except ValueError as e:
            raise CLIError(f"--tcp-upstream {spec!r}: {e}") from None
    capture = _intercept_settings(args, app)
    settings = _settings(
        args,
        intercept=args.intercept,
        capture=capture,
        capture_port=args.capture_port,
        dns_port=args.dns_port,
        service=args.service,
        version=args.version,
        app_port=args.app_port,
        tcp_ports=args.tcp_port,
        tcp_upstreams=args.tcp_upstream,
        inbound_port=args.inbound_port,
        outbound_port=args.outbound_port,
        service_account=args.service_account,
        app_protocol=args.app_protocol,
    )
    ports = [("--admin-port", args.admin_port, args.bind)]
    if not _envoy_left_running(settings):
        # else that Envoy holds them, and this sidecar adopts it (docs/architecture.md §5.2)
        ports += [
            ("--inbound-port", args.inbound_port, args.bind),
            ("--outbound-port", args.outbound_port, "127.0.0.1"),
        ]
    if app and not args.intercept:
        # the sidecar starts the app there: another process holding it would be
        # registered in its place (and marked healthy once it accepts connections)
        ports.append(("--app-port", args.app_port, "127.0.0.1"))
    _check_ports(ports)
    return _run(settings, app)


def _intercept_settings(args: argparse.Namespace, app: list[str]) -> Any:
    """The capture settings; with --intercept, a clear error where it cannot work."""
    from proxy.intercept import rules

    flags = {
        "--exclude-outbound-cidrs": args.exclude_outbound_cidrs,
        "--exclude-ports": args.exclude_ports,
        "--exclude-inbound-ports": args.exclude_inbound_ports,
        "--opaque-ports": args.opaque_ports,
    }
    for flag, port in (("--capture-port", args.capture_port), ("--dns-port", args.dns_port)):
        if not 0 <= port < 65536:
            raise CLIError(f"{flag} must be in 1..65535, got {port}")
    if args.intercept and args.capture_port:
        raise CLIError(
            "--intercept (the sidecar makes the app's namespace) and --capture-port (the "
            "pod form, rules from intercept-init) exclude each other"
        )
    if args.dns_port and not args.capture_port:
        raise CLIError("--dns-port belongs to the pod form: add --capture-port")
    if args.capture_port:
        # the rules live in intercept-init; only what the listener reads applies here
        ruled = [f for f in flags if f != "--opaque-ports" and flags[f]]
        if ruled:
            raise CLIError(f"{', '.join(ruled)}: pass them to `meshctl intercept-init`")
        try:
            return rules.InterceptSettings(
                opaque_ports=rules.parse_ports(args.opaque_ports, "--opaque-ports")
            )
        except ValueError as e:
            raise CLIError(str(e)) from None
    if not args.intercept:
        given = [flag for flag, value in flags.items() if value]
        if given:
            raise CLIError(f"{', '.join(given)} only apply with --intercept or --capture-port")
        return rules.InterceptSettings()
    if not app:
        raise CLIError("--intercept needs the app's command: meshctl sidecar ... -- APP")
    from proxy.intercept import netns

    try:
        netns.require_net_admin()
        return rules.InterceptSettings(
            exclude_outbound_cidrs=rules.parse_cidrs(
                args.exclude_outbound_cidrs, "--exclude-outbound-cidrs"
            ),
            exclude_ports=rules.parse_ports(args.exclude_ports, "--exclude-ports"),
            exclude_inbound_ports=rules.parse_ports(
                args.exclude_inbound_ports, "--exclude-inbound-ports"
            ),
            opaque_ports=rules.parse_ports(args.opaque_ports, "--opaque-ports"),
        )
    except (ValueError, netns.InterceptError) as e:
        raise CLIError(str(e)) from None


def gateway_labels(name: str, labels: dict[str, str]) -> dict[str, str]:
    """The labels of a gateway workload: Istio's, so the selectors of Istio's docs match
    it (`istio: ingressgateway` and `app: istio-ingressgateway` for the default name);
    `--labels` add to or override them."""
    short = name.removeprefix("istio-")
    return {"istio": short, "app": f"istio-{short}", **labels}


def gateway_workload(
    name: str, namespace: str | None, labels: dict[str, str], *, egress: bool
) -> tuple[str, str, dict[str, str]]:
    """(name, namespace, labels) of a gateway as `meshctl gateway` runs it: the egress
    role is Istio's `istio-egressgateway` in `istio-system` with its labels, so the
    egress-gateway task's selectors and hosts find it; flags given win."""
    if namespace is None:
        namespace = os.environ.get("MESH_NAMESPACE", "istio-system" if egress else "default")
    if egress:  # the role's labels whatever the name: Istio's task selects on them
        name = name or "istio-egressgateway"
        return name, namespace, gateway_labels("istio-egressgateway", labels)
    name = name or "ingressgateway"
    return name, namespace, gateway_labels(name, labels)


def cmd_gateway(args: argparse.Namespace) -> int:
    logs.configure()
    args.name, args.namespace, args.labels = gateway_workload(
        args.name, args.namespace, args.labels, egress=args.egress
    )
    settings = _settings(args, service=args.name, gateway=True, gateway_port=args.port)
    ports = [("--admin-port", args.admin_port, args.bind)]
    if not _envoy_left_running(settings):
        ports.append(("--port", args.port, args.bind))
    _check_ports(ports)
    return _run(settings, [])


def _envoy_left_running(settings: Any) -> bool:
    """An Envoy a previous sidecar of this instance left serving (it died): the new one
    adopts it, listening ports included, so those are not "in use" by someone else."""
    if settings.dataplane != "envoy":
        return False
    from proxy.dataplane import envoy_host
    from proxy.envoy import process

    return process.find_running_envoy(envoy_host.instance_state_dir(settings)) is not None
