"""The capture listener of an intercepted app on Envoy (docs/architecture.md §5.4):
where the interception rules redirect the app's outbound TCP, as Istio's
`virtualOutbound` listener (15001) receives it.

Listener filters: `original_dst` (the connection's local address becomes the original
destination, from `SO_ORIGINAL_DST`) and `http_inspector` (HTTP/1.x or h2c prior
knowledge), bounded by the same detection timeout as the Python capture listener.
A connection to a service's virtual IP on one of its TCP ports (a filter chain per
virtual IP and port, matched before the protocol) is relayed to the service's TCP
listeners (`outbound|<port>||<fqdn>`, as `--tcp-upstream`); other HTTP goes to the
outbound HTTP route configuration (`outbound_http`, routed by Host or `:authority`,
exactly as the HTTP_PROXY listener); anything else is refused (REGISTRY_ONLY:
`BlackHoleCluster`, Istio's name). Not yet on Envoy: raw-IP HTTP to an instance,
ALLOW_ANY passthrough (§5.3).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2

from proxy.envoy.resources import XdsResources
from proxy.intercept.detect import DETECT_TIMEOUT_S

from . import listeners, tcp
from .model import MeshView, ProxyNode
from .names import OUTBOUND_HTTP_ROUTE
from .protos import HTTP_INSPECTOR, ORIGINAL_DST, Json, parse, typed

CAPTURE_LISTENER = "virtual_outbound"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
HTTP_PROTOCOLS = ["http/1.0", "http/1.1", "h2c"]


def blackhole_cluster() -> cluster_pb2.Cluster:
    """A cluster with no endpoints: connections sent there are closed at once."""
    return parse(  # type: ignore[return-value]
        cluster_pb2.Cluster,
        {
            "name": BLACKHOLE_CLUSTER,
            "type": "STATIC",
            "connectTimeout": "1s",
            "loadAssignment": {"clusterName": BLACKHOLE_CLUSTER},
        },
    )


def tcp_chains(node: ProxyNode, view: MeshView, out: XdsResources) -> list[Json]:
    """A filter chain per (virtual IP, TCP port) of the services followed."""
    chains: list[Json] = []
    for fqdn, vip in sorted(view.vips.items()):
        _, endpoint_set = view.destinations.get(fqdn, (None, None))
        ports = sorted(
            {
                int(port)
                for ep in (endpoint_set.endpoints if endpoint_set is not None else [])
                for port in ep.tcp_listeners
            }
        )
        for port in ports:
            cluster = tcp.add_tcp_cluster(view, fqdn, port, out)
            chains.append(
                {
                    "name": f"capture_tcp|{port}|{fqdn}",
                    "filterChainMatch": {
                        "destinationPort": port,
                        "prefixRanges": [{"addressPrefix": vip, "prefixLen": 32}],
                    },
                    "filters": [
                        listeners.tcp_proxy(
                            f"capture_tcp_{port}_{fqdn}",
                            cluster,
                            "outbound_tcp",
                            node.access_log_cluster,
                        )
                    ],
                }
            )
    return chains


def add_capture(node: ProxyNode, view: MeshView, out: XdsResources) -> None:
    assert node.capture is not None
    hcm = listeners.http_connection_manager(
        "capture_http",
        route_config_name=OUTBOUND_HTTP_ROUTE,
        http_filters=[listeners.fault_filter()],
        access_log_name="outbound",
        access_log_cluster=node.access_log_cluster,
        tracing=listeners.tracing(node.tracing_cluster, node.service, node.trace_sampling),
        extra={"useRemoteAddress": True},
    )
    refused = listeners.tcp_proxy(
        "capture_blackhole", BLACKHOLE_CLUSTER, "outbound_tcp", node.access_log_cluster
    )
    body: Json = {
        "name": CAPTURE_LISTENER,
        "address": listeners.address(*node.capture),
        "listenerFilters": [
            {"name": "envoy.filters.listener.original_dst", "typedConfig": typed(ORIGINAL_DST)},
            {"name": "envoy.filters.listener.http_inspector", "typedConfig": typed(HTTP_INSPECTOR)},
        ],
        "listenerFiltersTimeout": f"{DETECT_TIMEOUT_S}s",
        # a silent client (a server-first protocol) is not HTTP: the default chain
        "continueOnListenerFiltersTimeout": True,
        "filterChains": [
            *tcp_chains(node, view, out),
            {"filterChainMatch": {"applicationProtocols": HTTP_PROTOCOLS}, "filters": [hcm]},
        ],
        "defaultFilterChain": {"filters": [refused]},
        "trafficDirection": "OUTBOUND",
        **listeners.NO_REUSE_PORT,
    }
    out.listeners[CAPTURE_LISTENER] = parse(listener_pb2.Listener, body)  # type: ignore[assignment]
    out.clusters[BLACKHOLE_CLUSTER] = blackhole_cluster()
