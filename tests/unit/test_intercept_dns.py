"""The resolver's DNS codec (proxy.intercept.dns), as byte transcripts."""

from __future__ import annotations

import pytest

from mesh.hosts import ServiceRef
from proxy.intercept import dns

# `dig reviews A` as a stub resolver sends it: id 0x1234, RD, one question
QUERY_A = bytes.fromhex("1234 0100 0001 0000 0000 000007 72657669657773 000001 0001")
# the same with an EDNS OPT record in the additional section
QUERY_AAAA_EDNS = bytes.fromhex(
    "beef 0120 0001 0000 0000 0001"
    "07 72657669657773 07 64656661756c74 00"
    "001c 0001"
    "00 0029 04d0 00000000 0000"
)


def test_parse_a_query() -> None:
    query = dns.parse_query(QUERY_A)
    assert (query.id, query.name, query.qtype, query.qclass) == (0x1234, "reviews", 1, 1)
    assert query.question == QUERY_A[12:]


def test_answer_a_record_transcript() -> None:
    reply = dns.answer(dns.parse_query(QUERY_A), ["240.240.1.2"])
    assert reply == bytes.fromhex(
        "1234 8580 0001 0001 0000 0000"  # QR AA RD RA, 1 question, 1 answer
        "07 72657669657773 00 0001 0001"  # the question, copied
        "c00c 0001 0001 0000001e 0004 f0f00102"  # pointer to it, A IN, ttl 30, 240.240.1.2
    )


def test_aaaa_of_a_mesh_name_is_answered_empty() -> None:
    query = dns.parse_query(QUERY_AAAA_EDNS)
    assert (query.name, query.qtype) == ("reviews.default", dns.QTYPE_AAAA)
    reply = dns.answer(query, [])
    assert reply[:12] == bytes.fromhex("beef 8580 0001 0000 0000 0000")
    assert reply[12:] == query.question


def test_mixed_case_names_are_lower_cased() -> None:
    query = bytes.fromhex("0001 0000 0001 0000 0000 000007 52657669657773 00 0001 0001")
    assert dns.parse_query(query).name == "reviews"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x01", "shorter than a DNS header"),
        (bytes.fromhex("0001 8180 0001 0000 0000 0000 00 0001 0001"), "a response"),
        (bytes.fromhex("0001 0100 0002 0000 0000 0000 00 0001 0001"), "2 questions"),
        (bytes.fromhex("0001 0100 0001 0000 0000 0000 c00c 0001 0001"), "compressed"),
        (bytes.fromhex("0001 0100 0001 0000 0000 0000 07 7265"), "label runs past"),
        (bytes.fromhex("0001 0100 0001 0000 0000 0000 00 00"), "without type and class"),
    ],
)
def test_malformed_queries_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(dns.DnsFormatError, match=message):
        dns.parse_query(data)


def test_error_reply_keeps_the_id() -> None:
    assert dns.error_reply(QUERY_A, dns.RCODE_SERVFAIL) == bytes.fromhex(
        "1234 8182 0000 0000 0000 0000"
    )
    assert dns.error_reply(b"\x01") is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("reviews", ServiceRef("default", "reviews")),
        ("reviews.prod", ServiceRef("prod", "reviews")),
        ("reviews.prod.svc", ServiceRef("prod", "reviews")),
        ("reviews.prod.svc.cluster.local", ServiceRef("prod", "reviews")),
        ("api.example.org", None),
        ("foo_bar", None),  # not a DNS label: never asked of the registry
        ("reviews.Prod-", None),
        ("", None),
    ],
)
def test_mesh_service_names(name: str, expected: ServiceRef | None) -> None:
    assert dns.mesh_service(name, "default") == expected
