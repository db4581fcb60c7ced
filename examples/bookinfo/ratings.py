"""ratings: the stars each reviewer gave a book. `GET /ratings/<id>` -> JSON.

Called by reviews v2 and v3 only; v1 shows no stars.
"""

from __future__ import annotations

import os

from aiohttp import web


async def ratings(request: web.Request) -> web.Response:
    book_id = int(request.match_info["id"])
    return web.json_response({"id": book_id, "ratings": {"Reviewer1": 5, "Reviewer2": 4}})


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "Ratings is healthy"})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get(r"/ratings/{id:\d+}", ratings)
    app.router.add_get("/health", health)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "9080")), print=None)
