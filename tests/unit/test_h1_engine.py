"""Byte transcripts of the sans-IO HTTP/1.1 engine (`proxy.http.h1`), both roles.

No sockets, no clock: bytes go in, events come out; events go in, bytes come out.
"""

from __future__ import annotations

import pytest

from proxy.http.h1 import (
    ClientConnection,
    Data,
    EndOfMessage,
    Event,
    InformationalResponse,
    ProtocolError,
    RequestHead,
    ResponseHead,
    ServerConnection,
    TunnelBytes,
)
from proxy.http.limits import Limits

LIMITS = Limits(max_header_count=10, max_header_bytes=1024)


def server() -> ServerConnection:
    return ServerConnection(LIMITS)


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


def body_of(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Data))


def one_error(events: list[Event]) -> ProtocolError:
    assert isinstance(events[-1], ProtocolError), events
    return events[-1]


# -- server: receiving ---------------------------------------------------------------------------


def test_a_get_becomes_a_head_and_its_end() -> None:
    events = server().receive_data(b"GET /a?b=1 HTTP/1.1\r\nHost: Svc\r\nX-A: 1 \r\n\r\n")
    assert kinds(events) == ["RequestHead", "EndOfMessage"]
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.path, head.authority) == (
        "GET",
        "/a?b=1",
        "/a?b=1",
        "svc",
    )
    # names lower-cased, wire order, values without surrounding whitespace; Host normalised
    assert head.headers == [("host", "svc"), ("x-a", "1")]
    assert head.keep_alive and head.content_length is None and not head.chunked


def test_the_authority_of_a_repeated_host_is_the_same_normal_form() -> None:
    host = b"Host: Svc.NS.:80\r\n\r\n"
    conn = server()
    events = conn.receive_data(
        b"GET /a HTTP/1.1\r\n" + host + b"GET /b/./c HTTP/1.1\r\n" + host
        + b"OPTIONS * HTTP/1.1\r\n" + host + b"GET http://other:1/d HTTP/1.1\r\n" + host
    )  # fmt: skip
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [(h.authority, h.path) for h in heads] == [
        ("svc.ns:80", "/a"),
        ("svc.ns:80", "/b/c"),
        ("svc.ns:80", "*"),
        ("other:1", "/d"),
    ]
    assert all(h.headers == [("host", h.authority)] for h in heads)
    # a different Host is normalised (and refused) on its own
    events = conn.receive_data(b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n")
    assert one_error(events).status == 400
    # a CONNECT names its authority in the target, whatever the Host
    conn = server()
    events = conn.receive_data(
        b"GET / HTTP/1.1\r\n" + host + b"CONNECT db:5432 HTTP/1.1\r\n" + host
    )
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [h.authority for h in heads] == ["svc.ns:80", "db:5432"]


def test_bytes_split_anywhere_give_the_same_events() -> None:
    wire = b"POST /u HTTP/1.1\r\nHost: s\r\nContent-Length: 5\r\n\r\nhello"
    conn = server()
    events: list[Event] = []
    for i in range(len(wire)):
        events += conn.receive_data(wire[i : i + 1])
    assert kinds(events)[0] == "RequestHead" and kinds(events)[-1] == "EndOfMessage"
    assert body_of(events) == b"hello"


def test_pipelined_requests_come_out_in_order() -> None:
    conn = server()
    events = conn.receive_data(
        b"GET /1 HTTP/1.1\r\nHost: s\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\n\r\nok"
        b"GET /3 HTTP/1.1\r\nHost: s\r\n\r\n"
    )
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [h.path for h in heads] == ["/1", "/2", "/3"]
    assert body_of(events) == b"ok"
    # answered in order: the HEAD-less GET gets a body, each answer ends its request
    for path in ("/1", "/2", "/3"):
        wire = conn.send(ResponseHead(200, [("x-path", path)], content_length=0))
        assert wire.startswith(b"HTTP/1.1 200 OK\r\nx-path: " + path.encode())
        assert conn.send(EndOfMessage()) == b""
    with pytest.raises(ValueError, match="no request to answer"):
        conn.send(ResponseHead(200, [], content_length=0))


def test_chunked_body_with_trailers() -> None:
    events = server().receive_data(
        b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Checksum: 9\r\n\r\n"
    )
    assert body_of(events) == b"abcde"
    end = events[-1]
    assert isinstance(end, EndOfMessage) and end.trailers == [("x-checksum", "9")]


MALFORMED_AFTER_A_GOOD_REQUEST = [
    b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 99999999999999999999\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: s\r\nHost: s\r\n\r\n",
    b"GET /a#f HTTP/1.1\r\nHost: s\r\n\r\n",
    b"GET /a;p=1 HTTP/1.1\r\nHost: s\r\n\r\n",
    b"GET /a%2Fb HTTP/1.1\r\nHost: s\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: s\r\nConnection: upgrade\r\nUpgrade: ws\r\nContent-Length: 1\r\n\r\na",
]


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        # request smuggling: both framings, duplicate or conflicting lengths
        (
            b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: +3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
        # obs-fold, bare LF inside a field, NUL
        (b"GET / HTTP/1.1\r\nHost: s\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: s\r\nX-A: a\x00b\r\n\r\n", 400),
        # Host: missing in HTTP/1.1, repeated, invalid
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        # versions, targets
        (b"GET / HTTP/2.0\r\nHost: s\r\n\r\n", 400),
        (b"GET /a#frag HTTP/1.1\r\nHost: s\r\n\r\n", 400),
        (b"GET ftp://x/ HTTP/1.1\r\nHost: s\r\n\r\n", 400),
        (b"CONNECT /path HTTP/1.1\r\nHost: s\r\n\r\n", 400),
        # an upgrade with a body would relay the body as protocol bytes
        (
            b"GET / HTTP/1.1\r\nHost: s\r\nConnection: upgrade\r\nUpgrade: ws\r\nContent-Length: 2\r\n\r\nab",
            400,
        ),
        # caps: field count, head bytes, request line length
        (
            b"GET / HTTP/1.1\r\nHost: s\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(10))
            + b"\r\n",
            431,
        ),
        (b"GET / HTTP/1.1\r\nHost: s\r\nX-Big: " + b"v" * 1100 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 1100 + b" HTTP/1.1\r\nHost: s\r\n\r\n", 431),
        (b"GARBAGE\r\n\r\n", 400),
    ],
)
def test_malformed_requests_never_become_heads(wire: bytes, status: int) -> None:
    conn = server()
    events = conn.receive_data(wire)
    assert not any(isinstance(e, RequestHead) for e in events)
    assert one_error(events).status == status
    assert not conn.parsing
    # nothing more is parsed, even a valid request
    assert conn.receive_data(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n") == []


@pytest.mark.parametrize("case", MALFORMED_AFTER_A_GOOD_REQUEST)
def test_a_request_after_a_good_one_on_the_same_host_is_checked_as_strictly(case: bytes) -> None:
    # the second request of a keep-alive connection takes the engine's fast path
    conn = server()
    good = conn.receive_data(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    assert kinds(good) == ["RequestHead", "EndOfMessage"]
    events = conn.receive_data(case)
    assert not any(isinstance(e, RequestHead) for e in events)
    assert one_error(events).status == 400


def test_a_head_that_never_ends_is_stopped_at_the_header_budget() -> None:
    conn = server()
    assert conn.receive_data(b"GET / HTTP/1.1\r\nHost: s\r\nX-A: ") == []
    events: list[Event] = []
    for _ in range(20):
        events += conn.receive_data(b"v" * 100)
        if events:
            break
    assert one_error(events).status == 431


@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\nabc\r\n0\r\n\r\n",  # not hex
        b"3\r\nabcdef\r\n0\r\n\r\n",  # longer than its size
        b"-1\r\nabc\r\n0\r\n\r\n",
        b"1" * 20 + b"\r\n",  # a size that overflows
    ],
)
def test_a_broken_chunked_body_fails_the_request_already_handed_out(chunks: bytes) -> None:
    conn = server()
    events = conn.receive_data(
        b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    )
    assert isinstance(events[0], RequestHead)
    error = one_error(events)
    assert error.status == 400 and error.in_body


def test_too_many_trailer_fields_are_refused_with_431() -> None:
    conn = server()
    trailers = b"".join(b"T-%d: 1\r\n" % i for i in range(11))
    events = conn.receive_data(
        b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
        + trailers
        + b"\r\n"
    )
    error = one_error(events)
    assert error.status == 431 and error.in_body


def test_the_shell_can_fail_a_stalled_request_with_408() -> None:
    conn = server()
    events = conn.receive_data(b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 9\r\n\r\nab")
    assert conn.in_body and body_of(events) == b"ab"
    error = conn.fail(408, "request body stalled")
    assert (error.status, error.in_body) == (408, True)
    assert conn.receive_data(b"cdefghi") == []


def test_keep_alive_and_close() -> None:
    conn = server()
    (head, _) = conn.receive_data(b"GET / HTTP/1.0\r\n\r\n")
    assert isinstance(head, RequestHead) and not head.keep_alive
    assert b"connection: close\r\n" in conn.send(ResponseHead(200, [], content_length=0))
    assert not conn.keep_alive

    conn = server()
    conn.receive_data(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    wire = conn.send(ResponseHead(200, [], content_length=0))
    assert b"connection: keep-alive\r\n" in wire and conn.keep_alive

    conn = server()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
    assert b"connection: close\r\n" in conn.send(ResponseHead(200, [], content_length=0))

    conn = server()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    wire = conn.send(ResponseHead(200, [], content_length=0, keep_alive=False))
    assert b"connection: close\r\n" in wire


def test_expect_100_continue() -> None:
    conn = server()
    (head,) = conn.receive_data(
        b"PUT / HTTP/1.1\r\nHost: s\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    )
    assert isinstance(head, RequestHead) and head.expect_continue
    assert conn.send(InformationalResponse(100)) == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert body_of(conn.receive_data(b"abc")) == b"abc"


# -- server: tunnels -----------------------------------------------------------------------------


def test_an_upgrade_request_turns_what_follows_into_tunnel_bytes() -> None:
    conn = server()
    events = conn.receive_data(
        b"GET /ws HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00"
    )
    assert kinds(events) == ["RequestHead", "EndOfMessage", "TunnelBytes"]
    head = events[0]
    assert isinstance(head, RequestHead) and head.upgrade == "websocket"
    assert events[2] == TunnelBytes(b"\x81\x00") or events[2].data == b"\x81\x00"  # type: ignore[union-attr]
    later = conn.receive_data(b"GET / HTTP/1.1\r\n\r\n")  # not parsed: tunnelled
    assert kinds(later) == ["TunnelBytes"]
    wire = conn.send(ResponseHead(101, [("upgrade", "websocket"), ("content-length", "0")]))
    assert wire == (
        b"HTTP/1.1 101 Switching Protocols\r\ncontent-length: 0\r\n"
        b"connection: upgrade\r\nupgrade: websocket\r\n\r\n"
    )


def test_an_upgrade_refused_by_a_normal_answer_closes_the_connection() -> None:
    conn = server()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: s\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n")
    assert not conn.parsing
    wire = conn.send(ResponseHead(200, [], content_length=0, keep_alive=False))
    assert b"connection: close" in wire


def test_connect_is_answered_and_becomes_a_tunnel() -> None:
    conn = server()
    events = conn.receive_data(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n\x16\x03")
    head = events[0]
    assert isinstance(head, RequestHead) and (head.method, head.authority) == ("CONNECT", "db:5432")
    assert head.upgrade is None
    assert events[-1] == TunnelBytes(b"\x16\x03") or events[-1].data == b"\x16\x03"  # type: ignore[union-attr]
    assert conn.send(ResponseHead(200, [])) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    with pytest.raises(ValueError):
        conn.send(ResponseHead(200, []))


def test_a_101_only_answers_an_upgrade() -> None:
    conn = server()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    with pytest.raises(ValueError):
        conn.send(ResponseHead(101, []))


# -- server: sending -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_line", "status", "length", "expected"),
    [
        # HEAD: no body; the length a GET would get is announced
        (b"HEAD / HTTP/1.1", 200, 10, b"content-length: 10\r\n\r\n"),
        (b"HEAD / HTTP/1.1", 200, None, b"\r\n\r\n"),
        # 204 never announces a length; 304 may
        (b"GET / HTTP/1.1", 204, 10, b"No Content\r\n\r\n"),
        (b"GET / HTTP/1.1", 304, 10, b"content-length: 10\r\n\r\n"),
    ],
)
def test_responses_without_a_body(
    request_line: bytes, status: int, length: int | None, expected: bytes
) -> None:
    conn = server()
    conn.receive_data(request_line + b"\r\nHost: s\r\n\r\n")
    wire = conn.send(
        ResponseHead(status, [("transfer-encoding", "chunked")], content_length=length)
    )
    assert wire.endswith(expected) and b"transfer-encoding" not in wire
    with pytest.raises(ValueError, match="no body"):
        conn.send(Data(b"x"))
    assert conn.send(EndOfMessage()) == b""


def test_unknown_length_is_chunked_for_http11_and_close_delimited_for_http10() -> None:
    conn = server()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    head = conn.send(
        ResponseHead(200, [("content-length", "99"), ("connection", "x-a"), ("x-a", "1")])
    )
    assert head == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    assert conn.send(Data(b"hello")) == b"5\r\nhello\r\n"
    assert conn.send(Data(b"")) == b""  # an empty chunk would end the body
    assert conn.send(EndOfMessage([("grpc-status", "0")])) == b"0\r\n\r\n"  # no TE: trailers

    conn = server()
    conn.receive_data(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    head = conn.send(ResponseHead(200, []))
    assert head == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n"
    assert conn.send(Data(b"hello")) == b"hello"


def test_trailers_reach_a_client_that_sent_te_trailers() -> None:
    conn = server()
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: s\r\nTE: trailers\r\nContent-Length: 0\r\n\r\n")
    conn.send(ResponseHead(200, []))
    end = conn.send(EndOfMessage([("grpc-status", "0"), ("content-length", "1")]))
    assert end == b"0\r\ngrpc-status: 0\r\n\r\n"


def test_a_body_must_match_its_content_length() -> None:
    conn = server()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    conn.send(ResponseHead(200, [], content_length=3))
    assert conn.send(Data(b"ab")) == b"ab"
    with pytest.raises(ValueError, match="longer"):
        conn.send(Data(b"cd"))
    with pytest.raises(ValueError, match="shorter"):
        conn.send(EndOfMessage())


@pytest.mark.parametrize(
    "headers",
    [[("x-a", "1\r\nset-cookie: evil")], [("bad name", "1")], [("x-a", "snow \u2603")]],
)
def test_a_field_that_would_corrupt_the_head_is_refused(headers: list[tuple[str, str]]) -> None:
    conn = server()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    with pytest.raises(ValueError):
        conn.send(ResponseHead(200, headers, content_length=0))


# -- client --------------------------------------------------------------------------------------


def client() -> ClientConnection:
    return ClientConnection(LIMITS, "up:80")


def start(
    conn: ClientConnection, method: str = "GET", length: int | None = 0, **kw: object
) -> bytes:
    headers: list[tuple[str, str]] = kw.pop("headers", [])  # type: ignore[assignment]
    wire = conn.send(RequestHead(method, "/p", headers, content_length=length))
    return wire + conn.send(EndOfMessage()) if length == 0 else wire


def test_a_request_head_is_framed_by_its_body_not_by_the_callers_fields() -> None:
    conn = client()
    wire = conn.send(
        RequestHead("POST", "/p", [("Content-Length", "1"), ("X-A", "1")], content_length=None)
    )
    assert wire == (
        b"POST /p HTTP/1.1\r\nX-A: 1\r\nhost: up:80\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    assert conn.send(Data(b"abc")) == b"3\r\nabc\r\n"
    assert conn.send(EndOfMessage()) == b"0\r\n\r\n"
    assert conn.request_done and not conn.response_done
    assert (
        start(client(), "POST") == b"POST /p HTTP/1.1\r\nhost: up:80\r\ncontent-length: 0\r\n\r\n"
    )
    assert start(client(), "GET", headers=[("host", "h")]) == b"GET /p HTTP/1.1\r\nhost: h\r\n\r\n"


@pytest.mark.parametrize(
    "head",
    [
        RequestHead("GET", "/a b", []),
        RequestHead("G T", "/", []),
        RequestHead("GET", "/", [("x-a", "1\r\nx-b: 2")]),
        RequestHead("GET", "/", [("connection", "upgrade"), ("upgrade", "ws")], content_length=3),
    ],
)
def test_a_request_that_cannot_be_sent_as_it_is_is_refused(head: RequestHead) -> None:
    conn = client()
    with pytest.raises(ValueError):
        conn.send(head)


def test_a_response_with_a_length_then_reuse() -> None:
    conn = client()
    start(conn)
    events = conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhel")
    response = events[0]
    assert isinstance(response, ResponseHead)
    assert (response.status, response.reason, response.content_length) == (200, "OK", 5)
    assert response.headers == [("content-length", "5"), ("x-a", "1")]
    assert not conn.reusable
    events = conn.receive_data(b"lo")
    assert kinds(events) == ["Data", "EndOfMessage"] and conn.reusable
    start(conn, "HEAD")
    events = conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
    assert kinds(events) == ["ResponseHead", "EndOfMessage"] and conn.reusable
    start(conn)  # a fresh parser after HEAD: the announced 50 bytes are not awaited
    events = conn.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert kinds(events) == ["ResponseHead", "EndOfMessage"] and conn.reusable


def test_a_chunked_response_with_trailers() -> None:
    conn = client()
    start(conn)
    events = conn.receive_data(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nab\r\n0\r\ngrpc-status: 0\r\n\r\n"
    )
    assert body_of(events) == b"ab"
    end = events[-1]
    assert isinstance(end, EndOfMessage) and end.trailers == [("grpc-status", "0")]
    assert conn.reusable


def test_interim_responses_come_before_the_final_one() -> None:
    conn = client()
    start(conn)
    events = conn.receive_data(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    )
    assert kinds(events) == [
        "InformationalResponse",
        "InformationalResponse",
        "ResponseHead",
        "EndOfMessage",
    ]


def test_a_body_delimited_by_the_close() -> None:
    conn = client()
    start(conn)
    events = conn.receive_data(b"HTTP/1.0 200 OK\r\n\r\nsome")
    response = events[0]
    assert isinstance(response, ResponseHead) and not response.keep_alive
    assert kinds(conn.receive_eof()) == ["EndOfMessage"]
    assert conn.response_done and not conn.reusable


def test_a_close_mid_body_is_an_error() -> None:
    conn = client()
    start(conn)
    conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab")
    error = one_error(conn.receive_eof())
    assert error.in_body and "mid-body" in error.reason
    idle = client()
    assert kinds(idle.receive_eof()) == ["ConnectionClosed"]


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"HTTP/1.1 099 Odd\r\n\r\n", "outside 100-599"),
        (b"HTTP/1.1 600 Odd\r\n\r\n", "outside 100-599"),
        (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n", "101"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", "malformed"),
        (
            b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(11)) + b"\r\n",
            "too many",
        ),
        (b"HTTP/1.1 200 OK\r\nX: " + b"v" * 1100 + b"\r\n\r\n", "too large"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 17, "interim"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", "unsolicited"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed"),
    ],
)
def test_malformed_responses(wire: bytes, reason: str) -> None:
    conn = client()
    start(conn)
    events = conn.receive_data(wire)
    error = one_error(events)
    assert error.status == 502 and reason in error.reason
    assert not conn.reusable


def test_bytes_outside_an_exchange_break_the_connection() -> None:
    conn = client()
    error = one_error(conn.receive_data(b"HTTP/1.1 200 OK\r\n\r\n"))
    assert "outside an exchange" in error.reason
    with pytest.raises(ValueError):
        conn.send(RequestHead("GET", "/", []))


def test_an_accepted_upgrade_hands_out_tunnel_bytes() -> None:
    conn = client()
    start(conn, headers=[("connection", "upgrade"), ("upgrade", "websocket")])
    events = conn.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x01"
    )
    assert kinds(events) == ["ResponseHead", "TunnelBytes"]
    assert kinds(conn.receive_data(b"more")) == ["TunnelBytes"]
    assert not conn.reusable
    assert kinds(conn.receive_eof()) == ["ConnectionClosed"]


def test_an_early_refusal_leaves_the_request_unfinished_and_the_connection_unusable() -> None:
    conn = client()
    conn.send(RequestHead("POST", "/", [], content_length=100))
    events = conn.receive_data(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
    assert kinds(events) == ["ResponseHead", "EndOfMessage"]
    conn.abandon_request()
    assert conn.exchange_done and not conn.reusable
