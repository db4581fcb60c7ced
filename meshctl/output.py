"""How every read command prints: `-o table|json|yaml` (kubectl's convention).

`table` (the default) is for people: columns, trees, one line per record; `json` and
`yaml` are for scripts and print the same document, built once by the command, with
keys in a stable order (the order the command builds them; nothing sorts or drops
keys per format). A command may add a format of its own (`graph -o dot`,
`token create -o token`) and keep an older name as an alias of `table` (`text`,
`tree`). An unknown format is refused by the parser: a clear error, exit 2.

Streams (`logs`, `top`) print one document per record or refresh: a JSON object per
line (JSON Lines), or YAML documents separated by `---`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import msgspec

FORMATS = ("table", "json", "yaml")


def add_output_flag(
    p: argparse.ArgumentParser,
    *,
    extra: Sequence[str] = (),
    aliases: Mapping[str, str] | None = None,
    default: str = "table",
    help_suffix: str = "",
) -> None:
    """`-o/--output FORMAT`: table, json, yaml, plus `extra` formats of this command;
    `aliases` maps older names onto a format (`{"text": "table"}`)."""
    known = (*FORMATS, *extra)
    names = dict(aliases or {})

    def output_format(text: str) -> str:
        value = names.get(text, text)
        if value not in known:
            raise argparse.ArgumentTypeError(
                f"unknown output format {text!r} (use {', '.join(known[:-1])} or {known[-1]})"
            )
        return value

    output_format.__name__ = "output format"
    p.add_argument(
        "-o",
        "--output",
        type=output_format,
        default=default,
        metavar="|".join(known),
        help=f"output format (default {default}; json and yaml print the same "
        f"document, for scripts){help_suffix}",
    )


def plain(data: Any) -> Any:
    """`data` as JSON/YAML builtins: msgspec structs (every field, defaults included,
    so that a key never comes and goes with its value; no `type` tag), dataclasses,
    tuples and sets become dicts and lists, keys in their order."""
    if isinstance(data, msgspec.Struct):
        # asdict leaves a tagged struct's tag out; a field named `type` stays
        data = msgspec.structs.asdict(data)
    elif dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    if isinstance(data, dict):
        # a document's own `type` keys (Gateway API conditions) are data: kept
        return {str(k): plain(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [plain(v) for v in data]
    if isinstance(data, set | frozenset):
        return [plain(v) for v in sorted(data, key=str)]
    if data is None or isinstance(data, bool | int | float | str):
        return data
    return str(data)


def render(data: Any, output: str) -> str:
    """One document as JSON or YAML text."""
    doc = plain(data)
    if output == "json":
        return json.dumps(doc, indent=2)
    if output == "yaml":
        import yaml  # only here: proxies import this module and never print YAML

        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False).rstrip()
    raise ValueError(f"render: {output!r} is not a document format")


def emit(data: Any, output: str, table: Callable[[], None]) -> None:
    """Print `data` as JSON or YAML, or call `table` (or a command's own format)."""
    if output in ("json", "yaml"):
        print(render(data, output))
    else:
        table()


def emit_record(data: Any, output: str, out: TextIO | None = None) -> None:
    """One record of a stream: a JSON line, or a YAML document after `---`."""
    out = out or sys.stdout
    if output == "json":
        print(json.dumps(plain(data)), file=out, flush=True)
    else:
        print("---\n" + render(data, "yaml"), file=out, flush=True)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], out: Any = None) -> None:
    out = out or sys.stdout
    text_rows = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    fmt = "   ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers).rstrip(), file=out)
    for row in text_rows:
        print(fmt.format(*row).rstrip(), file=out)


__all__ = ["FORMATS", "add_output_flag", "emit", "emit_record", "plain", "print_table", "render"]
