"""Trace context (pure): W3C `traceparent`/`tracestate` and B3 (multi and single
header) in, both out; `Sampler` (default 1 %, an incoming decision wins);
`start_span(headers, kind, ...) -> (SpanContext, headers_to_forward)`,
`replace_trace_headers`, `finish_span`; `TracePropagator`, what a proxy runs per
request.

Only sampled requests open a span. An unsampled one (99 % at the default rate) opens
none, as Envoy's unsampled requests do not: the caller's context is passed on as it
came (same trace id and parent id, decision "not sampled"), and a request without one
gets a new trace id and parent id, so the decision still travels to the next hops and
the trace id still reaches the access log. No span id to draw, no clock to read.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from mesh.telemetry import Span

Headers = list[tuple[str, str]]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
B3 = "b3"
X_B3_TRACEID = "x-b3-traceid"
X_B3_SPANID = "x-b3-spanid"
X_B3_PARENTSPANID = "x-b3-parentspanid"
X_B3_SAMPLED = "x-b3-sampled"
X_B3_FLAGS = "x-b3-flags"
# every header `replace_trace_headers` removes before adding the forwarded ones
TRACE_HEADERS: frozenset[str] = frozenset(
    {
        TRACEPARENT,
        TRACESTATE,
        B3,
        X_B3_TRACEID,
        X_B3_SPANID,
        X_B3_PARENTSPANID,
        X_B3_SAMPLED,
        X_B3_FLAGS,
    }
)

_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
# what sidecars send: version 00, exactly 55 characters (no groups: sliced instead)
_TRACEPARENT_00 = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_ZERO16 = "0" * 16
_ZERO32 = "0" * 32


class IncomingTrace(NamedTuple):
    """The trace context a request arrived with. Empty `trace_id`: none (or invalid).
    `sampled` None: the sender left the decision to us."""

    trace_id: str = ""
    span_id: str = ""
    sampled: bool | None = None
    tracestate: str = ""
    b3_single: bool = False


NO_TRACE = IncomingTrace()


class SpanContext(NamedTuple):
    """The span a request opened, or for an unsampled request (`sampled` false) just
    the context passed on: `span_id` is then the parent id sent to the next hop (the
    caller's own, when it sent one), with no parent and no start time."""

    trace_id: str
    span_id: str
    parent_span_id: str
    sampled: bool
    kind: str  # "client" | "server"
    name: str
    service: str
    namespace: str
    instance: str
    start_ns: int
    tracestate: str = ""


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """(trace_id, parent_id, sampled) from a W3C `traceparent`, None when invalid."""
    m = _TRACEPARENT_RE.fullmatch(value.strip())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == _ZERO32 or span_id == _ZERO16:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def format_traceparent(trace_id: str, span_id: str, sampled: bool) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def _b3_trace_id(value: str) -> str:
    v = value.strip().lower()
    if _HEX16.fullmatch(v):
        v = _ZERO16 + v  # 64-bit B3 ids are the low half of a W3C id
    if not _HEX32.fullmatch(v) or v == _ZERO32:
        return ""
    return v


def _b3_sampled(value: str) -> bool | None:
    v = value.strip().lower()
    if v in ("1", "true", "d"):
        return True
    if v in ("0", "false"):
        return False
    return None


def parse_b3_single(value: str) -> IncomingTrace | None:
    """`b3: {trace}-{span}[-{1|0|d}[-{parent}]]`, or just `b3: {1|0|d}`."""
    parts = value.strip().lower().split("-")
    if len(parts) == 1:
        sampled = _b3_sampled(parts[0])
        return None if sampled is None else IncomingTrace(sampled=sampled, b3_single=True)
    trace_id = _b3_trace_id(parts[0])
    span_id = parts[1]
    if not trace_id or not _HEX16.fullmatch(span_id) or span_id == _ZERO16:
        return None
    sampled = _b3_sampled(parts[2]) if len(parts) > 2 else None
    return IncomingTrace(trace_id, span_id, sampled, "", True)


def extract_trace(headers: Iterable[tuple[str, str]]) -> IncomingTrace:
    """The incoming context: W3C first, then B3 multi-header, then B3 single-header.
    `b3_single` records whether the sender used the single `b3` header, so it is
    propagated in that form too."""
    found: dict[str, str] = {}
    for name, value in headers:
        n = name.lower()
        if n in TRACE_HEADERS and n not in found:
            found[n] = value
    return incoming_trace(found)


def incoming_trace(found: Mapping[str, str]) -> IncomingTrace:
    """The incoming context from the first value of each trace header present
    (lower-case names), for callers that collect them in their own pass."""
    if not found:
        return NO_TRACE
    trace = _pick_context(found)
    if B3 in found and not trace.b3_single:
        trace = trace._replace(b3_single=True)  # rare: both B3 forms present
    return trace


def _pick_context(found: Mapping[str, str]) -> IncomingTrace:
    tp = found.get(TRACEPARENT)
    if tp is not None:
        parsed = parse_traceparent(tp)
        if parsed is not None:
            return IncomingTrace(parsed[0], parsed[1], parsed[2], found.get(TRACESTATE, "").strip())
    b3_sampled = _b3_sampled(found.get(X_B3_SAMPLED, ""))
    if found.get(X_B3_FLAGS, "").strip() == "1":
        b3_sampled = True
    tid, sid = found.get(X_B3_TRACEID), found.get(X_B3_SPANID)
    if tid is not None and sid is not None:
        trace_id = _b3_trace_id(tid)
        span_id = sid.strip().lower()
        if trace_id and _HEX16.fullmatch(span_id) and span_id != _ZERO16:
            return IncomingTrace(trace_id, span_id, b3_sampled)
    single = found.get(B3)
    if single is not None:
        parsed_single = parse_b3_single(single)
        if parsed_single is not None:
            return parsed_single
    # ids missing or invalid: a sampling decision alone still binds us
    return IncomingTrace(sampled=b3_sampled)


class Sampler:
    """Samples a `rate` fraction of new traces, decided on the trace id so every proxy
    that has to decide about the same trace decides alike."""

    def __init__(self, rate: float = 0.01):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"sampling rate must be within [0, 1], got {rate}")
        self.rate = rate
        self._threshold = int(rate * (1 << 64))

    def decide(self, trace_id: str) -> bool:
        threshold = self._threshold
        if not threshold:  # rate 0
            return False
        return int(trace_id[16:32], 16) < threshold


DEFAULT_SAMPLER = Sampler(0.01)
_rng = random.Random()


def new_trace_id(rng: random.Random | None = None) -> str:
    return f"{(rng or _rng).getrandbits(128) or 1:032x}"


def new_span_id(rng: random.Random | None = None) -> str:
    return f"{(rng or _rng).getrandbits(64) or 1:016x}"


def _new_ids(rng: random.Random) -> tuple[str, str]:
    """A new trace id and span id from one draw of the PRNG."""
    h = f"{rng.getrandbits(192):048x}"
    trace_id, span_id = h[:32], h[32:]
    if trace_id == _ZERO32 or span_id == _ZERO16:  # all-zero ids are invalid
        return new_trace_id(rng), new_span_id(rng)
    return trace_id, span_id


# a NamedTuple's own constructor is a Python function; this builds one from a complete
# tuple of its fields in C, for what runs per request
_new_tuple = tuple.__new__


def _unsampled(
    trace_id: str, span_id: str, kind: str, b3: bool, traceparent: str = ""
) -> tuple[SpanContext, Headers]:
    """The context of a request that opens no span, and what it forwards (what
    `trace_headers` gives for it, built directly). `traceparent`: the incoming one,
    when it is exactly what would be sent."""
    ctx = _new_tuple(SpanContext, (trace_id, span_id, "", False, kind, "", "", "", "", 0, ""))
    header = (TRACEPARENT, traceparent or f"00-{trace_id}-{span_id}-00")
    if not b3:
        return ctx, [header]
    return ctx, [header, (X_B3_TRACEID, trace_id), (X_B3_SPANID, span_id), (X_B3_SAMPLED, "0")]


class TracePropagator:
    """One per proxy: continues the trace of each request through it (`step`).

    The common cases are decided without building an `IncomingTrace`: no trace header
    at all (a new root), and a lone valid `traceparent`; anything else (B3, a
    `tracestate`, an invalid `traceparent`) goes through `continue_trace`.
    """

    __slots__ = ("instance", "namespace", "rng", "sampler", "service")

    def __init__(
        self,
        *,
        service: str,
        namespace: str,
        instance: str,
        sampler: Sampler = DEFAULT_SAMPLER,
        rng: random.Random | None = None,
    ):
        self.service = service
        self.namespace = namespace
        self.instance = instance
        self.sampler = sampler
        self.rng = rng or _rng

    def step(
        self,
        found: Mapping[str, str] | None,
        kind: str,
        *,
        b3: bool = True,
        now_ns: int | None = None,
    ) -> tuple[SpanContext, Headers]:
        """The context for a request that arrived with the trace headers `found` (the
        first value of each, lower-case names; None when it had none) and the trace
        headers to send on. `b3=False`: W3C only (between two sidecars)."""
        if found is None:  # a new root
            trace_id, span_id = _new_ids(self.rng)
            if self.sampler.decide(trace_id):
                return self._open(trace_id, span_id, "", kind, now_ns, b3)
            return _unsampled(trace_id, span_id, kind, b3)
        if len(found) == 1:
            value = found.get(TRACEPARENT)
            if value is not None and _TRACEPARENT_00.fullmatch(value):
                # as one sidecar sends it to the next (the general path checks the same)
                trace_id, parent_id, flags = value[3:35], value[36:52], value[53:55]
                if trace_id != _ZERO32 and parent_id != _ZERO16:
                    if not int(flags, 16) & 1:
                        return _unsampled(trace_id, parent_id, kind, b3, value)
                    return self._open(trace_id, new_span_id(self.rng), parent_id, kind, now_ns, b3)
        return continue_trace(
            incoming_trace(found),
            kind,
            name="",
            service=self.service,
            namespace=self.namespace,
            instance=self.instance,
            sampler=self.sampler,
            now_ns=now_ns,
            rng=self.rng,
            b3=b3,
        )

    def _open(
        self, trace_id: str, span_id: str, parent_id: str, kind: str, now_ns: int | None, b3: bool
    ) -> tuple[SpanContext, Headers]:
        ctx = SpanContext(
            trace_id,
            span_id,
            parent_id,
            True,
            kind,
            "",  # named when it finishes
            self.service,
            self.namespace,
            self.instance,
            time.time_ns() if now_ns is None else now_ns,
        )
        return ctx, trace_headers(ctx, b3=b3)


def start_span(
    headers: Iterable[tuple[str, str]],
    kind: str,
    *,
    name: str,
    service: str,
    namespace: str,
    instance: str,
    sampler: Sampler = DEFAULT_SAMPLER,
    now_ns: int | None = None,
    rng: random.Random | None = None,
) -> tuple[SpanContext, Headers]:
    """Open a span for a request carrying `headers`: a child of the incoming context,
    or the root of a new trace. Returns the context and the trace headers to send on
    (`replace_trace_headers` swaps them in): `traceparent` (+ `tracestate`), the B3
    headers, and `b3` when the request came with the single-header form."""
    return continue_trace(
        extract_trace(headers),
        kind,
        name=name,
        service=service,
        namespace=namespace,
        instance=instance,
        sampler=sampler,
        now_ns=now_ns,
        rng=rng,
    )


def continue_trace(
    incoming: IncomingTrace,
    kind: str,
    *,
    name: str,
    service: str,
    namespace: str,
    instance: str,
    sampler: Sampler = DEFAULT_SAMPLER,
    now_ns: int | None = None,
    rng: random.Random | None = None,
    b3: bool = True,
) -> tuple[SpanContext, Headers]:
    """`start_span` for a context already extracted (`incoming_trace`); `b3=False`
    forwards W3C headers only (between two sidecars, which both read W3C).

    Unsampled, no span is opened: the incoming ids are passed on unchanged (a new
    root still gets ids), and the context has no parent and no start time."""
    trace_id = incoming.trace_id or new_trace_id(rng)
    sampled = incoming.sampled if incoming.sampled is not None else sampler.decide(trace_id)
    continued = bool(incoming.trace_id)
    if not sampled:
        ctx = SpanContext(
            trace_id,
            incoming.span_id if continued else new_span_id(rng),
            "",
            False,
            kind,
            name,
            service,
            namespace,
            instance,
            0,
            incoming.tracestate if continued else "",
        )
        return ctx, trace_headers(ctx, b3_single=incoming.b3_single, b3=b3)
    ctx = SpanContext(
        trace_id,
        new_span_id(rng),
        incoming.span_id if continued else "",
        True,
        kind,
        name,
        service,
        namespace,
        instance,
        time.time_ns() if now_ns is None else now_ns,
        incoming.tracestate if continued else "",
    )
    return ctx, trace_headers(ctx, b3_single=incoming.b3_single, b3=b3)


def trace_headers(ctx: SpanContext, *, b3_single: bool = False, b3: bool = True) -> Headers:
    flag = "1" if ctx.sampled else "0"
    out: Headers = [(TRACEPARENT, format_traceparent(ctx.trace_id, ctx.span_id, ctx.sampled))]
    if ctx.tracestate:
        out.append((TRACESTATE, ctx.tracestate))
    if not b3:
        return out
    out.append((X_B3_TRACEID, ctx.trace_id))
    out.append((X_B3_SPANID, ctx.span_id))
    if ctx.parent_span_id:
        out.append((X_B3_PARENTSPANID, ctx.parent_span_id))
    out.append((X_B3_SAMPLED, flag))
    if b3_single:
        parent = f"-{ctx.parent_span_id}" if ctx.parent_span_id else ""
        out.append((B3, f"{ctx.trace_id}-{ctx.span_id}-{flag}{parent}"))
    return out


def replace_trace_headers(
    headers: Iterable[tuple[str, str]], forward: Sequence[tuple[str, str]]
) -> Headers:
    """`headers` without any incoming trace header, plus `forward`."""
    return [(n, v) for n, v in headers if n.lower() not in TRACE_HEADERS] + list(forward)


def finish_span(
    ctx: SpanContext,
    *,
    status_code: int,
    end_ns: int | None = None,
    error: bool | None = None,
    attributes: dict[str, str] | None = None,
) -> Span | None:
    """The finished span to `record_span`, or None when the trace is not sampled."""
    if not ctx.sampled:
        return None
    return Span(
        trace_id=ctx.trace_id,
        span_id=ctx.span_id,
        parent_span_id=ctx.parent_span_id,
        name=ctx.name,
        kind="server" if ctx.kind == "server" else "client",
        service=ctx.service,
        namespace=ctx.namespace,
        instance=ctx.instance,
        start_ns=ctx.start_ns,
        end_ns=time.time_ns() if end_ns is None else end_ns,
        status_code=status_code,
        error=(status_code == 0 or status_code >= 500) if error is None else error,
        attributes=attributes or {},
    )
