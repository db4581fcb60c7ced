"""CONNECT on the app's outbound listener: what a gRPC client given the sidecar's
`http_proxy` sends (`CONNECT reviews.default:9080`) before speaking h2c through it.

The Python outbound answers such a CONNECT itself and serves the tunnelled connection
as HTTP (`proxy.outbound`), so each call in it is routed, retried, authorized and
counted like any other request. Envoy does the same in two steps: the outbound route
configuration gives every known service's virtual host a `connect_matcher` route that
terminates the CONNECT (answers 200) and sends the tunnelled bytes to the cluster
`outbound_tunnel`, whose one endpoint is the internal listener `outbound_tunnel`
(Envoy's internal listeners, `envoy.bootstrap.internal_listener` in the bootstrap). That
listener runs an HCM on the same `outbound_http` route configuration, so the calls
inside the tunnel take exactly the routes a plain request takes. A CONNECT to a host
that is no mesh service matches no route: 404 `NR`, as in Python. The CONNECT itself is
not a request of its own in telemetry (left out of the access log), as in Python.
"""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2

from .protos import Json, duration, parse

TUNNEL = "outbound_tunnel"  # the cluster and the internal listener it reaches
CONNECT_TIMEOUT_MS = 1_000

CONNECT_ROUTE: Json = {
    "name": "connect",
    "match": {"connectMatcher": {}},
    "route": {
        "cluster": TUNNEL,
        "timeout": "0s",  # a tunnel lives as long as the client keeps it
        "upgradeConfigs": [{"upgradeType": "CONNECT", "connectConfig": {}}],
    },
}
CONNECT_UPGRADE: Json = {"upgradeType": "CONNECT"}
NOT_CONNECT: Json = {
    "headerFilter": {
        "header": {"name": ":method", "stringMatch": {"exact": "CONNECT"}, "invertMatch": True}
    }
}


def accepting_connect(hcm: Json) -> Json:
    """The outbound HCM `hcm` (as `listeners.http_connection_manager` builds it)
    accepting CONNECT, and logging every request but the CONNECT itself."""
    body = dict(hcm["typedConfig"])
    body["upgradeConfigs"] = [*body.get("upgradeConfigs", []), CONNECT_UPGRADE]
    if "accessLog" in body:
        body["accessLog"] = [_not_connect(log) for log in body["accessLog"]]
    return {**hcm, "typedConfig": body}


def _not_connect(log: Json) -> Json:
    """`log` skipping CONNECT, and still applying its own filter (the stats mode's
    sampled-or-failed filter on the gRPC log, docs/architecture.md §7)."""
    own = log.get("filter")
    if own is None:
        return {**log, "filter": NOT_CONNECT}
    return {**log, "filter": {"andFilter": {"filters": [NOT_CONNECT, own]}}}


def tunnel_listener(hcm: Json) -> listener_pb2.Listener:
    """The internal listener serving tunnelled connections with `hcm`."""
    body: dict[str, Any] = {
        "name": TUNNEL,
        "internalListener": {},
        "filterChains": [{"filters": [hcm]}],
        "trafficDirection": "OUTBOUND",
    }
    return parse(listener_pb2.Listener, body)  # type: ignore[return-value]


def tunnel_cluster() -> cluster_pb2.Cluster:
    body: Json = {
        "name": TUNNEL,
        "type": "STATIC",
        "connectTimeout": duration(CONNECT_TIMEOUT_MS),
        "loadAssignment": {
            "clusterName": TUNNEL,
            "endpoints": [
                {
                    "lbEndpoints": [
                        {
                            "endpoint": {
                                "address": {"envoyInternalAddress": {"serverListenerName": TUNNEL}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    return parse(cluster_pb2.Cluster, body)  # type: ignore[return-value]
