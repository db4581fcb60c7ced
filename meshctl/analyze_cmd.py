"""`meshctl analyze`: Istio-style analyzers over the live config, plus files not yet
applied (`-f`, validated as `meshctl apply` would). Exit code 1 when any message is
an Error, else 0. Also used by `meshctl apply` to warn about what it just applied."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

from mesh.bus import Bus
from mesh.messages import (
    EndpointsGetReply,
    EndpointsGetRequest,
    GetResourcesReply,
    GetResourcesRequest,
    ResourceDocument,
)
from mesh.resources import Resource, ResourceError, parse_resource
from meshctl.analysis import Message, ResourceName, analyze, build_context, overlay, parse_files
from meshctl.common import read_documents, with_bus
from meshctl.output import add_output_flag, emit, print_table


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "analyze",
        help="find misconfigurations in the live config (and in files not applied yet)",
        description=(
            "Run Istio-style analyzers (IST0101 missing subsets, hosts and gateways, IST0109 "
            "conflicting VirtualServices, IST0130/IST0131 unreachable rules, IST0127 policies "
            "selecting nothing, MW01xx Meshwork checks) over the live config plus any files "
            "given. Exit 1 when any message is an Error."
        ),
    )
    p.add_argument(
        "-f",
        "--filename",
        action="append",
        default=[],
        help="file, directory or - to analyze as if applied (repeatable)",
    )
    add_output_flag(p)
    p.set_defaults(func=cmd_analyze)


async def live_resources(bus: Bus) -> list[Resource]:
    reply = await bus.request(
        bus.subjects.config_get, GetResourcesRequest(), GetResourcesReply, timeout=10
    )
    out: list[Resource] = []
    for stored in reply.resources:
        try:
            out.append(parse_resource(stored.body, source="live", index=0))
        except ResourceError:
            continue  # stored before a stricter validation: apply would refuse it now
    return out


async def run_analysis(
    bus: Bus, files: Sequence[Resource] = (), only: Iterable[ResourceName] | None = None
) -> list[Message]:
    live = await live_resources(bus)
    instances = await bus.request(
        bus.subjects.registry_get, EndpointsGetRequest(), EndpointsGetReply
    )
    ctx = build_context(overlay(live, files), instances.sets)
    return analyze(ctx, only)


def cmd_analyze(args: argparse.Namespace) -> int:
    docs: list[ResourceDocument] = read_documents(args.filename) if args.filename else []
    files, problems = parse_files(docs)

    async def run(bus: Bus) -> int:
        messages = problems + await run_analysis(bus, files)

        def table() -> None:
            if not messages:
                print("\u2714 No validation issues found when analyzing the live config.")
                return
            print_table(
                [[m.code, m.level, str(m.resource), m.text] for m in messages],
                ["CODE", "LEVEL", "RESOURCE", "MESSAGE"],
            )

        emit([m.as_dict() for m in messages], args.output, table)
        return 1 if any(m.level == "Error" for m in messages) else 0

    return with_bus(run)(args)


def print_messages(messages: Sequence[Message], out: TextIO | None = None) -> None:
    """Istio's one-line form: `Warning [IST0130] (VirtualService reviews.default) ...`."""
    for m in messages:
        print(str(m), file=out or sys.stderr)
