"""Meshwork's compiled configuration -> Envoy xDS resources. Pure: no I/O, no clock.

`translate(node, view)` gives every listener, route configuration, cluster and
endpoint assignment one proxy needs (secrets come from `tls_secrets`, served apart so
that a rotation touches nothing else). TLS contexts name the SDS secrets
`resources.WORKLOAD_CERT` and `resources.TRUST_BUNDLE`, fetched over ADS.

Whatever the translation cannot express raises `TranslationError` naming the resource,
field and value: an ignored policy would be a security hole.
"""

from __future__ import annotations

from proxy.envoy.resources import XdsResources

from . import outbound
from .model import MeshView, ProxyNode, TranslationError
from .tls import tls_secrets

__all__ = ["MeshView", "ProxyNode", "TranslationError", "tls_secrets", "translate"]


def translate(node: ProxyNode, view: MeshView) -> XdsResources:
    """Listeners, routes, clusters and endpoints of `node` (no secrets)."""
    out = XdsResources()
    ctx = outbound.route_context(node, view)
    if node.outbound is not None:
        ctx = outbound.add_outbound(node, view, out)
    outbound.add_http_clusters(view, ctx, out)
    return out
