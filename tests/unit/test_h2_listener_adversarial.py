"""Adversarial transcripts of the HTTP/2 listener (h2c from the app, h2 between
sidecars): `H2ServerProtocol` driven with raw frames over an in-memory transport, no
sockets. What a hostile client sends either reaches the handler as a request an
HTTP/1.1 upstream receives exactly as authorized (the h2 -> h1 downgrade), or is
refused before any handler runs; no header value reaches a log and no traceback
reaches the wire (docs/architecture.md §5.1, §6)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
import structlog
from hyperframe.frame import (
    DataFrame,
    HeadersFrame,
    PriorityFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from mesh import logs
from proxy.http import Exchange, Limits, Request
from proxy.http.h1.encode import encode_head, request_line
from proxy.http.h2.connection import ENHANCE_YOUR_CALM, PROTOCOL_ERROR, H2Limits
from proxy.http.h2.server import H2ServerProtocol
from proxy.http.target import Normalization

SECRET = "s3cr3t-header-value"
GET = [(":method", "GET"), (":scheme", "http"), (":authority", "reviews:9080")]


class MemoryTransport(asyncio.Transport):
    """What the listener writes, and its closing (reported to the protocol as a real
    transport does, on the next loop turn)."""

    def __init__(self, protocol: H2ServerProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("10.0.0.9", 40000), "sockname": ("127.0.0.1", 15001)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@dataclass
class Seen:
    method: str
    authority: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes | None = None
    body_error: str = ""


@dataclass
class Listener:
    """One client connection to the listener; the client is the `h2` library with its
    own checks off, so it sends what a hostile client would."""

    h2_limits: H2Limits | None = None
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        async def handler(req: Request, ex: Exchange) -> None:
            seen = Seen(req.method, req.authority, req.path, list(req.headers))
            self.seen.append(seen)
            try:
                seen.body = await req.body.read_all(1 << 20)
            except BaseException as e:  # failed, or cancelled with its connection
                seen.body_error = type(e).__name__
                raise
            await ex.respond(200, [("content-type", "text/plain")], b"served")

        self.protocol = H2ServerProtocol(handler, Limits(), None, Normalization(), self.h2_limits)
        self.transport = MemoryTransport(self.protocol)
        self.protocol.connection_made(self.transport)
        config = h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.client = h2.connection.H2Connection(config)
        self.client.initiate_connection()
        self.send_raw(self.client.data_to_send())
        self.events()  # the listener's SETTINGS

    def send_raw(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def send(self) -> None:
        self.send_raw(self.client.data_to_send())

    def events(self) -> list[h2.events.Event]:
        data = bytes(self.transport.written)
        self.transport.written.clear()
        events = self.client.receive_data(data) if data else []
        return [
            e
            for e in events
            if not isinstance(
                e,
                h2.events.SettingsAcknowledged
                | h2.events.RemoteSettingsChanged
                | h2.events.WindowUpdated,
            )
        ]

    async def answer(self, stream_id: int = 1) -> tuple[int | None, bytes, list[Any]]:
        """Let the handlers run; the stream's status and body (None: no response) and
        every event the client got."""
        for _ in range(5):
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        got = self.events()
        status, body = None, b""
        for event in got:
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                status = int(dict(event.headers)[b":status"])
            if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                body += event.data
        return status, body, got


def goaway(events: list[Any]) -> int | None:
    for event in events:
        if isinstance(event, h2.events.ConnectionTerminated):
            return int(event.error_code)
    return None


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    config = structlog.get_config()
    stream = io.StringIO()
    logs.configure("debug", json=True, stream=stream)
    yield stream
    structlog.configure(**config)
    logs._generation += 1


def assert_downgrades_as_authorized(seen: Seen) -> None:
    """What the handler got is what an HTTP/1.1 upstream receives: one request line and
    the same fields, nothing that could split the head (the upstream encoder's own
    checks are the oracle)."""
    head = encode_head(request_line(seen.method, seen.path), seen.headers, frozenset())
    assert head.count(b"\r\n") == 1 + len(seen.headers) + 1
    assert sum(1 for n, _ in seen.headers if n == "host") == 1
    assert dict(seen.headers)["host"] == seen.authority


# -- refused before any handler: 400 on the stream -------------------------------------

REFUSED_400 = {
    "control character in a value": [*GET, (":path", "/"), ("x-a", f"{SECRET}\x01")],
    "DEL in a value": [*GET, (":path", "/"), ("x-a", f"{SECRET}\x7f")],
    "name with a separator": [*GET, (":path", "/"), ("x(a", SECRET)],
    "name with a slash": [*GET, (":path", "/"), ("x/a", SECRET)],
    "extended CONNECT (:protocol, never enabled)": [
        (":method", "CONNECT"),
        (":protocol", "websocket"),
        (":scheme", "http"),
        (":authority", "reviews:9080"),
        (":path", "/chat"),
    ],
    "lower-case method (a DENY on GET must not miss it)": [
        (":method", "get"),
        (":scheme", "http"),
        (":authority", "reviews:9080"),
        (":path", "/admin"),
    ],
    "space in :path (request-line injection)": [*GET, (":path", "/public HTTP/1.1")],
    "tab in :path": [*GET, (":path", "/a\tb")],
    "control character in :path": [*GET, (":path", "/a\x01b")],
    "space in the query": [*GET, (":path", "/a?x=1 HTTP/1.1")],
    "non-ASCII query": [*GET, (":path", "/a?x=\xe9")],
    "encoded slash": [*GET, (":path", "/public%2f..%2fadmin")],
    "encoded backslash": [*GET, (":path", "/public%5c..%5cadmin")],
    "backslash": [*GET, (":path", "/public\\..\\admin")],
    "overlong UTF-8 dot": [*GET, (":path", "/public/%c0%ae%c0%ae/admin")],
    "path parameter": [*GET, (":path", "/admin;public")],
    "trailing dot segment": [*GET, (":path", "/admin.")],
    "absolute URI in :path": [*GET, (":path", "http://evil/admin")],
    "fragment": [*GET, (":path", "/public#/../admin")],
    "userinfo in :authority": [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "reviews@evil"),
        (":path", "/"),
    ],
    "comma list in :authority": [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "reviews,evil"),
        (":path", "/"),
    ],
    "port out of range": [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "reviews:99999"),
        (":path", "/"),
    ],
}


@pytest.mark.parametrize("headers", REFUSED_400.values(), ids=REFUSED_400.keys())
async def test_heads_that_cannot_be_forwarded_as_authorized_get_400(
    headers: list[tuple[str, str]], captured_logs: io.StringIO
) -> None:
    listener = Listener()
    listener.client.send_headers(1, headers, end_stream=True)
    listener.send()
    status, body, _ = await listener.answer()
    assert status == 400, body
    assert listener.seen == []  # no handler: nothing routed, authorized or forwarded
    assert b"Traceback" not in body and SECRET.encode() not in body
    # the connection stays usable for the next request
    listener.client.send_headers(3, [*GET, (":path", "/ok")], end_stream=True)
    listener.send()
    status, body, _ = await listener.answer(3)
    assert (status, body) == (200, b"served")
    assert SECRET not in captured_logs.getvalue()


# -- refused by the connection: GOAWAY PROTOCOL_ERROR ----------------------------------

CONNECTION_ERRORS = {
    "transfer-encoding (TE.CL after the downgrade)": [("transfer-encoding", "chunked")],
    "connection": [("connection", "keep-alive, x-secret")],
    "keep-alive": [("keep-alive", "timeout=5")],
    "proxy-connection": [("proxy-connection", "keep-alive")],
    "upgrade (h2c upgrade smuggling)": [("upgrade", "h2c")],
    "te other than trailers": [("te", "chunked")],
    "CRLF in a value (header injection)": [("x-a", f"{SECRET}\r\nx-injected: 1")],
    "LF in a value": [("x-a", f"{SECRET}\nGET /admin HTTP/1.1")],
    "NUL in a value": [("x-a", f"{SECRET}\x00")],
    "Host differing from :authority": [("host", "ratings")],
    "upper-case name": [("X-A", SECRET)],
    "empty name": [("", SECRET)],
}


@pytest.mark.parametrize("extra", CONNECTION_ERRORS.values(), ids=CONNECTION_ERRORS.keys())
async def test_connection_specific_and_injecting_fields_end_the_connection(
    extra: list[tuple[str, str]], captured_logs: io.StringIO
) -> None:
    listener = Listener()
    listener.client.send_headers(1, [*GET, (":path", "/"), *extra], end_stream=True)
    listener.send()
    status, _, got = await listener.answer()
    assert listener.seen == []
    assert status is None and goaway(got) == PROTOCOL_ERROR
    assert listener.transport.closing
    assert SECRET not in captured_logs.getvalue()


@pytest.mark.parametrize(
    "pseudo",
    [
        [(":path", "/a"), (":path", "/admin")],
        [(":path", "/a"), (":authority", "ratings")],
        [(":path", "/a"), (":method", "DELETE")],
    ],
    ids=["two :path", "two :authority", "two :method"],
)
async def test_repeated_pseudo_headers_end_the_connection(pseudo: list[tuple[str, str]]) -> None:
    listener = Listener()
    listener.client.send_headers(1, [*GET, *pseudo], end_stream=True)
    listener.send()
    _, _, got = await listener.answer()
    assert listener.seen == [] and goaway(got) == PROTOCOL_ERROR


@pytest.mark.parametrize("declared", ["3", "30", "3, 3", "-1", "0x10"])
async def test_content_length_mismatch_never_reaches_the_upstream(declared: str) -> None:
    """H2.CL: the body must be exactly what content-length says, or nothing of it is
    read by the handler (the HTTP/1.1 upstream would frame the rest as another
    request)."""
    listener = Listener()
    post = [(":method", "POST"), (":scheme", "http"), (":authority", "reviews:9080")]
    listener.client.send_headers(1, [*post, (":path", "/"), ("content-length", declared)])
    listener.send()
    status, _, got = await listener.answer()
    if goaway(got) is None and status is None:  # a well-formed length the body then breaks
        listener.client.send_data(1, b"0123456789GET /admin HTTP/1.1\r\n\r\n", end_stream=True)
        listener.send()
        status, _, got = await listener.answer()
    assert all(seen.body is None for seen in listener.seen)
    assert goaway(got) == PROTOCOL_ERROR or status == 400
    if listener.seen:  # the handler started on the head: its body read failed
        assert listener.seen[0].body_error


async def test_a_bodyless_request_declaring_a_length_is_refused() -> None:
    """END_STREAM on HEADERS with content-length: 5 (h2 does not check a length it
    never gets DATA for): malformed (RFC 9113 §8.1.1), and a handler trusting the field
    (an ext_authz check, an upstream keeping it) would frame 5 bytes that never come."""
    listener = Listener()
    post = [(":method", "POST"), (":scheme", "http"), (":authority", "reviews:9080")]
    listener.client.send_headers(
        1, [*post, (":path", "/"), ("content-length", "5")], end_stream=True
    )
    listener.send()
    status, _, _ = await listener.answer()
    assert status == 400
    assert listener.seen == []


# -- accepted: normalised once, forwarded as authorized ---------------------------------

NORMALISED = {
    "dot segments": ("/public/../admin", "reviews:9080", "/admin", "reviews:9080"),
    "encoded dots": ("/public/%2e%2e/admin", "reviews:9080", "/admin", "reviews:9080"),
    "encoded unreserved": ("/%61dmin", "reviews:9080", "/admin", "reviews:9080"),
    "merged slashes": ("//admin//x", "reviews:9080", "/admin/x", "reviews:9080"),
    "query kept, path normalised": ("/a/./b?x=/../admin", "reviews:9080", "/a/b?x=/../admin", "reviews:9080"),
    "upper-case host": ("/", "REVIEWS:9080", "/", "reviews:9080"),
    "trailing host dot": ("/", "reviews.default.svc.cluster.local.:9080", "/", "reviews.default.svc.cluster.local:9080"),
    "IPv6 literal": ("/", "[::FFFF:7F00:1]:9080", "/", "[::ffff:7f00:1]:9080"),
}  # fmt: skip


@pytest.mark.parametrize("case", NORMALISED.values(), ids=NORMALISED.keys())
async def test_path_and_authority_reach_the_handler_normalised_once(
    case: tuple[str, str, str, str],
) -> None:
    path, authority, want_path, want_authority = case
    listener = Listener()
    head = [(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", path)]
    listener.client.send_headers(1, [*head, ("x-http-method-override", "DELETE")], end_stream=True)
    listener.send()
    status, _, _ = await listener.answer()
    assert status == 200
    (seen,) = listener.seen
    assert (seen.path, seen.authority) == (want_path, want_authority)
    assert "x-http-method-override" not in dict(seen.headers)
    assert_downgrades_as_authorized(seen)


async def test_host_without_authority_is_the_authority_and_is_forwarded_once() -> None:
    listener = Listener()
    listener.client.send_headers(
        1, [(":method", "GET"), (":scheme", "http"), (":path", "/"), ("host", "Ratings.")],
        end_stream=True,
    )  # fmt: skip
    listener.send()
    status, _, _ = await listener.answer()
    assert status == 200
    (seen,) = listener.seen
    assert seen.authority == "ratings"
    assert_downgrades_as_authorized(seen)


async def test_tab_and_obs_text_values_are_forwarded_unchanged() -> None:
    listener = Listener()
    listener.client.send_headers(
        1, [*GET, (":path", "/"), ("x-a", "a\tb"), ("x-b", "caf\xe9")], end_stream=True
    )
    listener.send()
    status, _, _ = await listener.answer()
    assert status == 200
    (seen,) = listener.seen
    assert ("x-a", "a\tb") in seen.headers
    assert_downgrades_as_authorized(seen)


# -- floods ----------------------------------------------------------------------------


async def test_settings_flood_ends_the_connection_with_enhance_your_calm() -> None:
    listener = Listener(H2Limits(max_control_frames=50))
    raw = b"".join(SettingsFrame(0, settings={0x3: 100}).serialize() for _ in range(80))
    listener.send_raw(raw)
    _, _, got = await listener.answer()
    assert goaway(got) == ENHANCE_YOUR_CALM
    assert listener.transport.closing


async def test_rapid_reset_cancels_handlers_and_ends_the_connection() -> None:
    listener = Listener(H2Limits(max_peer_resets=20))
    for i in range(30):
        stream_id = 1 + 2 * i
        listener.client.send_headers(stream_id, [*GET, (":path", "/slow")])
        listener.client.reset_stream(stream_id)
    listener.send()
    _, _, got = await listener.answer()
    assert goaway(got) == ENHANCE_YOUR_CALM
    assert all(seen.body is None for seen in listener.seen)


def _empty_data_frames(count: int) -> bytes:
    return b"".join(DataFrame(1).serialize() for _ in range(count))


async def test_empty_data_frame_flood_ends_the_connection() -> None:
    """CVE-2019-9518: zero-length DATA frames without END_STREAM cost the server work
    and carry nothing; Envoy ends such a connection."""
    listener = Listener(H2Limits(max_control_frames=50))
    post = [(":method", "POST"), (":scheme", "http"), (":authority", "reviews:9080")]
    listener.client.send_headers(1, [*post, (":path", "/")])
    listener.send()
    listener.send_raw(_empty_data_frames(80))
    _, _, got = await listener.answer()
    assert goaway(got) == ENHANCE_YOUR_CALM


async def test_priority_frame_flood_ends_the_connection() -> None:
    """CVE-2019-9513 (resource loop): PRIORITY frames shuffle the dependency tree and
    are never needed in bulk."""
    listener = Listener(H2Limits(max_control_frames=50))
    raw = b""
    for i in range(80):
        frame = PriorityFrame(1 + 2 * i)
        frame.depends_on = 1 + 2 * ((i + 1) % 80)
        frame.stream_weight = 15
        raw += frame.serialize()
    listener.send_raw(raw)
    _, _, got = await listener.answer()
    assert goaway(got) == ENHANCE_YOUR_CALM


async def test_header_list_over_the_limit_is_refused_without_logging_it(
    captured_logs: io.StringIO,
) -> None:
    listener = Listener(H2Limits(max_header_list_size=8 * 1024))
    encoder = hpack.Encoder()
    block = encoder.encode([*GET, (":path", "/"), ("x-secret", SECRET * 1000)])
    frame = HeadersFrame(1)
    frame.data = block
    frame.flags.add("END_HEADERS")
    frame.flags.add("END_STREAM")
    listener.send_raw(frame.serialize())
    status, _, got = await listener.answer()
    assert listener.seen == []
    assert status == 431 or goaway(got) is not None
    assert SECRET not in captured_logs.getvalue()


async def test_handler_failure_is_a_generic_500_with_no_traceback_or_header_value(
    captured_logs: io.StringIO,
) -> None:
    async def broken(req: Request, ex: Exchange) -> None:
        raise RuntimeError("injected")

    listener = Listener()
    listener.protocol._handler = broken
    listener.client.send_headers(1, [*GET, (":path", "/"), ("x-a", SECRET)], end_stream=True)
    listener.send()
    status, body, _ = await listener.answer()
    assert status == 500
    assert b"Traceback" not in body and b"injected" not in body
    text = captured_logs.getvalue()
    assert SECRET not in text
    assert any(json.loads(line).get("event") == "h2.handler_error" for line in text.splitlines())


@pytest.mark.parametrize(
    "trailers",
    [[("x-t", f"{SECRET}\x01")], [("x(t", SECRET)]],
    ids=["control character", "name not a token"],
)
async def test_malformed_request_trailers_fail_the_body(
    trailers: list[tuple[str, str]], captured_logs: io.StringIO
) -> None:
    listener = Listener()
    post = [(":method", "POST"), (":scheme", "http"), (":authority", "reviews:9080")]
    listener.client.send_headers(1, [*post, (":path", "/")])
    listener.client.send_data(1, b"body")
    listener.client.send_headers(1, trailers, end_stream=True)
    listener.send()
    status, _, got = await listener.answer()
    assert status is None
    assert any(isinstance(e, h2.events.StreamReset) and e.error_code == PROTOCOL_ERROR for e in got)
    assert all(seen.body is None for seen in listener.seen)
    assert SECRET not in captured_logs.getvalue()


async def test_window_update_flood_ends_the_connection() -> None:
    """WINDOW_UPDATE frames with no DATA sent to justify them: each makes the server
    look at every stream waiting for window (Envoy allows 10 per DATA frame sent)."""
    listener = Listener()
    raw = b"".join(WindowUpdateFrame(0, window_increment=1).serialize() for _ in range(40))
    listener.send_raw(raw)
    _, _, got = await listener.answer()
    assert goaway(got) == ENHANCE_YOUR_CALM


async def test_window_updates_for_a_large_download_are_fine() -> None:
    async def large(req: Request, ex: Exchange) -> None:
        await ex.respond(200, [("content-type", "application/octet-stream")], b"x" * 1_000_000)

    listener = Listener()
    listener.protocol._handler = large
    listener.client.send_headers(1, [*GET, (":path", "/big")], end_stream=True)
    listener.send()
    received, ended = 0, False
    for _ in range(200):
        await asyncio.sleep(0)
        for event in listener.events():
            if isinstance(event, h2.events.DataReceived):
                received += len(event.data)
                # a client acknowledging every frame twice (stream and connection)
                listener.client.acknowledge_received_data(event.flow_controlled_length, 1)
                listener.client.increment_flow_control_window(1)
            ended = ended or isinstance(event, h2.events.StreamEnded)
            assert not isinstance(event, h2.events.ConnectionTerminated)
        listener.send()
        if ended:
            break
    assert ended and received == 1_000_000
