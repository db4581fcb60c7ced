"""meshctl conventions: global flags anywhere on the line, the state dir found like
git finds .git, help text on every flag, proxy-status columns that cannot confuse."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mesh.messages import ProxyStatusEntry
from meshctl import analyze_cmd, ca_cmds, explain_cmd, resources, telemetry_cmds
from meshctl.common import find_state_dir, state_dir
from meshctl.config_cmds import PROXY_STATUS_HEADERS, proxy_status_rows, sync_state
from meshctl.main import build_parser, hoist_global_flags


def _parse(*argv: str) -> argparse.Namespace:
    parser = build_parser()
    return parser.parse_args(hoist_global_flags(parser, argv))


@pytest.mark.parametrize(
    "argv",
    [
        ("--state-dir", "/tmp/x", "get", "vs"),
        ("get", "vs", "--state-dir", "/tmp/x"),
        ("get", "--state-dir=/tmp/x", "vs"),
        ("get", "vs", "-n", "default", "--state-dir", "/tmp/x", "-o", "json"),
    ],
)
def test_global_flags_are_accepted_before_or_after_the_command(argv: tuple[str, ...]) -> None:
    args = _parse(*argv)
    assert args.state_dir == "/tmp/x"
    assert (args.command, args.kind) == ("get", "vs")


def test_global_flags_after_nested_commands_and_several_of_them() -> None:
    args = _parse("ca", "status", "--nats", "nats://h:1", "--prefix", "p1")
    assert (args.nats, args.prefix, args.ca_command) == ("nats://h:1", "p1", "status")


def test_a_command_s_own_flag_of_the_same_name_stays_its_own() -> None:
    args = _parse("serve", "config", "--nats", "nats://own:4222", "--prefix", "own")
    assert args.nats == "nats://own:4222" and args.prefix == "own"


def test_the_state_dir_is_found_from_a_subdirectory_like_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".mesh").mkdir()
    (tmp_path / ".mesh" / "cluster.json").write_text("{}")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    monkeypatch.delenv("MESH_STATE_DIR", raising=False)
    assert find_state_dir(deep) == tmp_path / ".mesh"
    assert state_dir(argparse.Namespace(state_dir=None)) == tmp_path / ".mesh"
    # the environment and the flag still win
    monkeypatch.setenv("MESH_STATE_DIR", "/elsewhere")
    assert state_dir(argparse.Namespace(state_dir=None)) == Path("/elsewhere")
    assert state_dir(argparse.Namespace(state_dir="/flag")) == Path("/flag")


def test_without_a_cluster_above_the_state_dir_is_dot_mesh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".mesh").mkdir()  # a state dir without cluster.json is not a cluster
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MESH_STATE_DIR", raising=False)
    assert find_state_dir(tmp_path) is None
    assert state_dir(argparse.Namespace(state_dir=None)) == Path(".mesh")


# commands whose parsers live in these modules; serve, sidecar and gateway are defined
# in meshctl/serve.py and meshctl/sidecar_cmds.py (owned elsewhere this round)
# (meshctl/resources.py adds config_cmds' commands: apply, delete, proxy-status, ...)
OWN_MODULES = (resources, telemetry_cmds, ca_cmds, analyze_cmd, explain_cmd)


def _own_commands() -> set[str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    for module in OWN_MODULES:
        module.add_parser(sub)
    return set(sub.choices)


def _flags_without_help(p: argparse.ArgumentParser, path: str) -> list[str]:
    missing: list[str] = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                missing += _flags_without_help(child, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_flag_and_argument_has_help_text() -> None:
    parser = build_parser()
    top = [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]
    assert all(a.help for a in top)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        m
        for name in sorted(_own_commands())
        for m in _flags_without_help(commands.choices[name], f"meshctl {name}")
    ]
    assert missing == []


def _entry(state: str, applied: int, latest: int, reason: str = "") -> ProxyStatusEntry:
    return ProxyStatusEntry(
        proxy="productpage-v1-a",
        namespace="default",
        service="productpage",
        subject="mesh.config.route.default.reviews",
        applied_revision=applied,
        latest_revision=latest,
        state=state,  # type: ignore[arg-type]
        reason=reason,
    )


@pytest.mark.parametrize(
    ("entry", "applied", "changed", "state"),
    [
        # fetched after an unrelated change: the unchanged table carries the newer
        # revision; this used to read APPLIED 14 ahead of LATEST 12
        (_entry("SYNCED", 14, 12), "r14", "r12", "SYNCED"),
        (_entry("STALE", 12, 14), "r12", "r14", "STALE (applied r12, latest r14)"),
        (
            _entry("REJECTED", 12, 15, "bad regex"),
            "r12",
            "r15",
            "REJECTED: bad regex (r12 in force)",
        ),
        (_entry("NOT SENT", 0, 0), "-", "-", "WAITING (nothing applied yet)"),
    ],
)
def test_proxy_status_rows_say_applied_vs_changed_in_plain_language(
    entry: ProxyStatusEntry, applied: str, changed: str, state: str
) -> None:
    assert PROXY_STATUS_HEADERS == ["PROXY", "SERVICE", "CONFIG", "APPLIED", "CHANGED", "STATE"]
    [row] = proxy_status_rows([entry])
    assert row[3:] == [applied, changed, state]
    assert sync_state(entry) == state
