"""The telemetry HTTP API, next to `/healthz`, `/readyz` and `/metrics`. Every page of
the dashboard (`dashboard.py`) reads these; errors are JSON `{"error": ...}`.

- `GET /api/graph?window=60`: nodes and edges (requests/s, success and error rates,
  p50/p90/p99 ms, `mtls`: the share of requests the server side saw over mutual TLS,
  null when it did not report, `grpc_statuses`: gRPC requests by status name) over the
  last `window` seconds.
- `GET /api/events?window=60`: server-sent events; a `graph` event (the same JSON as
  `/api/graph`) now and every two seconds.
- `GET /api/series?kind=workload|service&name=&namespace=default&direction=inbound|outbound
  &window=300`: the chart data of one node in 10 s buckets (`timeseries.py`): requests/s,
  success rate, p50/p90/p99 and response codes per bucket, TCP bytes; totals by
  response code, by response flag and by (code, flag); peers. `window` 60 s to 1 h.
- `GET /api/traces?service=&min_ms=&errors=1&trace_id=&limit=20`: recent traces, newest
  first (`trace_id` matches a prefix of the id).
- `GET /api/traces/<trace_id>`: every span of one trace, assembled as a tree.
- `GET /api/access?service=&status=&flag=&path=&limit=100[&follow=1]`: recent access
  records as JSON (`status` an exact code or a class such as `5xx`); with `follow=1`,
  newline-delimited JSON that keeps streaming new records.
- `GET /api/access/events?service=&status=&flag=&path=&limit=50`: the same as
  server-sent `access` events (the recent ones first, then live).
- `GET /api/instances?service=&namespace=default`: the registry's instances of a service
  (`mesh.registry.get`) with each proxy's config-sync state (`mesh.config.proxystatus`).
- `GET /api/config?kind=`: the resources in force (`mesh.config.get`), by kind, and the
  proxy status of every proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from aiohttp import web

from mesh import errors
from services.telemetry.dashboard import add_dashboard_routes
from services.telemetry.timeseries import Direction, NodeKind, SeriesRing
from services.telemetry.views import (
    AccessEntry,
    AccessFilter,
    AccessLog,
    GraphWindow,
    TraceIndex,
    access_json,
    access_matches,
)

FOLLOW_QUEUE = 1_000
KEEPALIVE_S = 15.0
GRAPH_EVERY_S = 2.0
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_TRACE_PREFIX = re.compile(r"[0-9a-f]{1,32}")
_STATUS = re.compile(r"[1-5][0-9][0-9]|[1-5]xx|0")
_FLAG = re.compile(r"[A-Z]{1,4}|-")
_TOKEN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


class ControlPlaneLookups(Protocol):
    """What the pages ask the rest of the control plane (over the bus)."""

    async def instances(self, namespace: str, service: str) -> dict[str, Any]: ...

    async def config(self, kind: str) -> dict[str, Any]: ...


@dataclass
class Views:
    graph: GraphWindow
    traces: TraceIndex
    access: AccessLog
    series: SeriesRing = field(default_factory=SeriesRing)
    lookups: ControlPlaneLookups | None = None
    # the clock `series` buckets are on (the service samples with the same one)
    clock: Callable[[], float] = field(default=lambda: 0.0)
    # one queue per following client; None tells it to end (service stopping)
    followers: set[asyncio.Queue[AccessEntry | None]] = field(default_factory=set)
    follower_drops: int = 0
    # set when the service stops: the event streams end rather than hold the HTTP
    # server's clean-up until its timeout
    closing: asyncio.Event = field(default_factory=asyncio.Event)

    def add_access(self, entry: AccessEntry) -> None:
        self.access.add(entry)
        for q in self.followers:
            try:
                q.put_nowait(entry)
            except asyncio.QueueFull:
                # a slow follower loses records rather than slowing ingestion
                self.follower_drops += 1

    def close_followers(self) -> None:
        self.closing.set()
        for q in self.followers:
            with contextlib.suppress(asyncio.QueueEmpty):
                while q.full():
                    q.get_nowait()
            q.put_nowait(None)

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[asyncio.Queue[AccessEntry | None]]:
        queue: asyncio.Queue[AccessEntry | None] = asyncio.Queue(FOLLOW_QUEUE)
        self.followers.add(queue)
        try:
            yield queue
        finally:
            self.followers.discard(queue)


def _number(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _bad_request(f"{name}: not a number: {raw!r}") from None
    if not low <= value <= high:
        raise _bad_request(f"{name}: must be within [{low:g}, {high:g}]")
    return value


def _choice(request: web.Request, name: str, choices: tuple[str, ...]) -> str:
    value = request.query.get(name) or choices[0]
    if value not in choices:
        raise _bad_request(f"{name}: one of {', '.join(choices)}, got {value[:40]!r}")
    return value


def _matching(request: web.Request, name: str, pattern: re.Pattern[str], what: str) -> str:
    value = request.query.get(name, "")
    if value and not pattern.fullmatch(value):
        raise _bad_request(f"{name}: {what}, got {value[:40]!r}")
    return value


def _access_filter(request: web.Request) -> AccessFilter:
    path = request.query.get("path", "")
    if len(path) > 1024:
        raise _bad_request("path: at most 1024 characters")
    return AccessFilter(
        service=_matching(request, "service", _TOKEN, "a service name"),
        status=_matching(request, "status", _STATUS, "a status code such as 503, or 5xx"),
        flag=_matching(request, "flag", _FLAG, "one response flag such as UH or FI"),
        path=path,
    )


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _event_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    return resp


async def _ask(call: Awaitable[dict[str, Any]]) -> web.Response:
    try:
        return web.json_response(await call)
    except errors.MeshError as e:
        code = e.code if 400 <= e.code < 600 else 502
        # an unanswered bus request is the control plane being unavailable, not a 500
        if isinstance(e, errors.BusTimeout | errors.NoResponders):
            code = 503
        return web.json_response({"error": str(e)[:500]}, status=code)


def add_api_routes(app: web.Application, views: Views) -> None:
    async def graph(request: web.Request) -> web.Response:
        window = _number(request, "window", 60.0, 1.0, views.graph.max_window_s)
        return web.json_response(views.graph.graph(window))

    async def graph_events(request: web.Request) -> web.StreamResponse:
        window = _number(request, "window", 60.0, 1.0, views.graph.max_window_s)
        resp = await _event_stream(request)
        with contextlib.suppress(ConnectionError):
            while not views.closing.is_set():
                await resp.write(_sse("graph", views.graph.graph(window)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(views.closing.wait(), GRAPH_EVERY_S)
            await resp.write_eof()
        return resp

    async def series(request: web.Request) -> web.Response:
        kind = cast(NodeKind, _choice(request, "kind", ("workload", "service")))
        direction = cast(Direction, _choice(request, "direction", ("inbound", "outbound")))
        name = _matching(request, "name", _TOKEN, "a workload or service name")
        if not name:
            raise _bad_request("name: required")
        namespace = _matching(request, "namespace", _TOKEN, "a namespace") or "default"
        window = _number(request, "window", 300.0, 60.0, views.series.max_window_s)
        return web.json_response(
            views.series.query(kind, name, namespace, direction, window, views.clock())
        )

    async def traces(request: web.Request) -> web.Response:
        limit = int(_number(request, "limit", 20, 1, 1000))
        min_ms = _number(request, "min_ms", 0.0, 0.0, 86_400_000.0)
        trace_id = _matching(request, "trace_id", _TRACE_PREFIX, "hex digits of a trace id")
        found = views.traces.summaries(
            request.query.get("service", ""),
            limit,
            min_duration_ms=min_ms,
            errors_only=request.query.get("errors", "") in ("1", "true"),
            trace_id=trace_id.lower(),
        )
        return web.json_response({"traces": found})

    async def trace(request: web.Request) -> web.Response:
        trace_id = request.match_info["trace_id"].lower()
        if not _TRACE_ID.fullmatch(trace_id):
            return web.json_response({"error": "a trace id is 32 hex digits"}, status=400)
        tree = views.traces.tree(trace_id)
        if tree is None:
            return web.json_response({"error": f"trace {trace_id} not found"}, status=404)
        return web.json_response(tree)

    async def access(request: web.Request) -> web.StreamResponse:
        limit = int(_number(request, "limit", 100, 0, 10_000))
        wanted = _access_filter(request)
        recent = views.access.recent(wanted, limit) if limit else []
        if request.query.get("follow", "") not in ("1", "true"):
            return web.json_response({"records": [access_json(e) for e in recent]})
        resp = web.StreamResponse(
            headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)

        def line(e: AccessEntry) -> bytes:
            return json.dumps(access_json(e)).encode() + b"\n"

        await _follow(resp, recent, wanted, line, b"\n")  # readers skip blank lines
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    async def access_events(request: web.Request) -> web.StreamResponse:
        limit = int(_number(request, "limit", 50, 0, 1000))
        wanted = _access_filter(request)
        recent = views.access.recent(wanted, limit) if limit else []
        resp = await _event_stream(request)
        await _follow(
            resp, recent, wanted, lambda e: _sse("access", access_json(e)), b": keep-alive\n\n"
        )
        return resp

    async def _follow(
        resp: web.StreamResponse,
        recent: list[AccessEntry],
        wanted: AccessFilter,
        encode: Callable[[AccessEntry], bytes],
        keepalive: bytes,
    ) -> None:
        async with views.following() as queue:
            try:
                for e in recent:
                    await resp.write(encode(e))
                while True:
                    try:
                        entry = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except TimeoutError:
                        await resp.write(keepalive)
                        continue
                    if entry is None:
                        break
                    if access_matches(entry, wanted):
                        await resp.write(encode(entry))
            except ConnectionError:
                pass

    async def instances(request: web.Request) -> web.Response:
        service = _matching(request, "service", _TOKEN, "a service name")
        if not service:
            raise _bad_request("service: required")
        namespace = _matching(request, "namespace", _TOKEN, "a namespace") or "default"
        if views.lookups is None:
            return web.json_response({"error": "no control-plane lookups"}, status=503)
        return await _ask(views.lookups.instances(namespace, service))

    async def config(request: web.Request) -> web.Response:
        kind = request.query.get("kind", "")
        if kind and not re.fullmatch(r"[A-Za-z]{1,63}", kind):
            raise _bad_request(f"kind: a resource kind such as VirtualService, got {kind[:40]!r}")
        if views.lookups is None:
            return web.json_response({"error": "no control-plane lookups"}, status=503)
        return await _ask(views.lookups.config(kind))

    add_dashboard_routes(app)
    app.router.add_get("/api/graph", graph)
    app.router.add_get("/api/events", graph_events)
    app.router.add_get("/api/series", series)
    app.router.add_get("/api/traces", traces)
    app.router.add_get("/api/traces/{trace_id}", trace)
    app.router.add_get("/api/access", access)
    app.router.add_get("/api/access/events", access_events)
    app.router.add_get("/api/instances", instances)
    app.router.add_get("/api/config", config)
