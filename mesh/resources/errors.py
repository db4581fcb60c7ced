"""The package's one error type, and the field-path helpers every validator shares.

A resource error must tell a user which file, which document and which field to fix,
so the location travels with the message instead of being re-derived by each caller
(CLI, config service, tests). Paths use the notation users see in Istio and kubectl
messages: `spec.http[0].route[1].weight`, map keys as `.key` or `["a.b/c"]`.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


class Issue(NamedTuple):
    """One problem found in a document, before it is tied to a source and index."""

    path: str
    message: str


class ResourceError(Exception):
    """A resource document that cannot be accepted.

    `source` is the file name ("-" for stdin or the wire), `index` the 0-based position
    of the document within it (None when the error is not about one document, e.g. an
    unknown kind name on the command line), `path` the offending field (empty for the
    whole document), `line` the 1-based YAML line when known.

    `message` either names its own path (`spec.http[0].corsPolicy is not supported`,
    `kind Foo is not supported`) or describes the value at `path`
    (`must be between 0 and 100, got 120`); `str()` prefixes the path only in the
    second case, so both read naturally.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str = "-",
        index: int | None = None,
        path: str = "",
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.source = source
        self.index = index
        self.path = path
        self.message = message
        self.line = line

    @classmethod
    def from_issue(cls, issue: Issue, *, source: str, index: int) -> ResourceError:
        return cls(issue.message, source=source, index=index, path=issue.path)

    @property
    def detail(self) -> str:
        """The message with its field path, without the source location."""
        if not self.path or _names_path(self.message, self.path):
            return self.message
        return f"{self.path}: {self.message}"

    def __str__(self) -> str:
        parts = [self.source] if self.source else []
        if self.index is not None:
            parts.append(f"document {self.index}")
        if self.line is not None:
            parts.append(f"line {self.line}")
        parts.append(self.detail)
        return ": ".join(parts)


def _names_path(message: str, path: str) -> bool:
    return message == path or message.startswith(path + " ")


def field(path: str, name: str) -> str:
    """`spec` + `http` -> `spec.http`."""
    return f"{path}.{name}" if path else name


def item(path: str, index: int) -> str:
    """`spec.http` + 0 -> `spec.http[0]`."""
    return f"{path}[{index}]"


def key(path: str, name: str) -> str:
    """A map entry: `headers` + `end-user` -> `headers.end-user`; dotted keys are quoted."""
    if _PLAIN_KEY.fullmatch(name):
        return field(path, name)
    return f"{path}[{json.dumps(name)}]"


def unsupported(path: str) -> Issue:
    """The single wording for fields we do not implement: they must never be ignored."""
    return Issue(path, f"{path} is not supported")


def required(path: str) -> Issue:
    return Issue(path, f"{path} is required")
