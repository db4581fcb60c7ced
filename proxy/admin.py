"""The admin listener: `/ready`, `/stats/prometheus`, `/config_dump`, `/clusters`, `/certs`.

`/clusters` lists, per destination and subset (one Envoy cluster each; and per TCP
port its relays used, `tcp_port`), the endpoints
in rotation with, when the DestinationRule sets `outlierDetection`, each one's
ejection state (`outlier`: ejected, until when, how often), and the cluster's circuit
breaker thresholds, counts and overflows, retry budget and retry/timeout counters.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from proxy.destinations import DestinationCache
from proxy.stats import ProxyStats

AdminRoute = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminServer:
    def __init__(
        self,
        *,
        ready: Callable[[], bool],
        stats: ProxyStats,
        cache: Callable[[], DestinationCache | None],
        info: Callable[[], dict[str, Any]],
        extra_metrics: Callable[[], bytes] | None = None,
        certs: Callable[[], dict[str, Any] | None] | None = None,
        mirrors: Callable[[], dict[str, Any] | None] | None = None,
        overrides: Mapping[str, AdminRoute] | None = None,
    ):
        self.ready = ready
        self.stats = stats
        self.cache = cache
        self.info = info
        self.extra_metrics = extra_metrics
        self.certs = certs
        self.mirrors = mirrors
        # paths the data plane serves itself (Envoy's own config dump and stats)
        self.overrides = dict(overrides or {})
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        app = web.Application()
        routes: dict[str, AdminRoute] = {
            "/ready": self._ready,
            "/stats/prometheus": self._stats,
            "/config_dump": self._config_dump,
            "/clusters": self._clusters,
            "/certs": self._certs,
        }
        for path, handler in {**routes, **self.overrides}.items():
            app.router.add_get(path, handler)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        server: Any = site._server
        self.port = server.sockets[0].getsockname()[1] if server and server.sockets else port
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _ready(self, _r: web.Request) -> web.Response:
        if self.ready():
            return web.Response(text="LIVE\n")
        return web.Response(text="NOT READY\n", status=503)

    async def _stats(self, _r: web.Request) -> web.Response:
        cache = self.cache()
        self.stats.destinations.set(len(cache.destinations) if cache else 0)
        body = generate_latest(self.stats.registry)
        if self.extra_metrics is not None:
            body += self.extra_metrics()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _config_dump(self, _r: web.Request) -> web.Response:
        cache = self.cache()
        return web.json_response({**self.info(), "destinations": cache.dump() if cache else {}})

    async def _certs(self, _r: web.Request) -> web.Response:
        """The workload certificate: chain, SPIFFE ID, serial, dates, next renewal
        (never the key). 404 when the sidecar runs without mTLS."""
        info = self.certs() if self.certs is not None else None
        if info is None:
            return web.json_response({"error": "this proxy runs without mTLS"}, status=404)
        return web.json_response(info)

    async def _clusters(self, _r: web.Request) -> web.Response:
        clusters: list[dict[str, Any]] = []
        cache = self.cache()
        mirrors = self.mirrors() if self.mirrors is not None else None
        out: dict[str, Any] = {"clusters": clusters}
        if mirrors is not None:
            out["mirrors"] = mirrors
        if cache is None:
            return web.json_response(out)
        now = time.monotonic()
        for ref, dest in sorted(cache.destinations.items()):
            eps = dest.endpoints.endpoints if dest.endpoints else []
            subsets: list[tuple[str, int]] = [("", 0)] + [
                (s.name, 0) for s in (dest.table.subsets if dest.table else ())
            ]
            # the TCP clusters relays have used (`<subset>|tcp:<port>`)
            for key in sorted(k for k in dest.clusters if "|tcp:" in k):
                name, _sep, port_text = key.partition("|tcp:")
                subsets.append((name, int(port_text)))
            for subset, tcp_port in subsets:
                if tcp_port:
                    cluster = dest.tcp_cluster(subset, cache.rand, tcp_port)
                else:
                    cluster = dest.cluster(subset, cache.rand)
                balancer = cluster.balancer if cluster is not None else None
                members = (
                    {e.instance for e in balancer.endpoints} if balancer is not None else set()
                )
                active = getattr(balancer, "active_requests", None)
                state = cluster.snapshot(now) if cluster is not None else {}
                health = state.pop("endpoint_health", {})
                clusters.append(
                    {
                        "destination": str(ref),
                        "subset": subset,
                        # a TCP relay's cluster: the port its relays connect to
                        **({"tcp_port": tcp_port} if tcp_port else {}),
                        "load_balancer": type(balancer).__name__ if balancer else None,
                        **state,
                        "endpoints": [
                            {
                                "instance": e.instance,
                                "address": e.address,
                                "version": e.version,
                                "health": e.status,
                                "in_rotation": e.instance in members
                                and not (health.get(e.instance) or {}).get("ejected"),
                                "active_requests": active(e.instance) if active else 0,
                                "outlier": health.get(e.instance),
                            }
                            for e in eps
                            if e.instance in members or not subset
                        ],
                    }
                )
        return web.json_response(out)
