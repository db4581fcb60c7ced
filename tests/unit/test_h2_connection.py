"""Transcript tests of the sans-IO HTTP/2 connection (proxy.http.h2): frames in, events
and frames out, no sockets. The peer is the `h2` library itself (a client or server
state machine), or raw frames built with hyperframe for what no well-behaved peer
sends (floods)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame, PingFrame, RstStreamFrame

from proxy.http.h2 import (
    ConnectionFailed,
    Data,
    GoAway,
    H2Connection,
    H2Limits,
    RequestHead,
    ResponseHead,
    SendWindowOpened,
    StreamEnded,
    StreamReset,
    Trailers,
)
from proxy.http.h2.connection import ENHANCE_YOUR_CALM, REFUSED_STREAM, StreamGone

REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":authority", "svc"),
    (":path", "/pkg.Svc/Call"),
    ("content-type", "application/grpc"),
]


def peer_client() -> h2.connection.H2Connection:
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    return peer


def handshake(limits: H2Limits | None = None) -> tuple[H2Connection, h2.connection.H2Connection]:
    server = H2Connection(client=False, limits=limits)
    server.initiate()
    peer = peer_client()
    events = server.receive(peer.data_to_send(), 0.0)
    assert all(isinstance(e, SendWindowOpened) for e in events)  # its SETTINGS
    peer.receive_data(server.data_to_send())
    server.receive(peer.data_to_send(), 0.0)  # SETTINGS ack
    return server, peer


def pump(server: H2Connection, peer: h2.connection.H2Connection, now: float = 0.0) -> list:
    """Client bytes to the server; the server's events."""
    return server.receive(peer.data_to_send(), now)


def peer_events(server: H2Connection, peer: h2.connection.H2Connection) -> list:
    return peer.receive_data(server.data_to_send())


def test_request_with_body_and_trailers_becomes_events_in_order() -> None:
    server, peer = handshake()
    peer.send_headers(1, REQUEST)
    peer.send_data(1, b"hello")
    peer.send_headers(1, [("grpc-timeout", "1S")], end_stream=True)
    events = pump(server, peer)
    assert events[0] == RequestHead(1, REQUEST, end_stream=False)
    assert events[1] == Data(1, b"hello", 5, end_stream=False)
    assert events[2] == Trailers(1, [("grpc-timeout", "1S")])
    assert events[3] == StreamEnded(1)


def test_response_head_data_and_trailers_reach_the_client() -> None:
    server, peer = handshake()
    peer.send_headers(1, REQUEST, end_stream=True)
    pump(server, peer)
    server.send_head(
        1, [(":status", "200"), ("content-type", "application/grpc")], end_stream=False
    )
    server.send_data(1, b"\x00\x00\x00\x00\x01x")
    server.end_stream(1, [("grpc-status", "0"), ("x-custom", "kept")])
    got = peer_events(server, peer)
    kinds = [type(e) for e in got]
    assert kinds[:4] == [
        h2.events.ResponseReceived,
        h2.events.DataReceived,
        h2.events.TrailersReceived,
        h2.events.StreamEnded,
    ]
    assert (b"x-custom", b"kept") in got[2].headers
    with pytest.raises(StreamGone):
        server.send_data(1, b"late")


def test_unread_data_keeps_the_peer_window_closed_until_consumed() -> None:
    limits = H2Limits(stream_window=16_384, connection_window=1_000_000)
    server, peer = handshake(limits)
    peer.send_headers(1, REQUEST)
    assert peer.local_flow_control_window(1) == 16_384
    peer.send_data(1, b"x" * 16_384)
    events = pump(server, peer)
    assert sum(len(e.data) for e in events if isinstance(e, Data)) == 16_384
    # not consumed yet: no WINDOW_UPDATE, the sender must stop
    peer_events(server, peer)
    assert peer.local_flow_control_window(1) == 0
    server.consumed(1, 16_384)
    peer_events(server, peer)
    assert peer.local_flow_control_window(1) == 16_384


def test_outbound_data_waits_for_the_peer_window_and_trailers_wait_behind_it() -> None:
    server, peer = handshake()
    peer.send_headers(1, REQUEST, end_stream=True)
    pump(server, peer)
    server.send_head(1, [(":status", "200")], end_stream=False)
    server.send_data(1, b"y" * 100_000)
    server.end_stream(1, [("grpc-status", "0")])
    got = peer_events(server, peer)
    received = sum(len(e.data) for e in got if isinstance(e, h2.events.DataReceived))
    assert received == 65_535  # the peer's default stream window
    assert server.outbound_buffered(1) == 100_000 - 65_535
    assert not any(isinstance(e, h2.events.TrailersReceived) for e in got)
    peer.acknowledge_received_data(received, 1)
    pump(server, peer)
    got = peer_events(server, peer)
    assert sum(len(e.data) for e in got if isinstance(e, h2.events.DataReceived)) == 34_465
    assert any(isinstance(e, h2.events.TrailersReceived) for e in got)
    assert server.outbound_buffered(1) == 0


def test_rapid_reset_ends_the_connection_with_enhance_your_calm() -> None:
    server, peer = handshake(H2Limits(max_peer_resets=10))
    events: list = []
    for i in range(12):
        stream_id = 1 + 2 * i
        peer.send_headers(stream_id, REQUEST)
        peer.reset_stream(stream_id)
        events += pump(server, peer, now=1.0)
        if server.failed:
            break
    assert isinstance(events[-1], ConnectionFailed)
    assert events[-1].error_code == ENHANCE_YOUR_CALM
    sent = peer_events(server, peer)
    assert any(
        isinstance(e, h2.events.ConnectionTerminated) and e.error_code == ENHANCE_YOUR_CALM
        for e in sent
    )
    # streams the peer resets slowly are fine: the count restarts every window
    server, peer = handshake(H2Limits(max_peer_resets=10, flood_window_s=1.0))
    for i in range(30):
        stream_id = 1 + 2 * i
        peer.send_headers(stream_id, REQUEST)
        peer.reset_stream(stream_id)
        events = pump(server, peer, now=float(i))
        assert StreamReset(stream_id, 0, remote=True) in events


def test_continuation_flood_ends_the_connection() -> None:
    server, _peer = handshake()
    encoder = hpack.Encoder()
    block = encoder.encode(REQUEST)
    head = HeadersFrame(1)
    head.data = block
    raw = head.serialize()
    for _ in range(80):
        cont = ContinuationFrame(1)
        cont.data = b"\x40\x01a\x01b"  # a literal header, over and over
        raw += cont.serialize()
    events = server.receive(raw, 0.0)
    assert isinstance(events[-1], ConnectionFailed)
    assert server.failed is not None


def test_hpack_bomb_is_refused_by_the_header_list_size() -> None:
    server, _peer = handshake(H2Limits(max_header_list_size=8 * 1024))
    big = "v" * 4000
    # one table entry, then many 1-byte references to it: tiny on the wire, huge decoded
    encoder = hpack.Encoder()
    block = encoder.encode([*REQUEST, ("x-bomb", big)])
    block += bytes([0xBE]) * 50  # index 62 = the x-bomb entry
    head = HeadersFrame(1)
    head.data = block
    head.flags.add("END_HEADERS")
    assert len(head.serialize()) < 5000
    events = server.receive(head.serialize(), 0.0)
    assert not any(isinstance(e, RequestHead) for e in events)
    assert isinstance(events[-1], ConnectionFailed)


def test_ping_flood_ends_the_connection() -> None:
    server, _peer = handshake(H2Limits(max_control_frames=50))
    raw = b""
    for i in range(60):
        ping = PingFrame(0)
        ping.opaque_data = i.to_bytes(8, "big")
        raw += ping.serialize()
    events = server.receive(raw, 0.0)
    assert isinstance(events[-1], ConnectionFailed)
    assert events[-1].error_code == ENHANCE_YOUR_CALM


def test_drain_sends_goaway_and_refuses_new_streams_but_finishes_open_ones() -> None:
    server, peer = handshake()
    peer.send_headers(1, REQUEST, end_stream=True)
    pump(server, peer)
    server.drain()
    got = peer_events(server, peer)
    goaway = [e for e in got if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway and goaway[0].last_stream_id == 1 and goaway[0].error_code == 0
    # a stream opened anyway is refused, and never reaches the handler
    raw_head = HeadersFrame(3)
    raw_head.data = hpack.Encoder().encode(REQUEST)
    raw_head.flags.add("END_HEADERS")
    raw_head.flags.add("END_STREAM")
    events = server.receive(raw_head.serialize(), 0.0)
    assert not any(isinstance(e, RequestHead) for e in events)
    out = server.data_to_send()
    refused = RstStreamFrame(3)
    refused.error_code = REFUSED_STREAM
    assert refused.serialize() in out
    # stream 1 still gets its answer
    server.send_head(1, [(":status", "200")], end_stream=True)
    assert server.data_to_send()


def test_client_and_server_cores_talk_to_each_other() -> None:
    client = H2Connection(client=True)
    server = H2Connection(client=False)
    client.initiate()
    server.initiate()
    stream = client.open_stream(REQUEST, end_stream=False)
    client.send_data(stream, b"ping")
    client.end_stream(stream, [("x-req-trailer", "1")])
    events = server.receive(client.data_to_send(), 0.0)
    client.receive(server.data_to_send(), 0.0)
    kinds = [type(e) for e in events if not isinstance(e, SendWindowOpened)]
    assert kinds == [RequestHead, Data, Trailers, StreamEnded]
    server.send_head(stream, [(":status", "200")], end_stream=False)
    server.send_data(stream, b"pong")
    server.end_stream(stream, [("grpc-status", "0")])
    back = client.receive(server.data_to_send(), 0.0)
    assert isinstance(back[0], ResponseHead) and back[0].status == 200
    assert Data(stream, b"pong", 4, end_stream=False) in back
    assert Trailers(stream, [("grpc-status", "0")]) in back
    assert StreamEnded(stream) in back


def test_goaway_from_the_peer_is_reported_and_stops_new_streams() -> None:
    client = H2Connection(client=True)
    server = H2Connection(client=False)
    client.initiate()
    server.initiate()
    server.receive(client.data_to_send(), 0.0)
    server.drain()
    events = client.receive(server.data_to_send(), 0.0)
    assert GoAway(0, 0) in events
    assert not client.can_open_stream


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        H2Limits(max_concurrent_streams=0)
    with pytest.raises(ValueError, match="max_frame_size"):
        H2Limits(max_frame_size=1000)


def header_blocks(data: bytes) -> list[bytes]:
    """The HPACK blocks of the HEADERS frames in `data`."""
    blocks, view = [], memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        if isinstance(frame, HeadersFrame):
            blocks.append(frame.data)
        view = view[9 + length :]
    return blocks


def test_sent_fields_are_normalised_in_one_pass_and_credentials_never_indexed() -> None:
    """What h2's outbound normalization did (off, for speed): lower-case names,
    stripped values, connection-specific fields dropped, `te` only as trailers, and
    credentials sent as never-indexed literals (HPACK's CRIME defence); no Huffman."""
    server, peer = handshake()
    stream = peer.get_next_available_stream_id()
    peer.send_headers(stream, REQUEST, end_stream=True)
    pump(server, peer)
    server.send_head(
        stream,
        [
            (":status", "200"),
            ("X-Upper", " padded "),
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("authorization", "Bearer secret-token"),
            ("cookie", "short=1"),
            ("cookie", "a-long-cookie=0123456789abcdef"),
        ],
        end_stream=True,
    )
    data = server.data_to_send()
    (block,) = header_blocks(data)
    fields = hpack.Decoder().decode(block, raw=True)
    assert [tuple(f) for f in fields] == [
        (b":status", b"200"),
        (b"x-upper", b"padded"),
        (b"authorization", b"Bearer secret-token"),
        (b"cookie", b"short=1"),
        (b"cookie", b"a-long-cookie=0123456789abcdef"),
    ]
    never = [f[0] for f in fields if isinstance(f, hpack.NeverIndexedHeaderTuple)]
    assert never == [b"authorization", b"cookie"]  # the short cookie only
    assert b"padded" in block and b"Bearer secret-token" in block  # literals, no Huffman
    events = peer.receive_data(data)  # a strict peer accepts the block
    assert any(isinstance(e, h2.events.ResponseReceived) for e in events)


def test_request_te_trailers_is_kept_for_grpc() -> None:
    client = H2Connection(client=True)
    server = H2Connection(client=False)
    client.initiate()
    server.initiate()
    client.open_stream([*REQUEST, ("te", "Trailers")], end_stream=True)
    events = server.receive(client.data_to_send(), 0.0)
    head = next(e for e in events if isinstance(e, RequestHead))
    assert ("te", "Trailers") in head.headers  # kept (any case), as h2 accepts it


def frame_kinds(data: bytes) -> list[tuple[str, int, bool]]:
    """(frame type, payload length, END_STREAM) of every frame in `data`."""
    kinds, view = [], memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        kinds.append((type(frame).__name__, length, "END_STREAM" in frame.flags))
        view = view[9 + length :]
    return kinds


def test_the_rest_of_a_body_ends_the_stream_in_its_last_data_frame() -> None:
    """`send_last`: no empty DATA frame to end the stream (one frame less per unary
    call each way), and it still waits for the peer's window."""
    server, peer = handshake()
    peer.send_headers(1, REQUEST, end_stream=True)
    pump(server, peer)
    server.data_to_send()
    server.send_head(1, [(":status", "200")], end_stream=False)
    server.send_last(1, [b"a" * 10, b"b" * 5])
    assert frame_kinds(server.data_to_send()) == [
        ("HeadersFrame", 1, False),
        ("DataFrame", 10, False),
        ("DataFrame", 5, True),
    ]
    peer.send_headers(3, REQUEST, end_stream=True)
    pump(server, peer)
    server.send_head(3, [(":status", "200")], end_stream=False)
    server.send_last(3, [b"y" * 70_000])
    first = server.data_to_send()
    assert not any(end for _, _, end in frame_kinds(first))  # the window holds the rest
    sent = sum(n for kind, n, _ in frame_kinds(first) if kind == "DataFrame")
    peer.receive_data(first)
    peer.acknowledge_received_data(sent, 3)
    pump(server, peer)
    assert frame_kinds(server.data_to_send())[-1] == ("DataFrame", 70_000 - sent, True)
    with pytest.raises(StreamGone):
        server.send_data(3, b"late")


def test_the_rest_of_a_body_with_trailers_ends_with_them() -> None:
    server, peer = handshake()
    peer.send_headers(1, REQUEST, end_stream=True)
    pump(server, peer)
    server.data_to_send()
    server.send_head(1, [(":status", "200")], end_stream=False)
    server.send_last(1, [b"msg"], [("grpc-status", "0")])
    kinds = frame_kinds(server.data_to_send())
    assert [k[0] for k in kinds] == ["HeadersFrame", "DataFrame", "HeadersFrame"]
    assert [k[2] for k in kinds] == [False, False, True]


def test_many_one_frame_responses_acknowledged_do_not_trip_the_window_update_guard() -> None:
    """A sidecar-to-sidecar connection carries thousands of small answers, each one DATA
    frame ending its stream, each acknowledged by the client (a connection
    WINDOW_UPDATE). The guard counts those last frames too: before, it counted none and
    cut the connection after a few hundred answers (a 503 UC mid-request)."""
    server, peer = handshake()
    for i in range(400):
        stream_id = 1 + 2 * i
        peer.send_headers(stream_id, REQUEST, end_stream=True)
        pump(server, peer)
        server.send_head(stream_id, [(":status", "200")], end_stream=False)
        server.send_last(stream_id, [b"ok"])
        for event in peer.receive_data(server.data_to_send()):
            if isinstance(event, h2.events.DataReceived):
                # a client that acknowledges every frame at once (the stream has
                # ended: the connection's window only)
                peer.increment_flow_control_window(event.flow_controlled_length)
        events = pump(server, peer)
        assert not any(isinstance(e, ConnectionFailed) for e in events), i


def test_a_grpc_client_opening_each_new_streams_window_is_no_flood() -> None:
    """grpcio raises the window of each stream it opens (a WINDOW_UPDATE right after
    the HEADERS, before any answer): 16 calls in flight is 16 updates with no DATA sent
    yet. Envoy's bound counts the streams the peer opened for that."""
    server, peer = handshake()
    for i in range(16):
        stream_id = 1 + 2 * i
        peer.send_headers(stream_id, REQUEST, end_stream=False)
        peer.increment_flow_control_window(4 * 1024 * 1024, stream_id)
        peer.send_data(stream_id, b"\x00\x00\x00\x00\x01x", end_stream=True)
    events = pump(server, peer)
    assert not any(isinstance(e, ConnectionFailed) for e in events)
    assert sum(isinstance(e, RequestHead) for e in events) == 16
