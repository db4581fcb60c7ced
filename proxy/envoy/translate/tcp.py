"""Outbound TCP relays (`--tcp-upstream`): a local listener per upstream, relayed to
the TCP listeners the destination's sidecars registered for that port."""

from __future__ import annotations

import functools

from mesh.compiled import TrafficPolicy
from mesh.messages import Endpoint
from proxy.envoy.resources import XdsResources

from . import clusters, listeners
from .model import MeshView, ProxyNode
from .names import outbound_cluster, outbound_tcp_listener

LOCAL_HOST = "127.0.0.1"


def add_tcp_cluster(view: MeshView, fqdn: str, port: int, out: XdsResources) -> str:
    """`outbound|<port>||<fqdn>`: the TCP listeners the service's instances registered
    for `port`; returns its name."""
    name = outbound_cluster(fqdn, port=port)
    _, endpoint_set = view.destinations.get(fqdn, (None, None))
    key = str(port)
    eps = [
        ep
        for ep in (endpoint_set.endpoints if endpoint_set is not None else [])
        if key in ep.tcp_listeners
    ]
    lb = clusters.lb_endpoints(eps, functools.partial(_relay, key), f"ClusterLoadAssignment {name}")
    # the Python relay balances round robin and applies no DestinationRule policy
    out.clusters[name] = clusters.eds_cluster(name, TrafficPolicy(), lb, http=False)
    out.endpoints[name] = clusters.load_assignment(name, lb)
    return name


def add_outbound_tcp(node: ProxyNode, view: MeshView, out: XdsResources) -> None:
    for upstream in node.tcp_upstreams:
        fqdn = upstream.service.fqdn
        port = upstream.port
        name = add_tcp_cluster(view, fqdn, port, out)
        listener = outbound_tcp_listener(fqdn, port)
        out.listeners[listener] = listeners.listener(
            listener,
            (LOCAL_HOST, upstream.local_port),
            [
                {
                    "filters": [
                        listeners.tcp_proxy(listener, name, "outbound_tcp", node.access_log_cluster)
                    ]
                }
            ],
        )


def _relay(port: str, endpoint: Endpoint) -> str:
    return endpoint.tcp_listeners[port]
