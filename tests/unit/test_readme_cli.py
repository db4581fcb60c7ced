"""The README's CLI reference agrees with `meshctl --help`: every command it lists
exists, every flag it shows is accepted by that command, and every top-level command
is documented."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from meshctl.main import GLOBAL_FLAGS, build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _reference_rows() -> list[str]:
    text = README.read_text()
    section = text.split("## CLI reference\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `meshctl")]


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    found: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found |= _options(child)
        found.update(action.option_strings)
    return found


def _documented() -> dict[str, set[str]]:
    """command -> flags shown for it, from every `meshctl ...` code span of the table's
    first column."""
    documented: dict[str, set[str]] = {}
    for row in _reference_rows():
        first_cell = row.split(" | ")[0]
        for span in re.findall(r"`(meshctl [^`]*)`", first_cell):
            words = span.split()
            flags = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", span))
            documented.setdefault(words[1], set()).update(flags)
    return documented


def test_every_command_in_the_readme_exists_with_the_flags_it_shows() -> None:
    commands = _commands()
    documented = _documented()
    assert documented, "README has no CLI reference table"
    unknown = sorted(set(documented) - set(commands))
    assert unknown == [], f"README documents commands meshctl does not have: {unknown}"
    bad = {
        name: sorted(flags - _options(commands[name]) - set(GLOBAL_FLAGS))
        for name, flags in documented.items()
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_every_top_level_command_is_in_the_readme() -> None:
    missing = sorted(set(_commands()) - set(_documented()))
    assert missing == [], f"README's CLI reference omits: {missing}"
