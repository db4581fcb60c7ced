"""Protocol detection on a captured connection (pure): the first bytes the client
sent decide HTTP/1.1, HTTP/2 prior knowledge, TLS or plain TCP.

`detect(prefix)` answers None while `prefix` could still become more than one of
them; the capture listener then reads more, up to `DETECT_TIMEOUT_S` (a client that
sends nothing first, a server-first protocol such as MySQL or SMTP, is TCP once that
passes; ports declared with `--opaque-ports` skip detection altogether, as Linkerd's
opaque ports do).
"""

from __future__ import annotations

import enum

__all__ = ["DETECT_TIMEOUT_S", "MAX_DETECT_BYTES", "Detected", "detect"]

# how long a captured connection may stay silent before it is taken for TCP
DETECT_TIMEOUT_S = 0.3

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP1_METHODS = tuple(
    m.encode() + b" "
    for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
MAX_DETECT_BYTES = len(H2_PREFACE)
TLS_HANDSHAKE = 0x16
TLS_MAJOR = 0x03


class Detected(enum.Enum):
    HTTP1 = "http/1.1"
    HTTP2 = "h2c"
    TLS = "tls"
    TCP = "tcp"

    @property
    def is_http(self) -> bool:
        return self in (Detected.HTTP1, Detected.HTTP2)


def detect(prefix: bytes) -> Detected | None:
    """What `prefix` (the first bytes, possibly partial) is; None: not decided yet."""
    if not prefix:
        return None
    if prefix[0] == TLS_HANDSHAKE:
        if len(prefix) == 1:
            return None
        return Detected.TLS if prefix[1] == TLS_MAJOR else Detected.TCP
    candidates = [(H2_PREFACE, Detected.HTTP2), *((m, Detected.HTTP1) for m in HTTP1_METHODS)]
    undecided = False
    for token, kind in candidates:
        if prefix.startswith(token):
            return kind
        if token.startswith(prefix):
            undecided = True
    return None if undecided else Detected.TCP
