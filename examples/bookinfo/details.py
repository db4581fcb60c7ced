"""details: facts about a book. `GET /details/<id>` -> JSON.

Run under a sidecar: `meshctl sidecar --service details --version v1 --app-port 9081
-- python examples/bookinfo/details.py` (the sidecar passes PORT).
"""

from __future__ import annotations

import os

from aiohttp import web


async def details(request: web.Request) -> web.Response:
    book_id = int(request.match_info["id"])
    return web.json_response(
        {
            "id": book_id,
            "author": "William Shakespeare",
            "year": 1595,
            "type": "paperback",
            "pages": 200,
            "publisher": "PublisherA",
            "language": "English",
            "ISBN-10": "1234567890",
            "ISBN-13": "123-1234567890",
        }
    )


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "Details is healthy"})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get(r"/details/{id:\d+}", details)
    app.router.add_get("/health", health)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "9080")), print=None)
