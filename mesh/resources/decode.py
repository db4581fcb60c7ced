"""Typed decoding with msgspec, its errors rewritten in the resource path notation.

msgspec reports `Object contains unknown field `corsPolicy` - at `$.http[0]``; users
need `spec.http[0].corsPolicy is not supported`. msgspec also hides map keys
(`$.headers[...]`), which hides the one thing a user must fix in the common mistake
`end-user: jason` (instead of `end-user: {exact: jason}`), so the key is recovered by
re-checking the map's values against the field's type in order, as msgspec did.

msgspec stops at the first problem; a user fixing a document wants them all at once,
so `decode_all` removes what was wrong (an unknown field, a value of the wrong type)
from a copy and decodes again, until the document decodes or nothing can be removed.
An unknown field comes with the nearest field name the type has (difflib).
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from typing import Any, TypeVar

import msgspec

from mesh.resources.errors import Issue, field, item, key, required, unsupported

T = TypeVar("T")

_LOCATION = re.compile(
    r"^(?P<message>.*?)(?: - at `(?P<at>[^`]*)`(?: in `(?P<container>[^`]*)`)?)?$"
)
_TOKEN = re.compile(r"\.(?P<field>[^.\[]+)|\[(?P<index>\d+)\]|(?P<anykey>\[\.\.\.\])")
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<name>[^`]*)`")
_MISSING = re.compile(r"Object missing required field `(?P<name>[^`]*)`")
_EXPECTED = re.compile(r"Expected `(?P<want>[^`]*)`, got `(?P<got>[^`]*)`")
_TYPE_NAMES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


def decode(value: Any, type_: type[T], path: str) -> T | Issue:
    """`value` converted to `type_`, or the first problem msgspec found, at its path."""
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError as exc:
        return translate(str(exc), value, type_, path)


# at most this many problems reported per document
MAX_ISSUES = 20


def decode_all(value: Any, type_: type[T], path: str) -> T | list[Issue]:
    """`value` converted to `type_`, or every problem found in it (up to MAX_ISSUES)."""
    issues: list[Issue] = []
    removed: set[str] = set()
    current = value
    while len(issues) < MAX_ISSUES:
        try:
            converted = msgspec.convert(current, type_)
        except msgspec.ValidationError as exc:
            issue, trail = _translate(str(exc), current, type_, path)
            if issue.path in removed:
                break  # "required" after we removed a wrong value there: said already
            issues.append(issue)
            pruned = _without(current, trail)
            if pruned is None:
                break
            removed.add(issue.path)
            current = pruned
        else:
            return issues or converted
    return issues


def _without(value: Any, trail: list[Any] | None) -> Any:
    """A copy of `value` without the mapping entry at `trail`; None if there is none
    (a list item: removing it would renumber the paths of the problems after it)."""
    if not trail or not isinstance(trail[-1], str | int) or isinstance(trail[-1], bool):
        return None
    pruned = copy.deepcopy(value)
    parent = pruned
    for step in trail[:-1]:
        parent = parent[step[0] if isinstance(step, tuple) else step]
    if not isinstance(parent, dict) or trail[-1] not in parent:
        return None
    del parent[trail[-1]]
    return pruned


def translate(error: str, value: Any, type_: Any, base: str) -> Issue:
    """Rewrite one msgspec validation message for `value` decoded as `type_` at `base`."""
    return _translate(error, value, type_, base)[0]


def _translate(error: str, value: Any, type_: Any, base: str) -> tuple[Issue, list[Any] | None]:
    """The issue, and the keys and indices leading to what is wrong in `value` (None
    when it cannot be removed: a missing field)."""
    m = _LOCATION.match(error)
    assert m is not None  # the pattern accepts any string
    message, at, container = m["message"], m["at"], m["container"]
    if container is not None:
        # "... - at `key` in `$.labels`": a non-string map key
        path, mapping, _type, trail = _resolve(container, value, type_, base)
        keys = mapping if isinstance(mapping, dict) else {}
        bad = next((k for k in keys if not isinstance(k, str)), None)
        issue = Issue(path, f"keys must be strings, got {_describe_value(bad)}")
        return issue, [*trail, bad] if trail is not None else None
    path, _value, at_type, trail = _resolve(at or "$", value, type_, base)
    if (unknown := _UNKNOWN.fullmatch(message)) is not None:
        name = unknown["name"]
        issue = unsupported(field(path, name))
        hint = nearest(name, _field_names(at_type))
        if hint:
            issue = Issue(issue.path, f"{issue.message} (did you mean {hint}?)")
        return issue, [*trail, name] if trail is not None else None
    if (missing := _MISSING.fullmatch(message)) is not None:
        return required(field(path, missing["name"])), None
    if (expected := _EXPECTED.fullmatch(message)) is not None:
        want, got = _describe(expected["want"]), _describe(expected["got"])
        return Issue(path, f"must be {want}, got {got}"), trail
    return Issue(path, message[:1].lower() + message[1:]), trail


def nearest(name: str, candidates: list[str]) -> str:
    """The candidate closest to a misspelt `name`, or "" when none is close."""
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if not match:
        by_case = {c.lower(): c for c in candidates}
        return by_case.get(name.lower(), "")
    return match[0]


def _field_names(type_: Any) -> list[str]:
    type_ = _unwrap_optional(type_)
    if isinstance(type_, type) and issubclass(type_, msgspec.Struct):
        return [info.encode_name for info in msgspec.structs.fields(type_)]
    return []


def _resolve(at: str, value: Any, type_: Any, base: str) -> tuple[str, Any, Any, list[Any] | None]:
    """Follow a msgspec path (`$.http[0].headers[...]`) through the data and the types:
    the user's path, the value and type there, and the keys and indices to it (None
    when a map key could not be recovered)."""
    path = base
    trail: list[Any] | None = []
    for token in _TOKEN.finditer(at.removeprefix("$")):
        type_ = _unwrap_optional(type_)
        if token["field"] is not None:
            name = token["field"]
            path = field(path, name)
            type_ = _field_type(type_, name)
            value = value.get(name) if isinstance(value, dict) else None
            trail = None if trail is None else [*trail, name]
        elif token["index"] is not None:
            index = int(token["index"])
            path = item(path, index)
            type_ = _item_type(type_)
            value = value[index] if isinstance(value, list | tuple) and index < len(value) else None
            # a tuple in a trail marks a list index (never removed, see _without)
            trail = None if trail is None else [*trail, (index,)]
        else:
            type_ = _value_type(type_)
            bad = _first_invalid_entry(value, type_)
            if bad is None:
                path = f"{path}[...]"
                value = None
                trail = None
            else:
                path = key(path, str(bad))
                value = value[bad]
                trail = None if trail is None else [*trail, bad]
    return path, value, type_, trail


def _first_invalid_entry(mapping: Any, value_type: Any) -> Any:
    """The key (as found: int keys stay ints) of the first entry that does not convert."""
    if not isinstance(mapping, dict) or value_type is Any:
        return None
    for name, entry in mapping.items():
        try:
            msgspec.convert(entry, value_type)
        except msgspec.ValidationError:
            return name
    return None


def _unwrap_optional(type_: Any) -> Any:
    if typing.get_origin(type_) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(type_) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return type_


def _field_type(type_: Any, name: str) -> Any:
    if isinstance(type_, type) and issubclass(type_, msgspec.Struct):
        for info in msgspec.structs.fields(type_):
            if info.encode_name == name:
                return info.type
    return Any


def _item_type(type_: Any) -> Any:
    args = typing.get_args(type_)
    return args[0] if typing.get_origin(type_) in (list, tuple) and args else Any


def _value_type(type_: Any) -> Any:
    args = typing.get_args(type_)
    return args[1] if typing.get_origin(type_) is dict and len(args) == 2 else Any


def _describe(msgspec_type: str) -> str:
    names = [n.strip() for n in msgspec_type.split("|")]
    if len(names) > 1:
        names = [n for n in names if n != "null"]
    return " or ".join(_TYPE_NAMES.get(n, n) for n in names)


def _describe_value(value: Any) -> str:
    return f"{_TYPE_NAMES.get(type(value).__name__, type(value).__name__)} ({value!r})"
