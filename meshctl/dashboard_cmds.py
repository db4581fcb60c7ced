"""`meshctl dashboard`: where the dashboard is (the telemetry service's HTTP address,
found as `meshctl top` finds it), printed, and opened in a browser with `--open`."""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request
import webbrowser

from meshctl.common import CLIError
from meshctl.output import add_output_flag, emit
from meshctl.telemetry_cmds import HTTP_TIMEOUT, telemetry_url


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "dashboard", help="print the dashboard's URL (the telemetry service), or open it"
    )
    p.add_argument(
        "--telemetry", help="telemetry service URL (env MESH_TELEMETRY; default from cluster.json)"
    )
    p.add_argument("--open", action="store_true", help="open it in the default browser")
    p.add_argument(
        "--page",
        choices=("graph", "traces", "access", "config"),
        default="graph",
        help="the page to show (default graph)",
    )
    add_output_flag(p)
    p.set_defaults(func=run)


def dashboard_url(base: str, page: str = "graph") -> str:
    return f"{base}/#/{page}"


def run(args: argparse.Namespace) -> int:
    base = telemetry_url(args)
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=HTTP_TIMEOUT):
            pass
    except (urllib.error.URLError, OSError) as e:
        raise CLIError(f"the telemetry service at {base} does not answer ({e})") from None
    url = dashboard_url(base, args.page)
    emit({"url": url, "telemetry": base, "page": args.page}, args.output, lambda: print(url))
    if args.open and not webbrowser.open(url):
        raise CLIError("no browser to open here; open the URL above yourself")
    return 0
