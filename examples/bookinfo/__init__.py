"""Bookinfo, the classic four-service shop from Istio's samples, as small aiohttp apps.

    productpage -> details
                -> reviews (v1: no stars; v2: black stars; v3: red stars) -> ratings

Each module is one service, runnable as `python -m examples.bookinfo.<service>` or by
path. It listens on 127.0.0.1:$PORT and, like an app in any mesh, calls the other
services by name through its sidecar (`HTTP_PROXY`, set by `meshctl sidecar`), passing
on the headers that tie a request to a user and a trace. `meshctl up --demo` runs them
all, each behind its own sidecar, with an ingress gateway in front.
"""
