"""`meshctl` entry point: one parser, one module per group of commands."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from mesh import __version__, logs
from mesh.cli import (
    ca_cmds,
    cluster,
    dashboard_cmds,
    resources,
    serve,
    sidecar_cmds,
    telemetry_cmds,
)
from mesh.cli.common import CLIError

COMMAND_MODULES = [cluster, serve, resources, telemetry_cmds, ca_cmds, dashboard_cmds]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshctl", description="Meshwork service mesh CLI")
    parser.add_argument(
        "--state-dir", help="local cluster state directory (env MESH_STATE_DIR, default .mesh)"
    )
    parser.add_argument(
        "--nats", help="NATS URLs, comma-separated (overrides cluster.json; env MESH_NATS)"
    )
    parser.add_argument("--prefix", help="subject prefix (default from cluster.json, else mesh)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    v = sub.add_parser("version", help="print the version")
    v.set_defaults(func=lambda _a: print(f"meshctl {__version__}") or 0)
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    sidecar_cmds.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve" and args.command not in ("sidecar", "gateway"):
        logs.configure(level="warning", stream=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(str(e), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`meshctl status | head`): not an error of ours
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
