"""`-o table|json|yaml` on every read command (meshctl/output.py): one flag, one
renderer; json and yaml print the same document; an unknown format is exit 2 with
an error naming it and the formats there are."""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass

import pytest
import yaml

from mesh.messages import ProxyStatusEntry
from meshctl.main import build_parser, main
from meshctl.output import add_output_flag, emit, emit_record, plain, render

# every command that reads and prints, with the arguments it needs to parse
READ_COMMANDS = [
    ["version"],
    ["status"],
    ["get", "endpoints"],
    ["get", "vs", "reviews"],
    ["proxy-status"],
    ["proxy-config", "routes", "productpage"],
    ["analyze"],
    ["explain", "--from", "productpage", "GET", "http://reviews:9080/"],
    ["top"],
    ["stat"],
    ["logs"],
    ["trace", "0af7651916cd43dd8448eb211c80319c"],
    ["graph"],
    ["dashboard"],
    ["ca", "status"],
    ["cert", "productpage"],
    ["apply", "-f", "x.yaml"],
    ["token", "create", "--sa", "reviews"],
    ["ca", "rotate-root"],
    ["ca", "bundle"],
]


@pytest.mark.parametrize("argv", READ_COMMANDS, ids=lambda a: " ".join(a[:2]))
@pytest.mark.parametrize("fmt", ["table", "json", "yaml"])
def test_every_read_command_takes_table_json_and_yaml(argv: list[str], fmt: str) -> None:
    args = build_parser().parse_args([*argv, "-o", fmt])
    assert args.output == fmt


@pytest.mark.parametrize("argv", READ_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_an_unknown_format_is_exit_2_naming_it(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main([*argv, "-o", "xml"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown output format 'xml'" in err and "table, json" in err and "yaml" in err


def test_people_get_a_table_by_default() -> None:
    parser = build_parser()
    defaults = {" ".join(a): parser.parse_args(a).output for a in READ_COMMANDS}
    # graph's own form stays Graphviz dot (it is piped into `dot -Tsvg`); a token is
    # printed bare so that `$(meshctl token create ...)` works
    assert defaults.pop("graph") == "dot"
    assert defaults.pop("token create --sa reviews") == "token"
    assert defaults.pop("ca bundle") == "pem"  # for `openssl verify -CAfile`
    assert set(defaults.values()) == {"table"}


def test_every_output_flag_in_meshctl_offers_all_three_formats() -> None:
    """No command grows a `-o` of its own that lacks yaml (or table) again."""

    def walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    missing += walk(child, f"{path} {name}")
            elif "--output" in action.option_strings:
                for fmt in ("table", "json", "yaml"):
                    try:
                        action.type(fmt)  # type: ignore[misc]
                    except argparse.ArgumentTypeError:
                        missing.append(f"{path} -o {fmt}")
        return missing

    assert walk(build_parser(), "meshctl") == []


@pytest.mark.parametrize(
    ("argv", "alias", "meaning"),
    [
        (["logs"], "text", "table"),
        (["explain", "--from", "a", "GET", "http://b/"], "text", "table"),
        (["apply", "-f", "x"], "text", "table"),
        (["trace", "abc"], "tree", "table"),
        (["graph"], "dot", "dot"),
    ],
)
def test_older_format_names_still_work(argv: list[str], alias: str, meaning: str) -> None:
    assert build_parser().parse_args([*argv, "-o", alias]).output == meaning


@dataclass(frozen=True)
class Point:
    x: int
    tags: tuple[str, ...]


def test_plain_turns_structs_dataclasses_and_tuples_into_builtins_in_order() -> None:
    entry = ProxyStatusEntry(
        proxy="p", namespace="default", service="s", subject="x",
        applied_revision=2, latest_revision=3, state="STALE",
    )  # fmt: skip
    doc = plain({"entry": entry, "point": Point(1, ("a", "b")), "set": {"b", "a"}})
    assert doc == {
        "entry": {
            "proxy": "p", "namespace": "default", "service": "s", "subject": "x",
            "applied_revision": 2, "latest_revision": 3, "state": "STALE", "reason": "",
            "age_s": 0.0,
        },
        "point": {"x": 1, "tags": ["a", "b"]},
        "set": ["a", "b"],
    }  # fmt: skip
    assert list(doc["entry"]) == list(msgspec_field_order())


def msgspec_field_order() -> tuple[str, ...]:
    return ProxyStatusEntry.__struct_fields__


def test_json_and_yaml_print_the_same_document_with_the_same_key_order() -> None:
    data = {"zeta": 1, "alpha": [{"b": 2, "a": None}], "when": "2026-01-01T00:00:00Z"}
    as_json = json.loads(render(data, "json"))
    as_yaml = yaml.safe_load(render(data, "yaml"))
    assert as_json == as_yaml == data
    assert list(as_yaml) == ["zeta", "alpha", "when"]  # not sorted: stable, as built


def test_emit_calls_the_table_only_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    shown = []
    emit({"a": 1}, "table", lambda: shown.append("table"))
    assert shown == ["table"] and capsys.readouterr().out == ""
    emit({"a": 1}, "yaml", lambda: shown.append("table"))
    assert shown == ["table"] and capsys.readouterr().out == "a: 1\n"


def test_stream_records_are_json_lines_or_yaml_documents() -> None:
    out = io.StringIO()
    for i in range(2):
        emit_record({"n": i, "path": "/x"}, "json", out)
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [
        {"n": 0, "path": "/x"},
        {"n": 1, "path": "/x"},
    ]
    out = io.StringIO()
    for i in range(2):
        emit_record({"n": i}, "yaml", out)
    assert list(yaml.safe_load_all(out.getvalue())) == [{"n": 0}, {"n": 1}]


def test_a_command_can_add_a_format_of_its_own() -> None:
    p = argparse.ArgumentParser()
    add_output_flag(p, extra=("dot",), default="dot")
    assert p.parse_args([]).output == "dot"
    assert p.parse_args(["-o", "yaml"]).output == "yaml"
