"""Pure header and wire logic of the HTTP engine: tables of inputs, no sockets."""

from __future__ import annotations

import uuid

import pytest

from proxy.http import (
    HOP_BY_HOP,
    Limits,
    append_forwarded_for,
    ensure_request_id,
    get_header,
    strip_hop_by_hop,
)
from proxy.http.h1.encode import encode_fields, request_line, status_line
from proxy.http.headers import connection_tokens, without_h2c
from proxy.http.wire import (
    Framing,
    check_request_head,
    parse_content_length,
    parse_request_target,
    request_is_chunked,
    response_framing,
    response_is_chunked,
)

# -- hop-by-hop --------------------------------------------------------------------------


def test_hop_by_hop_set_is_rfc9110_plus_proxy_connection() -> None:
    assert {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    } == HOP_BY_HOP


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
def test_strip_removes_each_hop_by_hop_field(name: str) -> None:
    headers = [("host", "a"), (name, "x"), ("accept", "*/*")]
    assert strip_hop_by_hop(headers) == [("host", "a"), ("accept", "*/*")]


def test_strip_keeps_the_upgrade_of_an_upgrade_request() -> None:
    headers = [
        ("host", "a"),
        ("connection", "Upgrade, X-Secret, keep-alive"),
        ("upgrade", "websocket"),
        ("x-secret", "s"),
        ("sec-websocket-key", "k"),
    ]
    assert strip_hop_by_hop(headers, "websocket") == [
        ("host", "a"),
        ("sec-websocket-key", "k"),
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
    ]
    # not an upgrade (Request.upgrade is None): both go, as every hop-by-hop field
    assert strip_hop_by_hop(headers) == [("host", "a"), ("sec-websocket-key", "k")]


def test_strip_drops_te_trailers_too() -> None:
    assert strip_hop_by_hop([("te", "trailers"), ("x", "1")]) == [("x", "1")]


@pytest.mark.parametrize(
    ("connection_values", "dropped"),
    [
        (["close, X-Secret"], {"x-secret"}),
        (["keep-alive", " x-one ,x-two "], {"x-one", "x-two"}),
        (["X-Secret,,"], {"x-secret"}),
    ],
)
def test_strip_removes_fields_named_in_connection(
    connection_values: list[str], dropped: set[str]
) -> None:
    headers = [("connection", v) for v in connection_values]
    headers += [("x-secret", "s"), ("x-one", "1"), ("x-two", "2"), ("x-kept", "k")]
    kept = {name for name, _ in strip_hop_by_hop(headers)}
    assert "connection" not in kept
    assert kept & dropped == set()
    assert "x-kept" in kept


def test_strip_is_case_insensitive_and_keeps_order_and_duplicates() -> None:
    headers = [
        ("Connection", "X-Drop"),
        ("X-DROP", "1"),
        ("Accept", "a"),
        ("Transfer-Encoding", "chunked"),
        ("accept", "b"),
    ]
    assert strip_hop_by_hop(headers) == [("Accept", "a"), ("accept", "b")]


def test_strip_returns_a_copy() -> None:
    headers = [("accept", "a")]
    result = strip_hop_by_hop(headers)
    result.append(("x", "y"))
    assert headers == [("accept", "a")]


def test_connection_tokens_lowercases_and_merges_fields() -> None:
    headers = [("connection", "Upgrade, Keep-Alive"), ("CONNECTION", "x-a")]
    assert connection_tokens(headers) == {"upgrade", "keep-alive", "x-a"}


# -- X-Forwarded-For, X-Request-Id, lookup ---------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("host", "a")], [("host", "a"), ("x-forwarded-for", "10.0.0.9")]),
        (
            [("x-forwarded-for", "1.1.1.1"), ("host", "a")],
            [("x-forwarded-for", "1.1.1.1, 10.0.0.9"), ("host", "a")],
        ),
        (
            [
                ("X-Forwarded-For", "1.1.1.1, 2.2.2.2"),
                ("host", "a"),
                ("x-forwarded-for", "3.3.3.3"),
            ],
            [("x-forwarded-for", "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9"), ("host", "a")],
        ),
    ],
)
def test_append_forwarded_for(
    headers: list[tuple[str, str]], expected: list[tuple[str, str]]
) -> None:
    assert append_forwarded_for(headers, "10.0.0.9") == expected


def test_ensure_request_id_keeps_the_clients_id() -> None:
    headers = [("x-request-id", "abc-123"), ("host", "a")]
    result, request_id = ensure_request_id(headers)
    assert request_id == "abc-123"
    assert result is headers


@pytest.mark.parametrize("headers", [[("host", "a")], [("host", "a"), ("x-request-id", "")]])
def test_ensure_request_id_generates_uuid4(headers: list[tuple[str, str]]) -> None:
    result, request_id = ensure_request_id(headers)
    assert uuid.UUID(request_id).version == 4
    assert result == [("host", "a"), ("x-request-id", request_id)]


def test_get_header_is_case_insensitive_and_returns_first() -> None:
    headers = [("x-a", "1"), ("X-A", "2")]
    assert get_header(headers, "X-a") == "1"
    assert get_header(headers, "x-b") is None


# -- request framing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "chunked"),
    [([], False), (["chunked"], True), (["Chunked"], True), ([" chunked "], True)],
)
def test_request_transfer_encoding_accepted(values: list[str], chunked: bool) -> None:
    assert request_is_chunked(values) is chunked


@pytest.mark.parametrize(
    "values",
    [
        ["gzip"],
        ["identity"],
        ["chunked, identity"],
        ["gzip, chunked"],
        ["chunked", "chunked"],
        ["chunked, chunked"],
        ["chunked;q=1"],
        [""],
    ],
)
def test_request_transfer_encoding_other_than_lone_chunked_is_rejected(values: list[str]) -> None:
    with pytest.raises(ValueError):
        request_is_chunked(values)


@pytest.mark.parametrize(
    ("values", "chunked"),
    [(["chunked"], True), (["gzip, chunked"], True), (["gzip"], False), (["chunked, gzip"], False)],
)
def test_response_is_chunked_when_chunked_is_last(values: list[str], chunked: bool) -> None:
    assert response_is_chunked(values) is chunked


@pytest.mark.parametrize(("value", "length"), [("0", 0), ("42", 42), ("007", 7)])
def test_content_length_valid(value: str, length: int) -> None:
    assert parse_content_length(value) == length


@pytest.mark.parametrize(
    "value", ["", "-1", "+5", "1.0", "3a", "1 2", "3, 3", "\u0663", str(2**63), "9" * 30]
)
def test_content_length_invalid(value: str) -> None:
    with pytest.raises(ValueError):
        parse_content_length(value)


@pytest.mark.parametrize(
    ("status", "head", "length", "http11", "framing"),
    [
        (200, False, 10, True, Framing.LENGTH),
        (200, False, None, True, Framing.CHUNKED),
        (200, False, None, False, Framing.CLOSE),
        (200, True, 10, True, Framing.NONE),
        (204, False, None, True, Framing.NONE),
        (304, False, 10, True, Framing.NONE),
        (101, False, None, True, Framing.NONE),
        (404, False, 0, False, Framing.LENGTH),
    ],
)
def test_response_framing(
    status: int, head: bool, length: int | None, http11: bool, framing: Framing
) -> None:
    assert response_framing(status, head, length, http11) is framing


@pytest.mark.parametrize(
    ("version", "lengths", "codings", "hosts", "upgrading", "expected"),
    [
        ("1.1", None, None, ["svc"], False, (None, False)),
        ("1.1", ["12"], None, ["svc"], False, (12, False)),
        ("1.1", None, ["chunked"], ["svc"], False, (None, True)),
        ("1.0", ["3"], None, None, False, (3, False)),
        ("1.1", ["0"], None, ["svc"], True, (0, False)),
    ],
)
def test_check_request_head_accepts(
    version: str,
    lengths: list[str] | None,
    codings: list[str] | None,
    hosts: list[str] | None,
    upgrading: bool,
    expected: tuple[int | None, bool],
) -> None:
    head = check_request_head(version, "POST", "/p", lengths, codings, hosts, upgrading)
    assert (head.content_length, head.chunked) == expected
    assert head.target.path == "/p"


@pytest.mark.parametrize(
    ("version", "lengths", "codings", "hosts", "upgrading"),
    [
        ("0.9", None, None, ["svc"], False),
        ("2.0", None, None, ["svc"], False),
        ("1.1", ["3", "3"], None, ["svc"], False),
        ("1.1", ["3"], ["chunked"], ["svc"], False),
        ("1.0", None, ["chunked"], None, False),
        ("1.1", None, ["gzip, chunked"], ["svc"], False),
        ("1.1", None, None, None, False),
        ("1.1", None, None, ["a", "b"], False),
        ("1.1", ["3"], None, ["svc"], True),
        ("1.1", None, ["chunked"], ["svc"], True),
    ],
    ids=[
        "http-0.9",
        "http-2.0",
        "two-lengths",
        "length-and-chunked",
        "chunked-in-http10",
        "gzip-chunked",
        "no-host",
        "two-hosts",
        "upgrade-with-length",
        "upgrade-chunked",
    ],
)
def test_check_request_head_refuses(
    version: str,
    lengths: list[str] | None,
    codings: list[str] | None,
    hosts: list[str] | None,
    upgrading: bool,
) -> None:
    with pytest.raises(ValueError):
        check_request_head(version, "POST", "/p", lengths, codings, hosts, upgrading)


# -- request-target ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "host", "expected"),
    [
        ("GET", "/a/b?c=d", "svc", (False, "http", "svc", "/a/b?c=d")),
        ("GET", "http://reviews:9080/r?x=1", "ignored", (True, "http", "reviews:9080", "/r?x=1")),
        ("GET", "HTTPS://Reviews", None, (True, "https", "Reviews", "/")),
        ("GET", "http://reviews?x=1", None, (True, "http", "reviews", "/?x=1")),
        ("OPTIONS", "http://reviews", None, (True, "http", "reviews", "*")),
        ("OPTIONS", "*", "svc", (False, "http", "svc", "*")),
        ("CONNECT", "reviews:443", "reviews:443", (False, "http", "reviews:443", "")),
        ("GET", "http://[::1]:8080/x", None, (True, "http", "[::1]:8080", "/x")),
    ],
)
def test_parse_request_target(
    method: str, target: str, host: str | None, expected: tuple[bool, str, str, str]
) -> None:
    parsed = parse_request_target(method, target, host)
    assert (parsed.absolute_form, parsed.scheme, parsed.authority, parsed.path) == expected


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/a#frag"),
        ("GET", "http://user:pw@reviews/"),
        ("GET", "ftp://reviews/"),
        ("GET", "reviews/x"),
        ("GET", "http:///x"),
        ("GET", "*"),
        ("CONNECT", "/x"),
        ("CONNECT", "reviews"),
    ],
)
def test_parse_request_target_rejects(method: str, target: str) -> None:
    with pytest.raises(ValueError):
        parse_request_target(method, target, "svc")


# -- encoding ---------------------------------------------------------------------------------


def test_encode_fields_skips_and_appends_extra() -> None:
    block = encode_fields(
        [("content-type", "text/plain"), ("connection", "close"), ("x-a", "b\tc")],
        {"connection"},
        "content-length: 3\r\n",
    )
    assert block == b"content-type: text/plain\r\nx-a: b\tc\r\ncontent-length: 3\r\n\r\n"


@pytest.mark.parametrize(
    "headers",
    [
        [("x-a", "b\r\nset-cookie: evil")],
        [("x-a", "b\nc")],
        [("x-a", "b\rc")],
        [("x-a", "b\x00c")],
        [("x-a", "b\x7fc")],
        [("bad name", "v")],
        [("bad:name", "v")],
        [("", "v")],
        [("x-a", "snow \u2603")],
    ],
)
def test_encode_fields_refuses_fields_that_corrupt_the_message(
    headers: list[tuple[str, str]],
) -> None:
    with pytest.raises(ValueError):
        encode_fields(headers, frozenset())


def test_encode_fields_keeps_latin1_obs_text() -> None:
    assert encode_fields([("x-a", "caf\xe9")], frozenset()) == b"x-a: caf\xe9\r\n\r\n"


@pytest.mark.parametrize(
    ("status", "reason", "line"),
    [
        (200, "whatever", b"HTTP/1.1 200 OK\r\n"),
        (404, "", b"HTTP/1.1 404 Not Found\r\n"),
        (599, "Custom", b"HTTP/1.1 599 Custom\r\n"),
        (599, "bad\r\nreason", b"HTTP/1.1 599 \r\n"),
    ],
)
def test_status_line(status: int, reason: str, line: bytes) -> None:
    assert status_line(status, reason) == line


@pytest.mark.parametrize(
    ("method", "target"),
    [("GET", "/a b"), ("GET", "/a\r\nx"), ("G ET", "/"), ("GET", ""), ("GET", "/\u00e9")],
)
def test_request_line_refuses_splitting(method: str, target: str) -> None:
    with pytest.raises(ValueError):
        request_line(method, target)


def test_request_line() -> None:
    assert request_line("GET", "/a?b=c") == b"GET /a?b=c HTTP/1.1\r\n"


# -- limits -----------------------------------------------------------------------------------


def test_limits_defaults() -> None:
    limits = Limits()
    assert (limits.max_header_count, limits.max_header_bytes) == (100, 60 * 1024)
    assert (limits.header_timeout, limits.idle_timeout, limits.upstream_idle_timeout) == (
        10.0,
        300.0,
        60.0,
    )
    assert limits.max_body_buffer == 64 * 1024


@pytest.mark.parametrize("field", ["max_header_count", "header_timeout", "max_body_buffer"])
@pytest.mark.parametrize("value", [0, -1, True])
def test_limits_refuse_non_positive_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        Limits(**{field: value})  # type: ignore[arg-type]


def test_h2c_is_never_an_upgrade_passed_on() -> None:
    """h2c smuggling: an app switching to h2c would serve the rest of the connection
    unseen by the sidecars' per-request authorization."""

    assert without_h2c("h2c") is None
    assert without_h2c("H2C") is None
    assert without_h2c("websocket, h2c") == "websocket"
    assert without_h2c("websocket") == "websocket"
    assert without_h2c(None) is None
    kept = strip_hop_by_hop(
        [("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c"), ("http2-settings", "x")],
        "h2c",
    )
    assert kept == []
