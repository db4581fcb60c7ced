"""reviews: what readers wrote about a book. `GET /reviews/<id>` -> JSON.

One program, three versions (from MESH_VERSION, which the sidecar sets from its
`--version`): v1 shows no stars and calls nobody; v2 (black stars) and v3 (red stars)
call ratings and put its answer, or `{"error": ...}` when the call fails, in `ratings`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

VERSION = os.environ.get("MESH_VERSION", "v1")
STAR_COLOR = {"v2": "black", "v3": "red"}
RATINGS_TIMEOUT = aiohttp.ClientTimeout(total=10)

# headers that tie the call to ratings to the request being served (user, trace);
# the sidecars read them but only the app knows which outgoing call belongs to which
# incoming request, so it must pass them on (Istio's samples do the same)
FORWARDED_HEADERS = (
    "end-user", "x-request-id", "traceparent", "tracestate", "b3",
    "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags",
)  # fmt: skip

SESSION = web.AppKey("session", aiohttp.ClientSession)


def forwarded(request: web.Request) -> dict[str, str]:
    return {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}


async def call_ratings(request: web.Request, book_id: int) -> dict[str, object]:
    session = request.app[SESSION]
    url = f"http://ratings:9080/ratings/{book_id}"
    try:
        async with session.get(url, headers=forwarded(request)) as answer:
            if answer.status != 200:
                return {"error": answer.status}
            return dict(await answer.json())
    except TimeoutError:
        return {"error": "timeout"}
    except (aiohttp.ClientError, ValueError) as e:
        return {"error": str(e) or type(e).__name__}


async def reviews(request: web.Request) -> web.Response:
    book_id = int(request.match_info["id"])
    body: dict[str, object] = {
        "id": book_id,
        "version": VERSION,
        "reviews": [
            {
                "reviewer": "Reviewer1",
                "text": "An extremely entertaining play by Shakespeare. "
                "The slapstick humour is refreshing!",
            },
            {
                "reviewer": "Reviewer2",
                "text": "Absolutely fun and entertaining. "
                "The play lacks thematic depth when compared to other plays by Shakespeare.",
            },
        ],
    }
    if VERSION in STAR_COLOR:
        body["color"] = STAR_COLOR[VERSION]
        body["ratings"] = await call_ratings(request, book_id)
    return web.json_response(body)


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "Reviews is healthy"})


async def client_session(app: web.Application) -> AsyncIterator[None]:
    # trust_env: send requests to HTTP_PROXY, the sidecar's outbound listener
    async with aiohttp.ClientSession(trust_env=True, timeout=RATINGS_TIMEOUT) as session:
        app[SESSION] = session
        yield


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(client_session)
    app.router.add_get(r"/reviews/{id:\d+}", reviews)
    app.router.add_get("/health", health)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "9080")), print=None)
