"""What a Python sidecar keeps resident: `meshctl sidecar|gateway` builds a parser of the
proxies' commands alone, and what only some configurations use is imported when used
(docs/architecture.md §5.1, "Memory"), so a sidecar's memory stays below Envoy's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshctl.main import PROXY_COMMANDS, build_parser, command_of

ROOT = Path(__file__).resolve().parents[2]

# packages only the Envoy data plane, the other commands, gRPC ext_authz, JWT
# authentication or YAML output use
NOT_IN_A_PYTHON_SIDECAR = (
    "envoy",
    "google.protobuf",
    "grpc",
    "aetcd",
    "jwt",
    "yaml",
    "mesh.resources",
    "meshctl.serve",
    "meshctl.analyze_cmd",
    "proxy.envoy",
    "proxy.dataplane.envoy",
)

_PROBE = """
import json, sys
from meshctl.main import main
try:
    main(["sidecar", "--help"])
except SystemExit:
    pass
import proxy.sidecar, proxy.dataplane.python, proxy.http.h2.server, proxy.http.h2.client
print(json.dumps(sorted(sys.modules)))
"""


def test_a_python_sidecar_does_not_import_what_it_does_not_use() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    loaded = [
        m for m in modules for p in NOT_IN_A_PYTHON_SIDECAR if m == p or m.startswith(p + ".")
    ]
    assert loaded == []


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["sidecar", "--service", "a"], "sidecar"),
        (["--nats", "nats://x:4222", "--prefix", "p", "gateway"], "gateway"),
        (["--state-dir=/tmp/s", "get", "vs"], "get"),
        (["--help"], None),
    ],
)
def test_the_command_word_skips_global_flags_and_their_values(
    argv: list[str], command: str | None
) -> None:
    assert command_of(argv) == command


def test_the_proxies_parser_reads_their_flags_as_the_full_one_does() -> None:
    argv = ["--nats", "nats://x:4222", "sidecar", "--service", "a", "--app-port", "8080",
            "--app-protocol", "grpc", "--prefix", "p"]  # fmt: skip
    from meshctl.main import hoist_global_flags

    lean, full = build_parser(proxy_only=True), build_parser()
    a = lean.parse_args(hoist_global_flags(lean, argv))
    b = full.parse_args(hoist_global_flags(full, argv))
    assert {k: v for k, v in vars(a).items() if k != "func"} == {
        k: v for k, v in vars(b).items() if k != "func"
    }
    assert a.func is b.func
    assert {"sidecar", "gateway"} == PROXY_COMMANDS
