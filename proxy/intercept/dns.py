"""A small DNS codec for the sidecar's resolver (pure; RFC 1035): parse a query, build
an answer of A records or an empty one. Only what the resolver needs: one question
per message, no compression in questions (stub resolvers send none)."""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

from mesh.hosts import ServiceRef, canonical_host, service_of_host

__all__ = [
    "QTYPE_A",
    "QTYPE_AAAA",
    "DnsFormatError",
    "Query",
    "answer",
    "mesh_service",
    "parse_query",
]

_HEADER = struct.Struct("!HHHHHH")
_QUESTION_TAIL = struct.Struct("!HH")
_ANSWER = struct.Struct("!HHHIH")  # name pointer, type, class, ttl, rdlength
QTYPE_A = 1
QTYPE_AAAA = 28
QCLASS_IN = 1
RCODE_OK = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
_QR = 0x8000
_AA = 0x0400
_RD = 0x0100
_RA = 0x0080
_OPCODE = 0x7800
_POINTER_TO_QUESTION = 0xC00C  # the question's name starts right after the header
MAX_NAME = 255
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class DnsFormatError(ValueError):
    """Not a query this codec reads (the resolver forwards or drops it)."""


@dataclass(frozen=True, slots=True)
class Query:
    id: int
    flags: int
    name: str  # lower case, no trailing dot
    qtype: int
    qclass: int
    question: bytes  # as received: copied into the answer


def parse_query(data: bytes) -> Query:
    if len(data) < _HEADER.size:
        raise DnsFormatError("shorter than a DNS header")
    qid, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(data)
    if flags & _QR:
        raise DnsFormatError("a response, not a query")
    if qdcount != 1:
        raise DnsFormatError(f"{qdcount} questions (only 1 is answered)")
    labels: list[str] = []
    offset = _HEADER.size
    while True:
        if offset >= len(data):
            raise DnsFormatError("name runs past the message")
        length = data[offset]
        offset += 1
        if length == 0:
            break
        if length & 0xC0:
            raise DnsFormatError("compressed or extended label in a question")
        label = data[offset : offset + length]
        if len(label) != length:
            raise DnsFormatError("label runs past the message")
        labels.append(label.decode("ascii", "replace").lower())
        offset += length
    if offset + _QUESTION_TAIL.size > len(data):
        raise DnsFormatError("question without type and class")
    qtype, qclass = _QUESTION_TAIL.unpack_from(data, offset)
    end = offset + _QUESTION_TAIL.size
    name = ".".join(labels)
    if len(name) > MAX_NAME:
        raise DnsFormatError("name longer than 255 bytes")
    return Query(qid, flags, name, qtype, qclass, data[_HEADER.size : end])


def answer(query: Query, addresses: list[str], ttl: int = 30, rcode: int = RCODE_OK) -> bytes:
    """The response to `query`: one A record per address (none: NODATA, or `rcode`)."""
    flags = _QR | _AA | _RA | (query.flags & (_OPCODE | _RD)) | rcode
    out = [_HEADER.pack(query.id, flags, 1, len(addresses), 0, 0), query.question]
    for address in addresses:
        packed = ipaddress.IPv4Address(address).packed
        out.append(_ANSWER.pack(_POINTER_TO_QUESTION, QTYPE_A, QCLASS_IN, ttl, len(packed)))
        out.append(packed)
    return b"".join(out)


def error_reply(data: bytes, rcode: int = RCODE_FORMERR) -> bytes | None:
    """A header-only error for a message too broken to answer; None if it has no id."""
    if len(data) < 4:
        return None
    qid, flags = struct.unpack_from("!HH", data)
    return _HEADER.pack(qid, _QR | _RA | (flags & (_OPCODE | _RD)) | rcode, 0, 0, 0, 0)


def mesh_service(name: str, namespace: str) -> ServiceRef | None:
    """The mesh service a name may mean: `reviews` (in the app's namespace),
    `reviews.NS`, `reviews.NS.svc`, `reviews.NS.svc.cluster.local`; whether it exists
    is the registry's answer (a two-label name such as `example.com` is asked too)."""
    if not name or name.endswith(".") or ".." in name:
        return None
    ref = service_of_host(canonical_host(name, namespace))
    if ref is None or not (_DNS_LABEL.fullmatch(ref.name) and _DNS_LABEL.fullmatch(ref.namespace)):
        return None
    return ref
