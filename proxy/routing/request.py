"""What the I/O layer tells the routing core about a request, and parsing helpers
shared by matching and hashing (query string, cookies, authority).

`RequestAttrs` and `HashContext` are NamedTuples rather than dataclasses because one
of each is built per request and tuple construction is the cheapest Python offers.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple
from urllib.parse import unquote

_NO_STRINGS: Mapping[str, str] = MappingProxyType({})


class RequestAttrs(NamedTuple):
    """The request attributes route matching looks at.

    `headers` maps lower-case names to values; a header sent several times is joined
    with "," (as Envoy does before matching). `path` is the request target in origin
    form, query string included. `port` is the destination port the caller asked for.
    `gateway` is the canonical "<ns>/<name>" of the gateway evaluating the request
    (several, comma-separated, when a gateway proxy is selected by several Gateway
    resources: `GatewayConfig.name` as published), or "" when a sidecar evaluates it
    (Istio's reserved gateway name `mesh`).
    """

    method: str
    scheme: str
    authority: str
    path: str
    headers: Mapping[str, str] = _NO_STRINGS
    port: int = 0
    source_labels: Mapping[str, str] = _NO_STRINGS
    source_namespace: str = ""
    gateway: str = ""


class HashContext(NamedTuple):
    """What a consistent-hash balancer may key on.

    `source_port` only feeds the value of a generated sticky-session cookie (Envoy
    derives it from the full downstream address); `use_source_ip` hashes the IP alone.
    """

    headers: Mapping[str, str] = _NO_STRINGS
    path: str = "/"
    source_ip: str = ""
    source_port: int = 0


def _decode(component: str) -> str:
    # Percent-decoding only: Envoy leaves "+" as is when it decodes query parameters.
    return unquote(component) if "%" in component else component


def parse_query(path: str) -> dict[str, str]:
    """`/p?a=1&b=%2F&a=2&flag` -> {"a": "1", "b": "/", "flag": ""}.

    The first occurrence of a name wins, as in Envoy's `getFirstValue`.
    """
    i = path.find("?")
    params: dict[str, str] = {}
    if i < 0:
        return params
    for part in path[i + 1 :].split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name = _decode(name)
        if name not in params:
            params[name] = _decode(value)
    return params


def first_query_value(path: str, name: str) -> str | None:
    """The decoded value of the first `name` parameter, or None when absent."""
    i = path.find("?")
    if i < 0:
        return None
    for part in path[i + 1 :].split("&"):
        key, _, value = part.partition("=")
        if key == name or (key and _decode(key) == name):
            return _decode(value)
    return None


def cookie_value(headers: Mapping[str, str], name: str) -> str | None:
    """The value of cookie `name` from the `cookie` header, without surrounding quotes.

    Several Cookie headers reach us joined with ","; "," cannot appear in a cookie
    value (RFC 6265 cookie-octet), so both separators are safe to split on. An empty
    value counts as absent, as in Envoy.
    """
    raw = headers.get("cookie")
    if not raw:
        return None
    for chunk in raw.replace(",", ";").split(";"):
        key, sep, value = chunk.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                value = value[1:-1]
            return value or None
    return None


def authority_without_port(authority: str) -> str:
    """`reviews:9080` -> `reviews`; `[::1]:80` -> `[::1]` (brackets kept: it is still
    an authority, unlike `mesh.hosts.strip_port` which returns a bare host)."""
    head, sep, tail = authority.rpartition(":")
    if sep and tail.isdigit() and (":" not in head or head.endswith("]")):
        return head
    return authority
