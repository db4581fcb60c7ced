"""The one HTTP/1.1 head encoder, and body framing for what a connection sends.

Every head the engine writes (requests upstream, responses and local error answers
downstream, 100 Continue, 101 and CONNECT answers) goes through `encode_head`: a
start line, the caller's fields minus those the engine owns, the engine's own framing
and connection fields, the empty line. Pure functions, no state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Set
from http import HTTPStatus

from ..headers import HOP_BY_HOP

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n"

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

# The engine owns framing and connection management of every message it writes.
RESPONSE_SKIP: frozenset[str] = HOP_BY_HOP | {"content-length"}
REQUEST_SKIP: frozenset[str] = frozenset({"content-length", "transfer-encoding"})

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


def request_line(method: str, target: str) -> bytes:
    """`<method> <target> HTTP/1.1\\r\\n`, refusing anything that could split the line."""
    if _TOKEN_RE.fullmatch(method) is None:
        raise ValueError(f"invalid method {method!r}")
    if _TARGET_RE.fullmatch(target) is None:
        raise ValueError(f"invalid request-target {target!r}")
    return f"{method} {target} HTTP/1.1\r\n".encode("ascii")


def encode_head(
    start_line: bytes, headers: Iterable[tuple[str, str]], skip: Set[str], extra: str = ""
) -> bytes:
    """A whole head: `start_line`, `headers` minus names in `skip` (compared in lower
    case), `extra`, the empty line.

    `extra` holds formatted `name: value\\r\\n` lines the engine adds itself (framing,
    connection); they are trusted and not re-validated. Raises ValueError on a field
    that would corrupt the message: CR, LF or NUL in a value (a CRLF inside a value
    would smuggle in a field of its own), a name that is not a token, a character
    outside latin-1.
    """
    return join_head(
        start_line, [f"{n}: {v}\r\n" for n, v in headers if n.lower() not in skip], extra
    )


def join_head(start_line: bytes, lines: list[str], extra: str = "") -> bytes:
    """`encode_head` for field lines already formatted (`name: value\r\n`, one field
    each) by a caller that had to look at every field anyway; validated the same way."""
    block = "".join(lines)
    if _FIELD_BLOCK_RE.fullmatch(block) is None or block.count("\n") != len(lines):
        raise ValueError("header field with an invalid name or value")
    try:
        return start_line + (block + extra + "\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("header field with a character outside latin-1") from None


def encode_fields(headers: Iterable[tuple[str, str]], skip: Set[str], extra: str = "") -> bytes:
    """The field block alone (ending with the empty line); see `encode_head`."""
    return encode_head(b"", headers, skip, extra)


def response_skip(headers: list[tuple[str, str]]) -> frozenset[str]:
    """Fields a response relayed by the engine loses: framing, hop-by-hop, and those its
    own `Connection` field nominates."""
    nominated: set[str] | None = None
    for name, value in headers:
        # engine-made lists are lower-case already: the cheap test first
        if name == "connection" or (len(name) == 10 and name.lower() == "connection"):
            if nominated is None:
                nominated = set()
            nominated.update(t.strip().lower() for t in value.split(","))
    if not nominated:
        return RESPONSE_SKIP
    nominated.discard("")
    return RESPONSE_SKIP | nominated


def chunk_size_line(size: int) -> bytes:
    return b"%x\r\n" % size


def last_chunk(trailers: Iterable[tuple[str, str]] | None) -> bytes:
    """The end of a chunked body: the zero-size chunk, trailer fields (RFC 9112 §7.1.2)
    without those in `TRAILER_SKIP`, the empty line. Raises ValueError as
    `encode_head` does."""
    if not trailers:
        return LAST_CHUNK
    return encode_head(b"0\r\n", trailers, TRAILER_SKIP)


def error_response(status: int, reason: str = "") -> bytes:
    """A complete local error answer that closes the connection; `reason` is our own
    text (never request data)."""
    phrase = HTTPStatus(status).phrase
    text = (f"{phrase}: {reason}\n" if reason else f"{phrase}\n").encode("ascii")
    extra = (
        "content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(text)}\r\n"
        "connection: close\r\n"
    )
    return encode_head(status_line(status), (), frozenset(), extra) + text
