"""HTTP/1.1 wire encoding and framing rules, as pure functions (no I/O, no state)."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Set
from dataclasses import dataclass
from http import HTTPStatus

# Go and nginx keep lengths in a signed 64-bit integer; a larger value is an attack.
MAX_CONTENT_LENGTH = 2**63 - 1

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

_STATUS_LINES: dict[int, bytes] = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode("ascii")
    for status in HTTPStatus
}

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN_RE = re.compile(_TOKEN)
# A whole encoded field block: token names, values without CR, LF, NUL or other controls
# (HTAB and obs-text allowed, RFC 9110 §5.5). One regex pass per head is cheaper than
# checking every field separately.
_FIELD_BLOCK_RE = re.compile(rf"(?:{_TOKEN}: [^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
_TARGET_RE = re.compile(r"[\x21-\x7e]+")
_REASON_RE = re.compile(r"[\t \x21-\x7e\x80-\xff]*")


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


def status_line(status: int, reason: str = "") -> bytes:
    """`HTTP/1.1 <status> <phrase>\\r\\n`, precomputed for registered statuses."""
    line = _STATUS_LINES.get(status)
    if line is not None:
        return line
    if not 100 <= status <= 999:
        raise ValueError(f"invalid status code {status}")
    if _REASON_RE.fullmatch(reason) is None:
        reason = ""
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")


def request_line(method: str, target: str) -> str:
    """`<method> <target> HTTP/1.1\\r\\n`, refusing anything that could split the line."""
    if _TOKEN_RE.fullmatch(method) is None:
        raise ValueError(f"invalid method {method!r}")
    if _TARGET_RE.fullmatch(target) is None:
        raise ValueError(f"invalid request-target {target!r}")
    return f"{method} {target} HTTP/1.1\r\n"


def encode_fields(headers: Iterable[tuple[str, str]], skip: Set[str], extra: str = "") -> bytes:
    """The field block (ending with the empty line) of `headers` minus names in `skip`.

    `extra` holds formatted `name: value\r\n` lines the engine adds itself (framing,
    connection); they are trusted and not re-validated.
    """
    return encode_lines([f"{n}: {v}\r\n" for n, v in headers if n.lower() not in skip], extra)


def encode_lines(lines: list[str], extra: str = "") -> bytes:
    """Join formatted field lines (one field each) plus `extra` into a field block.

    Raises ValueError on a field that would corrupt the message: CR, LF or NUL in a
    value (a CRLF inside a value would smuggle in a field of its own), a name that is
    not a token, a character outside latin-1.
    """
    block = "".join(lines)
    if _FIELD_BLOCK_RE.fullmatch(block) is None or block.count("\n") != len(lines):
        raise ValueError("header field with an invalid name or value")
    return (block + extra + "\r\n").encode("latin-1")


def chunk_size_line(size: int) -> bytes:
    return b"%x\r\n" % size


# Fields never sent as trailers: hop-by-hop ones and those that frame or route the
# message (RFC 9110 §6.5.1), which a recipient must not learn after the body.
TRAILER_SKIP: frozenset[str] = frozenset(
    {
        "connection",
        "content-length",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def last_chunk(trailers: Iterable[tuple[str, str]] | None) -> bytes:
    """The end of a chunked body: the zero-size chunk, trailer fields (RFC 9112 §7.1.2)
    without those in `TRAILER_SKIP`, the empty line. Raises ValueError as
    `encode_fields` does."""
    if not trailers:
        return LAST_CHUNK
    return b"0\r\n" + encode_fields(trailers, TRAILER_SKIP)


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
