"""`meshctl` entry point: one parser, one module per group of commands."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from mesh import __version__, logs
from meshctl import sidecar_cmds
from meshctl.common import CLIError
from meshctl.output import add_output_flag, emit

# The proxies' commands: their processes build a parser of these alone (`main`), so
# that a sidecar does not keep the other commands' imports resident (the etcd client
# and grpc, aiohttp's server, the analyzers: ~10 MiB per sidecar, docs/architecture.md
# §5.1).
PROXY_COMMANDS = frozenset({"sidecar", "gateway"})


def command_modules() -> list[ModuleType]:
    """Every other group of commands (each module has `add_parser(sub)`)."""
    from meshctl import (
        analyze_cmd,
        ca_cmds,
        cluster,
        dashboard_cmds,
        explain_cmd,
        intercept_cmds,
        resources,
        serve,
        telemetry_cmds,
    )

    return [
        cluster,
        serve,
        resources,
        analyze_cmd,
        explain_cmd,
        telemetry_cmds,
        ca_cmds,
        dashboard_cmds,
        intercept_cmds,
    ]


# flags of meshctl itself, accepted before or after the command (kubectl's convention)
GLOBAL_FLAGS = ("--state-dir", "--nats", "--prefix")


def build_parser(*, proxy_only: bool = False) -> argparse.ArgumentParser:
    """The CLI's parser; `proxy_only`: the proxies' commands alone (`PROXY_COMMANDS`)."""
    parser = argparse.ArgumentParser(
        prog="meshctl",
        description="Meshwork service mesh CLI. Global flags (--state-dir, --nats, --prefix) "
        "may be given before or after the command.",
    )
    parser.add_argument(
        "--state-dir",
        help="local cluster state directory (env MESH_STATE_DIR; default: the first "
        ".mesh/ holding a cluster.json in this directory or a parent, else ./.mesh)",
    )
    parser.add_argument(
        "--nats", help="NATS URLs, comma-separated (overrides cluster.json; env MESH_NATS)"
    )
    parser.add_argument("--prefix", help="subject prefix (default from cluster.json, else mesh)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    v = sub.add_parser("version", help="print the version")
    add_output_flag(v)
    v.set_defaults(func=cmd_version)
    if not proxy_only:
        for module in command_modules():
            module.add_parser(sub)
    sidecar_cmds.add_parsers(sub)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The command word of `argv`: its first word that is no global flag nor its value."""
    position = 0
    while position < len(argv):
        token = argv[position]
        if not token.startswith("-"):
            return token
        name = token.split("=", 1)[0]
        position += 2 if name in GLOBAL_FLAGS and "=" not in token else 1
    return None


def cmd_version(args: argparse.Namespace) -> int:
    emit(
        {"name": "meshctl", "version": __version__},
        args.output,
        lambda: print(f"meshctl {__version__}"),
    )
    return 0


def _subcommand_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of `parser` and of its nested subcommands."""
    found: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found |= _subcommand_options(child)
        else:
            found.update(action.option_strings)
    return found


def hoist_global_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """Move global flags written after the command in front of it, so that
    `meshctl get vs --state-dir X` means `meshctl --state-dir X get vs`. A command with
    an option of the same name keeps it (`meshctl serve --nats URL` is serve's own)."""
    args = list(argv)
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    position = 0
    while position < len(args):
        token = args[position]
        if token in commands:
            break
        name = token.split("=", 1)[0]
        position += 2 if name in GLOBAL_FLAGS and "=" not in token else 1
    else:
        return args
    own = _subcommand_options(commands[args[position]])
    front: list[str] = []
    rest: list[str] = []
    i = position + 1
    while i < len(args):
        token = args[i]
        if token == "--":
            rest.extend(args[i:])
            break
        name = token.split("=", 1)[0]
        if name in GLOBAL_FLAGS and name not in own:
            if "=" in token:
                front.append(token)
                i += 1
                continue
            if i + 1 < len(args):
                front.extend(args[i : i + 2])
                i += 2
                continue
        rest.append(token)
        i += 1
    return args[:position] + front + [args[position]] + rest


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(proxy_only=command_of(argv) in PROXY_COMMANDS)
    args = parser.parse_args(hoist_global_flags(parser, argv))
    if args.command != "serve" and args.command not in ("sidecar", "gateway"):
        logs.configure(level="warning")
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
