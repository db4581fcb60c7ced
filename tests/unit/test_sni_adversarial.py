"""Adversarial ClientHellos for the SNI read at TLS PASSTHROUGH gateway servers and
sidecar `tls` routes (`proxy.routing.sni`, docs/architecture.md §5.1 TCP routing):
a name is either a plain DNS name, lower-cased, or no SNI at all."""

from __future__ import annotations

import struct

import pytest

from mesh.hosts import host_matches
from proxy.routing.sni import client_hello_sni


def server_name_ext(*names: bytes) -> bytes:
    entries = b"".join(b"\x00" + struct.pack("!H", len(n)) + n for n in names)
    return struct.pack("!HH", 0, len(entries) + 2) + struct.pack("!H", len(entries)) + entries


def client_hello(*extensions: bytes) -> bytes:
    """A minimal TLS 1.2 ClientHello record with these extensions."""
    exts = b"".join(extensions)
    hello = (
        b"\x03\x03" + b"\x00" * 32  # version, random
        + b"\x00"  # session id
        + b"\x00\x02\x13\x01"  # one cipher suite
        + b"\x01\x00"  # null compression
        + struct.pack("!H", len(exts)) + exts
    )  # fmt: skip
    handshake = b"\x01" + len(hello).to_bytes(3, "big") + hello
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (b"api.example.com", "api.example.com"),
        (b"API.Example.COM.", "api.example.com"),
        (b"api.example.com\x00.evil.example", ""),  # NUL: C code stops at it
        (b"api.example.com evil", ""),
        (b".example.com", ""),  # empty label: *.example.com must not cover it
        (b"a..example.com", ""),
        (b"api.example.com..", ""),
        (b"caf\xc3\xa9.example.com", ""),  # non-ASCII
        (b"*.example.com", ""),
        (b"a" * 300, ""),
        (b"", ""),
    ],
)
def test_server_names(name: bytes, expected: str) -> None:
    assert client_hello_sni(client_hello(server_name_ext(name))) == expected


def test_a_name_that_is_no_dns_name_is_not_covered_by_a_wildcard_rule() -> None:
    sni = client_hello_sni(client_hello(server_name_ext(b".example.com")))
    assert not (sni and host_matches("*.example.com", sni))


def test_two_names_or_two_extensions_are_no_sni() -> None:
    two_names = client_hello(server_name_ext(b"a.example.com", b"b.example.com"))
    assert client_hello_sni(two_names) == ""
    two_exts = client_hello(server_name_ext(b"a.example.com"), server_name_ext(b"b.example.com"))
    assert client_hello_sni(two_exts) == ""


def test_lengths_that_lie_never_raise() -> None:
    good = client_hello(server_name_ext(b"api.example.com"))
    # every truncation of the body inside a complete-looking record, and lengths
    # claiming more than there is
    for cut in range(6, len(good)):
        record = good[:cut]
        forged = record[:3] + struct.pack("!H", len(record) - 5) + record[5:]
        assert client_hello_sni(forged) in ("", "api.example.com")
    huge = good[:3] + b"\xff\xff" + good[5:]
    assert client_hello_sni(huge) is None  # waits for the rest (bounded by the caller)
    assert client_hello_sni(b"\x16\x03\x01\x00\x00") == ""  # an empty record
