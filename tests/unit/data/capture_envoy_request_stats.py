"""Regenerates `envoy_request_stats.txt`: a real Envoy's admin
`/stats?format=prometheus&usedonly&filter=^meshwork\\.` after a known set of requests,
with the stats access logger exactly as `proxy.envoy.translate.access_log` emits it
(golden input of `tests/unit/test_envoy_request_stats.py`).

Run from the repository root (needs the envoy binary of the venv, free ports 19911-19914):
    PYTHONPATH=$PWD .venv/bin/python tests/unit/data/capture_envoy_request_stats.py

An `outbound` listener routes to the cluster `outbound|8080||reviews.default.svc.cluster.local`
(a direct-response backend listener) and to a cluster with no listening endpoint (UF);
an `inbound` listener moves `x-meshwork-peer` into metadata as the inbound HCM does.
The requests sent are listed in `REQUESTS`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from proxy.envoy.access_log_convert import peer_metadata_filter
from proxy.envoy.bootstrap import request_stats_config
from proxy.envoy.process import find_envoy
from proxy.envoy.translate.access_log import stats_access_log

ADMIN, OUTBOUND, INBOUND, BACKEND = 19911, 19912, 19913, 19914
REVIEWS = "outbound|8080||reviews.default.svc.cluster.local"
DEAD = "outbound|8080||ratings.default.svc.cluster.local"
PEER = "workload=productpage-v1;namespace=default;app=productpage;version=v1"
OUT = Path(__file__).with_name("envoy_request_stats.txt")

# (listener port, path, headers, body)
REQUESTS: list[tuple[int, str, dict[str, str], bytes]] = [
    *[(OUTBOUND, "/ok", {"host": "reviews:8080"}, b"") for _ in range(5)],
    (OUTBOUND, "/ok", {"host": "reviews:8080"}, b"x" * 200),
    (OUTBOUND, "/unavailable", {"host": "reviews:8080"}, b""),
    (OUTBOUND, "/grpc", {"host": "reviews:8080", "content-type": "application/grpc"}, b""),
    (OUTBOUND, "/", {"host": "ratings:8080"}, b""),
    *[(INBOUND, "/ok", {"host": "reviews:8080", "x-meshwork-peer": PEER}, b"") for _ in range(3)],
]


def _route(prefix: str, cluster: str) -> dict[str, Any]:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster}}


def _hcm(
    log_name: str,
    routes: list[dict[str, Any]],
    filters: list[Any],
    dead_routes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    vhosts = [{"name": "all", "domains": ["*"], "routes": routes}]
    if dead_routes:
        vhosts.insert(0, {"name": "ratings", "domains": ["ratings:8080"], "routes": dead_routes})
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": log_name,
            "access_log": [stats_access_log(log_name)] if log_name != "backend" else [],
            "route_config": {"virtual_hosts": vhosts},
            "http_filters": [
                *filters,
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                    },
                },
            ],
        },
    }


def _listener(name: str, port: int, hcm: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [hcm]}],
    }


def _cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def bootstrap() -> dict[str, Any]:
    backend_routes = [
        {"match": {"prefix": "/unavailable"}, "direct_response": {"status": 503}},
        {
            "match": {"prefix": "/grpc"},
            "direct_response": {"status": 200},
            "response_headers_to_add": [
                {"header": {"key": "grpc-status", "value": "14"}},
                {"header": {"key": "content-type", "value": "application/grpc"}},
            ],
        },
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": "hello world"}},
        },
    ]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN}}},
        "stats_config": request_stats_config(),
        "stats_flush_on_admin": True,
        "static_resources": {
            "listeners": [
                _listener(
                    "outbound",
                    OUTBOUND,
                    _hcm("outbound", [_route("/", REVIEWS)], [], [_route("/", DEAD)]),
                ),
                _listener(
                    "inbound",
                    INBOUND,
                    _hcm("inbound", [_route("/", "inbound|8080||")], [peer_metadata_filter()]),
                ),
                _listener("backend", BACKEND, _hcm("backend", backend_routes, [])),
            ],
            "clusters": [
                _cluster(REVIEWS, BACKEND),
                _cluster("inbound|8080||", BACKEND),
                # nothing listens on port 1: connection refused (UF)
                _cluster(DEAD, 1),
            ],
        },
    }


def _send(port: int, path: str, headers: dict[str, str], body: bytes) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body or None,
        headers=headers,
        method="POST" if body else "GET",
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()
    except urllib.error.HTTPError as e:
        e.read()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bootstrap.json"
        config.write_text(json.dumps(bootstrap()))
        envoy = subprocess.Popen(
            [str(find_envoy()), "-c", str(config), "--log-level", "error"],
        )
        try:
            for _ in range(100):
                if envoy.poll() is not None:
                    raise SystemExit(f"envoy exited: {envoy.returncode}")
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/ready", timeout=1).read()
                    break
                except OSError:
                    time.sleep(0.1)
            for port, path, headers, body in REQUESTS:
                _send(port, path, headers, body)
            url = (
                f"http://127.0.0.1:{ADMIN}/stats?format=prometheus&usedonly&filter=%5Emeshwork%5C."
            )
            # histograms merge after the admin call that flushes them: read twice
            urllib.request.urlopen(url, timeout=5).read()
            time.sleep(0.5)
            OUT.write_bytes(urllib.request.urlopen(url, timeout=5).read())
        finally:
            envoy.terminate()
            envoy.wait(timeout=10)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
