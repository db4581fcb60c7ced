"""Checks on single values (names, hosts, headers, labels, ports, regexes).

Each returns None when the value is acceptable, else a message describing the value,
so validators can attach it to whatever path they are at. Hosts are compared
case-insensitively, as DNS and `mesh.hosts.canonical_host` do.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# RFC 9110 token: the characters allowed in a header field name
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")

# Istio compiles regexes with RE2, which has no backtracking constructs; Python's `re`
# accepts them, so a pattern that works here would be rejected by Istio and could
# backtrack exponentially on a hostile request path.
_RE2_UNSUPPORTED = {
    "GROUPREF": "backreferences",
    "GROUPREF_EXISTS": "conditional groups",
    "ASSERT": "lookahead/lookbehind assertions",
    "ASSERT_NOT": "lookahead/lookbehind assertions",
    "ATOMIC_GROUP": "atomic groups",
    "POSSESSIVE_REPEAT": "possessive quantifiers",
}


def dns_label(value: str) -> str | None:
    """A Kubernetes namespace or subset name: lower-case alphanumerics and '-', <= 63."""
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        return (
            "must be a DNS-1123 label (at most 63 lower-case letters, digits or '-', "
            f"starting and ending with a letter or digit), got {value!r}"
        )
    return None


def dns_subdomain(value: str) -> str | None:
    """A Kubernetes object name: dot-separated DNS-1123 labels, <= 253 characters."""
    if len(value) > 253 or not all(_is_label(p) for p in value.split(".")):
        return (
            "must be a DNS-1123 subdomain (lower-case letters, digits, '-' and '.', "
            f"starting and ending with a letter or digit), got {value!r}"
        )
    return None


def host(value: str, *, wildcard: bool = True) -> str | None:
    """A VirtualService / DestinationRule / Gateway host: a DNS name, `*.suffix` or `*`."""
    if not value:
        return "must not be empty"
    if "/" in value:
        return f"must be a host name, got {value!r} (namespace-qualified hosts are not supported)"
    if ":" in value:
        return f"must be a host name without a port, got {value!r}"
    name = value.lower().rstrip(".")
    if name == "*" or name.startswith("*."):
        if not wildcard:
            return f"must name a service, not a wildcard, got {value!r}"
        if name == "*" or dns_subdomain(name[2:]) is None:
            return None
    elif dns_subdomain(name) is None:
        return None
    return f"must be a DNS name, optionally with a leading '*.', got {value!r}"


def gateway_ref(value: str) -> str | None:
    """`mesh`, a Gateway name in the resource's namespace, or `<namespace>/<name>`."""
    namespace, sep, name = value.rpartition("/")
    if (not sep or dns_label(namespace) is None) and dns_subdomain(name) is None:
        return None
    return f"must be 'mesh', a Gateway name or '<namespace>/<name>', got {value!r}"


def header_name(value: str) -> str | None:
    if not _HEADER_NAME.fullmatch(value):
        return f"must be a valid HTTP header name, got {value!r}"
    return None


def header_value(value: str) -> str | None:
    # CR/LF would let a config author inject extra headers or split the response
    if any(c in value for c in "\r\n\0"):
        return f"must not contain CR, LF or NUL, got {value!r}"
    return None


def label_key(value: str) -> str | None:
    """A Kubernetes label key: `[prefix/]name`, prefix a DNS subdomain, name <= 63."""
    prefix, sep, name = value.rpartition("/")
    if sep and (not prefix or dns_subdomain(prefix) is not None):
        return f"must be a label key ([prefix/]name), got {value!r}"
    if len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return f"must be a label key ([prefix/]name), got {value!r}"
    return None


def label_value(value: str) -> str | None:
    if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        return f"must be a label value (at most 63 letters, digits, '-', '_' or '.'), got {value!r}"
    return None


def port(value: int) -> str | None:
    if not 1 <= value <= 65535:
        return f"must be between 1 and 65535, got {value}"
    return None


def regex(pattern: str) -> str | None:
    """Compiles with `re` (matched with `re.fullmatch`) and uses only RE2 constructs."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regular expression {pattern!r}: {exc}"
    construct = _re2_unsupported(pattern)
    if construct is not None:
        return f"invalid regular expression {pattern!r}: {construct} are not supported (RE2 syntax)"
    return None


def _is_label(value: str) -> bool:
    return len(value) <= 63 and _DNS_LABEL.fullmatch(value) is not None


def _re2_unsupported(pattern: str) -> str | None:
    # `re._parser` is CPython's own regex parser (private, stable since 3.11); a tree
    # walk is the only reliable way to tell `\1` from `[\1]` or an escaped `(?=`.
    try:
        parser: Any = importlib.import_module("re._parser")
    except ImportError:  # another interpreter: fall back to `re` acceptance only
        return None
    return _walk(parser.parse(pattern), parser.SubPattern)


def _walk(node: Any, subpattern: Any) -> str | None:
    if isinstance(node, subpattern):
        for op, arg in node:
            construct = _RE2_UNSUPPORTED.get(str(op))
            if construct is None:
                construct = _walk(arg, subpattern)
            if construct is not None:
                return construct
    elif isinstance(node, tuple | list):
        for child in node:
            construct = _walk(child, subpattern)
            if construct is not None:
                return construct
    return None
