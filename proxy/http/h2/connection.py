"""A sans-IO HTTP/2 connection for both roles, on the `h2` library.

Bytes in (`receive`) give events (`proxy.http.h2.events`); calls (`send_head`,
`send_data`, `end_stream`, `reset`, `drain`) queue frames; `data_to_send()` hands the
bytes to write. No sockets, no clock of its own (the caller passes `now`), so the
whole behaviour is tested with frame transcripts (tests/unit/test_h2_connection.py).

What this layer adds to `h2`:

- **Flow control with bounded buffers.** Received DATA is acknowledged (WINDOW_UPDATE)
  only when the consumer says it read it (`consumed`), so a slow reader keeps the
  peer's window closed and the peer stops sending: what a stream buffers is bounded
  by its window (`H2Limits.stream_window`), a connection's by `connection_window`.
  Outbound, `send_data` queues what the peer's window does not allow yet and sends it
  as WINDOW_UPDATEs arrive; `outbound_buffered(stream)` lets the shell wait before
  queueing more, so memory stays bounded in that direction too. Trailers and the end
  of a stream wait behind the data queued before them.
- **SETTINGS limits**: at most `max_concurrent_streams` (100) streams at once, a
  header list of at most `max_header_list_size` bytes (decoded size, so an HPACK
  "bomb" of tiny indexed references to a huge entry is refused), and a small dynamic
  table. A header block may span at most 64 CONTINUATION frames of at most 16 KiB
  (h2's `CONTINUATION_BACKLOG`), so a CONTINUATION flood ends the connection instead
  of growing a buffer.
- **Rapid reset (CVE-2023-44487)**: streams the peer opens and resets itself are
  counted per `flood_window_s`; beyond `max_peer_resets` the connection ends with
  GOAWAY ENHANCE_YOUR_CALM. PING and SETTINGS frames are counted the same way
  (`max_control_frames`): their acknowledgements would otherwise queue without bound
  for a peer that never reads. So are frames that carry nothing a request needs in
  bulk: PRIORITY frames of their own (CVE-2019-9513; the priority a HEADERS frame
  carries is not counted) and DATA frames that are empty and do not end their stream
  (CVE-2019-9518). A server accepts at most 5 + 2 * (streams the peer opened +
  `max_window_updates_per_data_frame` * DATA frames it sent) WINDOW_UPDATE frames,
  Envoy's bound: a gRPC client opens each new stream's window before any answer.
- **Graceful drain**: `drain()` sends GOAWAY(NO_ERROR) naming the last stream that
  will be served; streams the peer opens afterwards are refused (REFUSED_STREAM, safe
  for it to retry), the ones already open finish.

h2's errors are mapped here, once: a protocol error ends the connection with GOAWAY
and a `ConnectionFailed` event, never an exception out of `receive`.

Cost (the Python data plane spends about half its CPU per gRPC call in h2 and hpack):
what we receive is validated by h2 in full (it comes from anybody); what we send is
built here from fields already validated on the way in, so h2's outbound
normalization and validation (several generator passes per field) are replaced by one
pass in `_encode` that does what they did for us: names lower-cased, surrounding
whitespace stripped, connection-specific fields dropped, `authorization`,
`proxy-authorization` and short `cookie` fields never indexed (HPACK's CRIME
defence, as h2 and nghttp2 do). Header blocks are sent without Huffman coding
(`_LiteralEncoder`): a few more bytes per new value, less CPU for us and for a peer
that decodes them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
from hyperframe.frame import GoAwayFrame

from .events import (
    ConnectionFailed,
    Data,
    Event,
    GoAway,
    Headers,
    RequestHead,
    ResponseHead,
    SendWindowOpened,
    StreamEnded,
    StreamReset,
    Trailers,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

ENHANCE_YOUR_CALM = int(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
PROTOCOL_ERROR = int(h2.errors.ErrorCodes.PROTOCOL_ERROR)
REFUSED_STREAM = int(h2.errors.ErrorCodes.REFUSED_STREAM)
CANCEL = int(h2.errors.ErrorCodes.CANCEL)
NO_ERROR = int(h2.errors.ErrorCodes.NO_ERROR)
INTERNAL_ERROR = int(h2.errors.ErrorCodes.INTERNAL_ERROR)

_DEFAULT_WINDOW = 65_535


class _LiteralEncoder(hpack.Encoder):
    """HPACK without Huffman coding of literals (h2 cannot be told otherwise)."""

    def encode(self, headers: object, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=False)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class H2Limits:
    """Bounds of one HTTP/2 connection (the defaults are Envoy's where it has one)."""

    max_concurrent_streams: int = 100
    max_header_list_size: int = 60 * 1024
    header_table_size: int = 4096
    stream_window: int = 64 * 1024 - 1
    connection_window: int = 1024 * 1024
    max_frame_size: int = 16 * 1024
    flood_window_s: float = 10.0
    max_peer_resets: int = 200
    max_control_frames: int = 2000
    # WINDOW_UPDATE frames allowed per DATA frame we sent (Envoy's
    # max_inbound_window_update_frames_per_data_frame_sent): each one makes us walk
    # every stream with queued data, so a flood of them is CPU for nothing
    max_window_updates_per_data_frame: int = 10

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"H2Limits.{name} must be a positive number, got {value!r}")
        if not 16_384 <= self.max_frame_size <= 16_777_215:
            raise ValueError("H2Limits.max_frame_size must be within 16384..16777215")


@dataclass(slots=True)
class _Outbound:
    """Body bytes of one stream waiting for the peer's window, and how it ends."""

    chunks: deque[bytes] = field(default_factory=deque)
    buffered: int = 0
    end: bool = False
    trailers: Headers | None = None


class _FloodCounter:
    """Events counted in fixed windows of `window_s` seconds."""

    __slots__ = ("count", "limit", "started", "window_s")

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self.started = 0.0
        self.count = 0

    def hit(self, now: float) -> bool:
        """Count one; True when the limit is exceeded."""
        if now - self.started >= self.window_s:
            self.started = now
            self.count = 0
        self.count += 1
        return self.count > self.limit


class H2Connection:
    """One HTTP/2 connection, `client` or server side."""

    def __init__(self, *, client: bool, limits: H2Limits | None = None) -> None:
        self.client = client
        self.limits = limits = limits or H2Limits()
        config = h2.config.H2Configuration(
            client_side=client,
            header_encoding=None,
            validate_inbound_headers=True,
            # `_encode` does what these did (see the module's docstring)
            normalize_outbound_headers=False,
            validate_outbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        # before any SETTINGS: h2 applies the peer's table size to this encoder
        self._h2.encoder = _LiteralEncoder()
        settings: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            h2.settings.SettingCodes.HEADER_TABLE_SIZE: limits.header_table_size,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
        }
        if client:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self._h2.local_settings = h2.settings.Settings(client=client, initial_values=settings)
        # h2 enforces the decoded size only once our SETTINGS are acknowledged; a
        # peer must not get more room by never acknowledging them
        self._h2.decoder.max_header_list_size = limits.max_header_list_size
        self._h2.decoder.max_allowed_table_size = limits.header_table_size
        self._outbound: dict[int, _Outbound] = {}
        self._extra = bytearray()  # frames h2 cannot send for us (a graceful GOAWAY)
        self._resets = _FloodCounter(limits.max_peer_resets, limits.flood_window_s)
        self._control = _FloodCounter(limits.max_control_frames, limits.flood_window_s)
        self._goaway_sent_last: int | None = None
        self._window_updates = 0
        self._data_frames_sent = 0
        self._peer_streams_opened = 0
        # the priority a request's HEADERS frame carried (h2 reports it as an event too)
        self._head_priority: h2.events.PriorityUpdated | None = None
        self.failed: ConnectionFailed | None = None
        self.goaway_received: GoAway | None = None

    # -- setup and output ------------------------------------------------------------

    def initiate(self) -> None:
        """Queue our preface (client) and SETTINGS, and open the connection window."""
        self._h2.initiate_connection()
        extra = self.limits.connection_window - _DEFAULT_WINDOW
        if extra > 0:
            self._h2.increment_flow_control_window(extra)

    def data_to_send(self) -> bytes:
        data = self._h2.data_to_send()
        if self._extra:
            data = bytes(self._extra) + data
            self._extra.clear()
        return data

    # -- state -------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """Neither side ended the connection."""
        return self.failed is None and self.goaway_received is None and not self.draining

    @property
    def draining(self) -> bool:
        return self._goaway_sent_last is not None

    @property
    def can_open_stream(self) -> bool:
        """Client: one more stream fits under the peer's MAX_CONCURRENT_STREAMS."""
        h2c = self._h2
        return self.open and (
            h2c.open_outbound_streams < h2c.remote_settings.max_concurrent_streams
        )

    @property
    def open_streams(self) -> int:
        return int(self._h2.open_inbound_streams + self._h2.open_outbound_streams)

    def outbound_buffered(self, stream_id: int) -> int:
        """Body bytes queued on the stream, waiting for the peer's window."""
        pending = self._outbound.get(stream_id)
        return pending.buffered if pending is not None else 0

    # -- receiving ---------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes read from the peer; the events they complete, in order."""
        if self.failed is not None:
            return []
        try:
            raw = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as error:
            code = int(getattr(error, "error_code", PROTOCOL_ERROR))
            # h2's message names the rule broken, never header values
            return [self._fail(code, f"protocol error: {type(error).__name__}")]
        events: list[Event] = []
        for event in raw:
            out = self._translate(event, now)
            if out is not None:
                events.append(out)
                if isinstance(out, ConnectionFailed):
                    break
        self._flush_all(events)
        return events

    def _translate(self, event: h2.events.Event, now: float) -> Event | None:
        h2e = h2.events
        if isinstance(event, h2e.DataReceived):
            stream_id = event.stream_id or 0
            data = event.data or b""
            flow = event.flow_controlled_length or 0
            if flow > len(data):
                # padding is never read by anybody: give its window back at once
                self._acknowledge(flow - len(data), stream_id)
                flow = len(data)
            end = event.stream_ended is not None
            if not data and not flow and not end and self._control.hit(now):
                return self._fail(ENHANCE_YOUR_CALM, "too many empty DATA frames")
            return Data(stream_id, data, flow, end)
        if isinstance(event, h2e.RequestReceived):
            stream_id = event.stream_id or 0
            if self._goaway_sent_last is not None and stream_id > self._goaway_sent_last:
                self._h2.reset_stream(stream_id, REFUSED_STREAM)
                return None
            self._head_priority = event.priority_updated
            self._peer_streams_opened += 1
            return RequestHead(stream_id, _decode(event.headers), event.stream_ended is not None)
        if isinstance(event, h2e.ResponseReceived):
            headers = _decode(event.headers)
            status = _status_of(headers)
            return ResponseHead(
                event.stream_id or 0, status, headers, event.stream_ended is not None
            )
        if isinstance(event, h2e.TrailersReceived):
            return Trailers(event.stream_id or 0, _decode(event.headers))
        if isinstance(event, h2e.StreamEnded):
            return StreamEnded(event.stream_id or 0)
        if isinstance(event, h2e.StreamReset):
            stream_id = event.stream_id or 0
            self._outbound.pop(stream_id, None)
            remote = bool(event.remote_reset)
            if remote and not self.client and self._resets.hit(now):
                return self._fail(ENHANCE_YOUR_CALM, "too many streams reset by the peer")
            return StreamReset(stream_id, int(event.error_code or 0), remote)
        if isinstance(event, h2e.WindowUpdated):
            self._window_updates += 1
            # Envoy's bound (protocol_constraints.cc): a client may open each stream's
            # window (gRPC does, before any answer) and acknowledge each DATA frame
            allowed = 5 + 2 * (
                self._peer_streams_opened
                + self.limits.max_window_updates_per_data_frame * self._data_frames_sent
            )
            if not self.client and self._window_updates > allowed:
                return self._fail(ENHANCE_YOUR_CALM, "too many WINDOW_UPDATE frames")
            return SendWindowOpened(event.stream_id or 0)
        if isinstance(event, h2e.RemoteSettingsChanged | h2e.PingReceived):
            if self._control.hit(now):
                return self._fail(ENHANCE_YOUR_CALM, "too many PING or SETTINGS frames")
            if isinstance(event, h2e.RemoteSettingsChanged):
                return SendWindowOpened(0)  # the initial window may have grown
            return None
        if isinstance(event, h2e.PriorityUpdated):
            if event is not self._head_priority and self._control.hit(now):
                return self._fail(ENHANCE_YOUR_CALM, "too many PRIORITY frames")
            return None
        if isinstance(event, h2e.ConnectionTerminated):
            gone = GoAway(int(event.last_stream_id or 0), int(event.error_code or 0))
            self.goaway_received = gone
            return gone
        # SettingsAcknowledged, PingAckReceived,
        # InformationalResponseReceived (1xx: the final head follows), ...
        return None

    def _fail(self, code: int, reason: str) -> ConnectionFailed:
        self._h2.close_connection(error_code=code)
        self._outbound.clear()
        self.failed = ConnectionFailed(code, reason)
        return self.failed

    def consumed(self, stream_id: int, size: int) -> None:
        """The consumer read `size` flow-controlled bytes of `stream_id`: re-open that
        much of the peer's window (h2 batches the WINDOW_UPDATEs)."""
        if size > 0 and self.failed is None:
            self._acknowledge(size, stream_id)

    def _acknowledge(self, size: int, stream_id: int) -> None:
        try:
            self._h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            # the connection is closed already: nothing to re-open
            pass

    # -- sending -----------------------------------------------------------------------

    def open_stream(self, headers: Headers, *, end_stream: bool) -> int:
        """Client: start a request; its stream id."""
        stream_id = int(self._h2.get_next_available_stream_id())
        self._h2.send_headers(stream_id, _encode(headers), end_stream=end_stream)
        if not end_stream:
            self._outbound[stream_id] = _Outbound()
        return stream_id

    def send_head(self, stream_id: int, headers: Headers, *, end_stream: bool) -> None:
        """Server: the response head (`:status` first)."""
        self._h2.send_headers(stream_id, _encode(headers), end_stream=end_stream)
        if not end_stream:
            self._outbound[stream_id] = _Outbound()

    def send_data(self, stream_id: int, data: bytes) -> None:
        """Queue body bytes; they leave as the peer's windows allow."""
        pending = self._outbound.get(stream_id)
        if pending is None or pending.end:
            raise StreamGone(stream_id)
        if data:
            pending.chunks.append(data)
            pending.buffered += len(data)
            self._flush(stream_id, pending)

    def send_last(
        self, stream_id: int, chunks: list[bytes], trailers: Headers | None = None
    ) -> None:
        """The rest of the body and the end of the stream at once: the last DATA frame
        carries END_STREAM (no empty DATA frame after it) unless trailers follow."""
        pending = self._outbound.get(stream_id)
        if pending is None or pending.end:
            raise StreamGone(stream_id)
        for data in chunks:
            if data:
                pending.chunks.append(data)
                pending.buffered += len(data)
        pending.end = True
        pending.trailers = trailers or None
        self._flush(stream_id, pending)

    def end_stream(self, stream_id: int, trailers: Headers | None = None) -> None:
        """End our side of the stream, with trailers if any, after the queued data."""
        pending = self._outbound.get(stream_id)
        if pending is None or pending.end:
            raise StreamGone(stream_id)
        pending.end = True
        pending.trailers = trailers or None
        self._flush(stream_id, pending)

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        """Abandon a stream (RST_STREAM); nothing more is sent or expected on it."""
        self._outbound.pop(stream_id, None)
        if self.failed is not None:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.ProtocolError:
            pass  # already closed both ways

    def drain(self) -> None:
        """Graceful shutdown: GOAWAY(NO_ERROR) naming the last stream we will serve."""
        if self._goaway_sent_last is not None or self.failed is not None:
            return
        last = int(self._h2.highest_inbound_stream_id)
        self._goaway_sent_last = last
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = NO_ERROR
        # after what h2 queued already (its SETTINGS must stay the first frame)
        self._extra += self._h2.data_to_send()
        self._extra += frame.serialize()

    def ping(self) -> None:
        self._h2.ping(b"meshwork")

    def _flush_all(self, events: list[Event]) -> None:
        if not self._outbound or self.failed is not None:
            return
        if any(isinstance(e, SendWindowOpened) for e in events):
            for stream_id, pending in list(self._outbound.items()):
                self._flush(stream_id, pending)

    def _flush(self, stream_id: int, pending: _Outbound) -> None:
        h2c = self._h2
        chunks = pending.chunks
        try:
            while chunks:
                window = min(h2c.local_flow_control_window(stream_id), h2c.max_outbound_frame_size)
                if window <= 0:
                    return
                chunk = chunks[0]
                if len(chunk) <= window:
                    chunks.popleft()
                else:
                    chunks[0] = chunk[window:]
                    chunk = chunk[:window]
                pending.buffered -= len(chunk)
                # every DATA frame counts, the last one too: the WINDOW_UPDATE flood
                # guard allows so many per frame sent (a body of one frame is the
                # common case; not counting it cut long-lived connections)
                self._data_frames_sent += 1
                if not chunks and pending.end and not pending.trailers:
                    del self._outbound[stream_id]
                    h2c.send_data(stream_id, chunk, end_stream=True)
                    return
                h2c.send_data(stream_id, chunk)
            if pending.end:
                del self._outbound[stream_id]
                if pending.trailers:
                    h2c.send_headers(stream_id, _encode(pending.trailers), end_stream=True)
                else:
                    h2c.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            # the peer reset it meanwhile: what was queued has nowhere to go
            self._outbound.pop(stream_id, None)


class StreamGone(Exception):
    """Sending on a stream that was reset, ended, or never opened."""

    def __init__(self, stream_id: int) -> None:
        super().__init__(f"HTTP/2 stream {stream_id} is closed")
        self.stream_id = stream_id


def _decode(headers: object) -> Headers:
    out: Headers = []
    for name, value in headers:  # type: ignore[attr-defined]
        out.append(
            (
                name.decode("latin-1") if isinstance(name, bytes) else name,
                value.decode("latin-1") if isinstance(value, bytes) else value,
            )
        )
    return out


# RFC 9113 §8.2.2: never sent over HTTP/2 (h2's normalization dropped them too)
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
)
_NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization"})


def _encode(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Fields as h2 sends them: lower-case names, stripped values, no connection-specific
    fields (`te` only as "trailers"), credentials kept out of the HPACK tables."""
    out: list[tuple[bytes, bytes]] = []
    for n, v in headers:
        name = n.strip().lower().encode("latin-1")
        value = v.strip().encode("latin-1")
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value.lower() != b"trailers"):
            continue
        if name in _NEVER_INDEXED or (name == b"cookie" and len(value) < 20):
            out.append(hpack.NeverIndexedHeaderTuple(name, value))
        else:
            out.append((name, value))
    return out


def _status_of(headers: Headers) -> int:
    for name, value in headers:
        if name == ":status":
            return int(value) if value.isdigit() else 0
    return 0
