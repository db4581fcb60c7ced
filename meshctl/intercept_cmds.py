"""`meshctl intercept-init`: install the pod form of the interception rules
(docs/architecture.md §5.4) in the current network namespace, as an init container
does before a pod's sidecar (`meshctl sidecar --capture-port ...`) and app start."""

from __future__ import annotations

import argparse

from meshctl.common import CLIError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "intercept-init",
        help="install the interception rules of a pod (sidecar and app in one network "
        "namespace), as an init container with CAP_NET_ADMIN",
    )
    p.add_argument("--capture-port", type=int, default=15001, help="the sidecar's capture port")
    p.add_argument(
        "--inbound-port", type=int, default=15006, help="the sidecar's inbound listener port"
    )
    p.add_argument(
        "--inbound-ports",
        default="",
        metavar="PORT[,PORT...]",
        help="the app's ports: TCP to them is redirected to the inbound listener",
    )
    p.add_argument("--dns-port", type=int, default=15053, help="the sidecar's DNS port (0: none)")
    p.add_argument("--proxy-uid", type=int, default=None, help="uid the sidecar runs as")
    p.add_argument("--proxy-gid", type=int, default=None, help="gid the sidecar runs as")
    p.add_argument("--proxy-mark", type=int, default=None, help="mark on the sidecar's packets")
    p.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDR[,CIDR...]")
    p.add_argument("--exclude-ports", default="", metavar="PORT[,PORT...]")
    p.add_argument("--exclude-inbound-ports", default="", metavar="PORT[,PORT...]")
    p.add_argument(
        "--print", action="store_true", help="print the ruleset (nft syntax) and load nothing"
    )
    p.add_argument(
        "--remove", action="store_true", help="remove the rules installed before and exit"
    )
    p.set_defaults(func=cmd_intercept_init)


def cmd_intercept_init(args: argparse.Namespace) -> int:
    from proxy.intercept import netns, rules

    try:
        if args.remove:
            ruleset = rules.delete_table(rules.POD_TABLE)
        else:
            ruleset = rules.pod_ruleset(
                rules.PodSettings(
                    capture_port=args.capture_port,
                    inbound_port=args.inbound_port,
                    inbound_ports=rules.parse_ports(args.inbound_ports, "--inbound-ports"),
                    proxy_uid=args.proxy_uid,
                    proxy_gid=args.proxy_gid,
                    proxy_mark=args.proxy_mark,
                    dns_port=args.dns_port,
                    intercept=rules.InterceptSettings(
                        exclude_outbound_cidrs=rules.parse_cidrs(
                            args.exclude_outbound_cidrs, "--exclude-outbound-cidrs"
                        ),
                        exclude_ports=rules.parse_ports(args.exclude_ports, "--exclude-ports"),
                        exclude_inbound_ports=rules.parse_ports(
                            args.exclude_inbound_ports, "--exclude-inbound-ports"
                        ),
                    ),
                )
            )
        if args.print:
            print(ruleset, end="")
            return 0
        netns.require_net_admin()
        netns.load_rules(ruleset)
    except (ValueError, netns.InterceptError) as e:
        raise CLIError(str(e)) from None
    print("interception rules removed" if args.remove else "interception rules installed")
    return 0
