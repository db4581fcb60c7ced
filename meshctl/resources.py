"""`meshctl get`: endpoints from the registry, resources from the config service."""

from __future__ import annotations

import argparse
from typing import Any

from mesh.bus import Bus
from mesh.messages import EndpointsGetReply, EndpointsGetRequest
from meshctl import config_cmds
from meshctl.common import CLIError, with_bus
from meshctl.output import add_output_flag, emit, plain, print_table


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    config_cmds.add_parsers(sub)
    get = sub.add_parser("get", help="show endpoints or resources")
    get.add_argument("kind", help="endpoints | a resource kind (vs, dr, gw, ...)")
    get.add_argument("name", nargs="?", default="", help="service or resource name")
    get.add_argument("-n", "--namespace", default="", help="namespace (default: all)")
    add_output_flag(get)
    get.set_defaults(func=cmd_get)


def cmd_get(args: argparse.Namespace) -> int:
    kind = args.kind.lower()
    if kind in ("endpoints", "endpoint", "ep"):
        return with_bus(lambda bus: get_endpoints(bus, args))(args)
    return with_bus(lambda bus: config_cmds.get_resources(bus, args))(args)


async def get_endpoints(bus: Bus, args: argparse.Namespace) -> int:
    name = args.name
    namespace = args.namespace
    if name and "." in name:
        name, namespace = name.split(".", 1)
    reply = await bus.request(
        bus.subjects.registry_get,
        EndpointsGetRequest(namespace=namespace, service=name if namespace else ""),
        EndpointsGetReply,
    )
    sets = [s for s in reply.sets if not name or s.service == name]
    if name and not any(s.endpoints for s in sets):
        # not found is exit 1, as for `get vs nosuch` (kubectl's convention)
        where = f"{namespace}/{name}" if namespace else name
        raise CLIError(f"error: no endpoints found for service {where}")
    data: list[dict[str, Any]] = plain(sets)

    def table() -> None:
        rows = []
        for s in sets:
            for e in s.endpoints:
                labels = ",".join(f"{k}={v}" for k, v in sorted(e.labels.items()))
                rows.append(
                    [s.namespace, s.service, e.instance, e.address, e.status, e.version, labels]
                )
        print_table(
            rows, ["NAMESPACE", "SERVICE", "INSTANCE", "ADDRESS", "STATUS", "VERSION", "LABELS"]
        )

    emit({"revision": reply.revision, "services": data}, args.output, table)
    return 0
