"""productpage: the page a shopper sees. `GET /productpage` -> JSON, or HTML with
`?format=html`.

It calls details and reviews by name, through its sidecar (HTTP_PROXY), at the same
time. When either call fails the page is still served (200) and that part says why,
`{"error": <status code or reason>}`, like Istio's "currently unavailable" messages:

    {"product": {...}, "details": {...},
     "reviews": {"version": "v2", "reviews": [...], "ratings": {...}}}
"""

from __future__ import annotations

import asyncio
import html
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

PRODUCT = {
    "id": 0,
    "title": "The Comedy of Errors",
    "description": "Wikipedia Summary: The Comedy of Errors is one of William Shakespeare's "
    "early plays. It is his shortest and one of his most farcical comedies, with a major "
    "part of the humour coming from slapstick and mistaken identity, in addition to puns "
    "and word play.",
}
# like Istio's productpage: a slow dependency costs the shopper 3 s at most
CALL_TIMEOUT = aiohttp.ClientTimeout(total=3)

# headers that tie the outgoing calls to the request being served (user, trace); the
# sidecars read them, but only the app knows which call belongs to which request
FORWARDED_HEADERS = (
    "end-user", "x-request-id", "traceparent", "tracestate", "b3",
    "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags",
)  # fmt: skip

SESSION = web.AppKey("session", aiohttp.ClientSession)


def forwarded(request: web.Request) -> dict[str, str]:
    return {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}


async def call(request: web.Request, url: str) -> dict[str, Any]:
    """GET `url` through the sidecar: its JSON, or `{"error": status or reason}`."""
    try:
        async with request.app[SESSION].get(url, headers=forwarded(request)) as answer:
            if answer.status != 200:
                return {"error": answer.status}
            return dict(await answer.json())
    except TimeoutError:
        return {"error": "timeout"}
    except (aiohttp.ClientError, ValueError) as e:
        return {"error": str(e) or type(e).__name__}


async def productpage(request: web.Request) -> web.Response:
    book_id = PRODUCT["id"]
    details, reviews = await asyncio.gather(
        call(request, f"http://details:9080/details/{book_id}"),
        call(request, f"http://reviews:9080/reviews/{book_id}"),
    )
    page = {"product": PRODUCT, "details": details, "reviews": reviews}
    if request.query.get("format") == "html":
        user = request.headers.get("end-user", "")
        return web.Response(text=render_html(page, user), content_type="text/html")
    return web.json_response(page)


STYLE = """
body { font-family: sans-serif; max-width: 50em; margin: 2em auto }
th { text-align: left; padding-right: 1em }
.error { color: #a00 }
blockquote { border-left: 3px solid #ccc; margin: 1em 0; padding-left: 1em }
"""


def render_html(page: dict[str, Any], user: str) -> str:
    esc = html.escape
    product, details, reviews = page["product"], page["details"], page["reviews"]
    if "error" in details:
        details_html = unavailable("product details", details["error"])
    else:
        rows = (f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in details.items())
        details_html = f"<table>{''.join(rows)}</table>"
    if "error" in reviews:
        reviews_html = unavailable("product reviews", reviews["error"])
    else:
        reviews_html = "".join(render_review(r, reviews) for r in reviews.get("reviews", []))
        reviews_html += f"<p><small>reviews-{esc(reviews.get('version', '?'))}</small></p>"
    greeting = f"<p>Signed in as <b>{esc(user)}</b></p>" if user else ""
    return f"""<!doctype html>
<html><head><meta charset=utf-8><title>{esc(product["title"])} - Bookinfo</title>
<style>{STYLE}</style></head>
<body><h1>{esc(product["title"])}</h1>{greeting}
<p>{esc(product["description"])}</p>
<h2>Book Details</h2>{details_html}
<h2>Book Reviews</h2>{reviews_html}
</body></html>
"""


def unavailable(what: str, error: object) -> str:
    reason = html.escape(str(error))
    return f"<p class=error>Sorry, {what} are currently unavailable ({reason}).</p>"


def render_review(review: dict[str, Any], reviews: dict[str, Any]) -> str:
    esc = html.escape
    text = f"<blockquote><p>{esc(review['text'])}</p><small>{esc(review['reviewer'])}</small>"
    ratings = reviews.get("ratings")
    if ratings is None:  # reviews v1: no stars
        return text + "</blockquote>"
    if "error" in ratings:
        return text + "<p class=error>Ratings service is currently unavailable</p></blockquote>"
    stars = int(ratings.get("ratings", {}).get(review["reviewer"], 0))
    color = esc(reviews.get("color", "black"))
    return text + f'<p style="color:{color}">{"★" * stars}{"☆" * (5 - stars)}</p></blockquote>'


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "Product page is healthy"})


async def client_session(app: web.Application) -> AsyncIterator[None]:
    # trust_env: send requests to HTTP_PROXY, the sidecar's outbound listener
    async with aiohttp.ClientSession(trust_env=True, timeout=CALL_TIMEOUT) as session:
        app[SESSION] = session
        yield


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(client_session)
    app.router.add_get("/productpage", productpage)
    app.router.add_get("/health", health)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "9080")), print=None)
