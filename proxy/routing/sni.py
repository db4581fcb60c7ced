"""The SNI of a TLS ClientHello, read from the first bytes of a connection (pure), as
Envoy's tls_inspector does: what routes TLS PASSTHROUGH traffic by host name."""

from __future__ import annotations

import re

MORE = None  # `client_hello_sni`: not enough bytes yet
# dot-separated non-empty labels of letters, digits, `-` and `_`, at most 255 in all
_DNS_NAME = re.compile(r"(?=.{1,255}$)[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def client_hello_sni(data: bytes) -> str | None:
    """The SNI host name of the TLS ClientHello `data` starts with, lower-cased: ""
    when `data` is not a TLS handshake or names no server, None (`MORE`) while the
    first record is incomplete. Only the first record is read (a ClientHello split
    over several records is rare; it reads as "no SNI"), as Envoy's tls_inspector
    does within its buffer.

    A name that is no DNS name (a NUL, a space, a non-ASCII byte, an empty label
    such as `.example.com`, which `*.example.com` would otherwise cover), two
    server_name extensions, or two host names in one, read as "no SNI": BoringSSL,
    under Envoy's inspector, refuses such a ClientHello, and no rule may be chosen
    by a name the backend will read differently."""
    if not data:
        return MORE
    if data[0] != 0x16:  # not a handshake record
        return ""
    if len(data) < 5:
        return MORE
    end = 5 + int.from_bytes(data[3:5], "big")
    if len(data) < end:
        return MORE
    body = data[5:end]
    try:
        if body[0] != 0x01:  # not a ClientHello
            return ""
        pos = 4 + 2 + 32  # handshake header, client_version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
        pos += 1 + body[pos]  # compression methods
        if pos + 2 > len(body):
            return ""  # no extensions
        ext_end = min(len(body), pos + 2 + int.from_bytes(body[pos : pos + 2], "big"))
        pos += 2
        found: str | None = None
        while pos + 4 <= ext_end:
            ext_type = int.from_bytes(body[pos : pos + 2], "big")
            ext_len = int.from_bytes(body[pos + 2 : pos + 4], "big")
            pos += 4
            if ext_type == 0:  # server_name: list length, then (type, length, name)...
                if found is not None:
                    return ""  # a second server_name extension
                found = _host_name(body[pos + 2 : pos + ext_len])
            pos += ext_len
    except (IndexError, UnicodeDecodeError):
        return ""
    return found or ""


def _host_name(names: bytes) -> str:
    """The one host_name of a server_name list, validated and lower-cased; ""."""
    found = ""
    while len(names) >= 3:
        name_len = int.from_bytes(names[1:3], "big")
        if 3 + name_len > len(names):
            return ""  # a length past the extension: cut short
        if names[0] == 0:
            if found:
                return ""  # RFC 6066 §3: at most one name of a type
            found = names[3 : 3 + name_len].decode("ascii").lower()
            if found.endswith("."):
                found = found[:-1]
            if not found or not _DNS_NAME.fullmatch(found):
                return ""
        names = names[3 + name_len :]
    return found


__all__ = ["MORE", "client_hello_sni"]
