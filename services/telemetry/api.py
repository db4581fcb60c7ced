"""The telemetry HTTP API, next to `/healthz`, `/readyz` and `/metrics`:

- `GET /api/graph?window=60`: nodes and edges (requests/s, success and error rates,
  p50/p90/p99 ms) over the last `window` seconds.
- `GET /api/traces?service=&limit=20`: recent traces, newest first.
- `GET /api/traces/<trace_id>`: every span of one trace, assembled as a tree.
- `GET /api/access?service=&limit=100[&follow=1]`: recent access records as JSON; with
  `follow=1`, newline-delimited JSON that keeps streaming new records.
- `GET /`: a dashboard listing the edges, refreshing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass, field

from aiohttp import web

from services.telemetry.dashboard import DASHBOARD_HTML
from services.telemetry.views import (
    AccessEntry,
    AccessLog,
    GraphWindow,
    TraceIndex,
    access_json,
    access_matches,
)

FOLLOW_QUEUE = 1_000
KEEPALIVE_S = 15.0
_TRACE_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class Views:
    graph: GraphWindow
    traces: TraceIndex
    access: AccessLog
    # one queue per `follow=1` client; None tells it to end (service stopping)
    followers: set[asyncio.Queue[AccessEntry | None]] = field(default_factory=set)
    follower_drops: int = 0

    def add_access(self, entry: AccessEntry) -> None:
        self.access.add(entry)
        for q in self.followers:
            try:
                q.put_nowait(entry)
            except asyncio.QueueFull:
                # a slow follower loses records rather than slowing ingestion
                self.follower_drops += 1

    def close_followers(self) -> None:
        for q in self.followers:
            with contextlib.suppress(asyncio.QueueEmpty):
                while q.full():
                    q.get_nowait()
            q.put_nowait(None)


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


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def add_api_routes(app: web.Application, views: Views) -> None:
    async def graph(request: web.Request) -> web.Response:
        window = _number(request, "window", 60.0, 1.0, views.graph.max_window_s)
        return web.json_response(views.graph.graph(window))

    async def traces(request: web.Request) -> web.Response:
        limit = int(_number(request, "limit", 20, 1, 1000))
        service = request.query.get("service", "")
        return web.json_response({"traces": views.traces.summaries(service, limit)})

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
        service = request.query.get("service", "")
        recent = views.access.recent(service, limit) if limit else []
        if request.query.get("follow", "") not in ("1", "true"):
            return web.json_response({"records": [access_json(e) for e in recent]})
        resp = web.StreamResponse(
            headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        queue: asyncio.Queue[AccessEntry | None] = asyncio.Queue(FOLLOW_QUEUE)
        views.followers.add(queue)
        try:
            for e in recent:
                await resp.write(json.dumps(access_json(e)).encode() + b"\n")
            while True:
                try:
                    entry = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    await resp.write(b"\n")  # keep-alive; readers skip blank lines
                    continue
                if entry is None:
                    break
                if access_matches(entry, service):
                    await resp.write(json.dumps(access_json(entry)).encode() + b"\n")
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            views.followers.discard(queue)
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    async def dashboard(_request: web.Request) -> web.Response:
        return web.Response(text=DASHBOARD_HTML, content_type="text/html")

    app.router.add_get("/", dashboard)
    app.router.add_get("/api/graph", graph)
    app.router.add_get("/api/traces", traces)
    app.router.add_get("/api/traces/{trace_id}", trace)
    app.router.add_get("/api/access", access)
