"""HTTP/1.1 framing rules, as pure functions (no I/O, no state); encoding lives in
`proxy.http.h1.encode`."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

# Go and nginx keep lengths in a signed 64-bit integer; a larger value is an attack.
MAX_CONTENT_LENGTH = 2**63 - 1


class Framing(enum.Enum):
    """How a message body is delimited on the wire."""

    NONE = "none"  # no body (HEAD, 1xx, 204, 304)
    LENGTH = "length"  # Content-Length
    CHUNKED = "chunked"  # Transfer-Encoding: chunked
    CLOSE = "close"  # read until the connection closes (responses only)


@dataclass(frozen=True, slots=True)
class RequestTarget:
    """The parts of a request-target (RFC 9112 §3.2)."""

    absolute_form: bool
    scheme: str
    authority: str
    path: str


def no_body_status(status: int) -> bool:
    """1xx, 204 and 304 responses never carry content (RFC 9112 §6.3)."""
    return status < 200 or status == 204 or status == 304


def response_framing(
    status: int, head_request: bool, content_length: int | None, client_http11: bool
) -> Framing:
    """How to delimit a response body sent to the client."""
    if head_request or no_body_status(status):
        return Framing.NONE
    if content_length is not None:
        return Framing.LENGTH
    # HTTP/1.0 clients do not understand chunked: the close marks the end.
    return Framing.CHUNKED if client_http11 else Framing.CLOSE


def transfer_codings(values: Iterable[str]) -> list[str]:
    """The lower-case codings listed in Transfer-Encoding field values, in order."""
    return [c.strip().lower() for value in values for c in value.split(",")]


def request_is_chunked(values: list[str]) -> bool:
    """Whether a request's Transfer-Encoding makes it chunked.

    Strict: the only coding accepted is a single `chunked`. Anything else (gzip,
    `chunked, identity`, repeated `chunked`) is the stuff of request smuggling.
    """
    if not values:
        return False
    if transfer_codings(values) != ["chunked"]:
        raise ValueError("Transfer-Encoding must be exactly 'chunked'")
    return True


def response_is_chunked(values: list[str]) -> bool:
    """A response is chunked when chunked is its final coding; else it is read to close."""
    codings = transfer_codings(values)
    return bool(codings) and codings[-1] == "chunked"


def parse_content_length(value: str) -> int:
    """A Content-Length value: 1*DIGIT, at most `MAX_CONTENT_LENGTH`."""
    if not value.isascii() or not value.isdigit():
        raise ValueError(f"invalid Content-Length {value!r}")
    length = int(value)
    if length > MAX_CONTENT_LENGTH:
        raise ValueError("Content-Length too large")
    return length


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the engine needs to know about a request head, once validated."""

    target: RequestTarget
    content_length: int | None
    chunked: bool


def check_request_head(
    version: str,
    method: str,
    target: str,
    content_lengths: list[str] | None,
    transfer_encodings: list[str] | None,
    hosts: list[str] | None,
    upgrading: bool,
) -> RequestHead:
    """Validate the parts of a request head llhttp lets through; ValueError -> 400.

    llhttp already refused conflicting or malformed Content-Length and most bad
    Transfer-Encodings; these are the rules it does not enforce.
    """
    if version != "1.1" and version != "1.0":
        raise ValueError(f"HTTP version {version} is not served")
    content_length: int | None = None
    if content_lengths is not None:
        if len(content_lengths) != 1:
            raise ValueError("several Content-Length fields")
        content_length = parse_content_length(content_lengths[0])
    chunked = False
    if transfer_encodings is not None:
        # RFC 9112 §6.1: Transfer-Encoding with Content-Length, or in HTTP/1.0, is
        # faulty framing.
        if content_length is not None or version == "1.0":
            raise ValueError("Transfer-Encoding with Content-Length or in HTTP/1.0")
        chunked = request_is_chunked(transfer_encodings)
    if hosts is None:
        if version == "1.1":
            raise ValueError("HTTP/1.1 request without Host")  # RFC 9112 §3.2
        host = None
    elif len(hosts) != 1:
        raise ValueError("several Host fields")
    else:
        host = hosts[0]
    if upgrading and (chunked or content_length):
        # llhttp hands whatever follows an upgrade head to the tunnel: a body would be
        # relayed as protocol bytes.
        raise ValueError("upgrade request with a body")
    return RequestHead(parse_request_target(method, target, host), content_length, chunked)


def parse_request_target(method: str, target: str, host: str | None) -> RequestTarget:
    """Split a request-target into scheme, authority and path (RFC 9112 §3.2).

    `host` is the Host header, used as the authority unless the target is in
    absolute-form (then the URI's authority wins, §3.2.2). Raises ValueError for a
    target this proxy must not act on: a fragment, userinfo, a non-http scheme.
    """
    if "#" in target:
        raise ValueError("request-target contains a fragment")
    if method == "CONNECT":
        name, sep, port = target.rpartition(":")
        if not sep or not name or not port.isdigit() or "/" in target or "@" in target:
            raise ValueError("CONNECT needs an authority-form target host:port")
        return RequestTarget(False, "http", target, "")
    if target[:1] == "/":
        return RequestTarget(False, "http", host or "", target)
    if target == "*":
        if method != "OPTIONS":
            raise ValueError("asterisk-form is only valid for OPTIONS")
        return RequestTarget(False, "http", host or "", "*")
    scheme, sep, rest = target.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https"):
        raise ValueError("absolute-form target must be an http or https URI")
    end = len(rest)
    for delimiter in "/?":
        index = rest.find(delimiter)
        if 0 <= index < end:
            end = index
    authority, path = rest[:end], rest[end:]
    if not authority or "@" in authority:
        raise ValueError("absolute-form target needs an authority without userinfo")
    if not path:
        path = "*" if method == "OPTIONS" else "/"
    elif path[0] == "?":
        path = "/" + path
    return RequestTarget(True, scheme, authority, path)
