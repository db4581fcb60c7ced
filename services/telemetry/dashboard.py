"""The dashboard: a single page (`static/index.html`) with small ES modules of our own
(`static/*.js`: SVG charts and the service graph, no third-party code, no build step)
that read the JSON API (`api.py`) and its server-sent events.

Pages (hash routes): `#/graph`, `#/workload/<ns>/<name>`, `#/service/<ns>/<name>`,
`#/traces`, `#/trace/<id>`, `#/access`, `#/config`.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).with_name("static")


def add_dashboard_routes(app: web.Application) -> None:
    async def index(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.router.add_get("/", index)
    app.router.add_static("/ui/", STATIC_DIR, show_index=False, follow_symlinks=False)
