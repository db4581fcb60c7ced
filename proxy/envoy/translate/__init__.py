"""Meshwork's compiled configuration -> Envoy xDS resources. Pure: no I/O, no clock.

`translate(node, view)` gives every listener, route configuration, cluster and
endpoint assignment one proxy needs (secrets come from `tls_secrets`, served apart so
that a rotation touches nothing else). TLS contexts name the SDS secrets
`resources.WORKLOAD_CERT` and `resources.TRUST_BUNDLE`, fetched over ADS.

Whatever the translation cannot express raises `TranslationError` naming the resource,
field and value: an ignored policy would be a security hole.
"""

from __future__ import annotations

import dataclasses

from proxy.envoy.resources import XdsResources

from . import capture, egress, ext_authz, gateway, inbound, outbound, tcp
from .model import MeshView, ProxyNode, TranslationError
from .tls import tls_secrets

__all__ = [
    "MeshView",
    "ProxyNode",
    "TranslationError",
    "referenced_hosts",
    "tls_secrets",
    "translate",
]


def translate(node: ProxyNode, view: MeshView) -> XdsResources:
    """Listeners, routes, clusters and endpoints of `node` (no secrets)."""
    out = XdsResources()
    if node.role == "gateway":
        ctx = outbound.route_context(node, view, view.gateway.name if view.gateway else "")
        gateway.add_gateway(node, view, out, ctx)
        tcp.add_gateway_l4(node, view, out)
    else:
        ctx = outbound.route_context(node, view)
        if node.outbound is not None:
            ctx = outbound.add_outbound(node, view, out)
            if node.on_demand:
                out = dataclasses.replace(out, unknown_host=outbound.unknown_host_model(node, view))
            if node.capture is not None:
                capture.add_capture(node, view, out)
        if node.inbound is not None:
            inbound.add_inbound_http(node, view, out)
        inbound.add_inbound_tcp(node, view, out)
    tcp.add_outbound_tcp(node, view, out)
    # CUSTOM policies' authorizers are mesh services too
    ctx.referenced.update((h, "") for h in ext_authz.provider_hosts(view.inbound, node.namespace))
    outbound.add_http_clusters(view, ctx, out)
    ext_authz.add_grpc_clusters(view, node.namespace, out)
    egress.add_external_clusters(node, view, ctx, out)
    return out


def referenced_hosts(node: ProxyNode, view: MeshView) -> set[str]:
    """Every mesh host the translation's routes and mirrors name: the destinations
    the caller must follow (and put in `view.destinations`) for their clusters to
    have endpoints and their subsets to exist."""
    if node.role == "gateway":
        ctx = outbound.route_context(node, view, view.gateway.name if view.gateway else "")
        gateway.add_gateway(node, view, XdsResources(), ctx)
    else:
        ctx = outbound.route_context(node, view)
        outbound.outbound_route_config(node, view, ctx)
    aliases = {
        alias
        for table, _endpoints in view.destinations.values()
        if table is not None
        for alias in table.aliases
    }
    return (
        {host for host, _ in ctx.referenced}
        | aliases
        | ext_authz.provider_hosts(view.inbound, node.namespace)
        | tcp.l4_hosts(node, view)
    )
