"""The inbound side of a sidecar: the mTLS listener in front of the app (HTTP), the
TCP relay listeners in front of its TCP ports, and the local clusters they forward to.

The PeerAuthentication mode of each port picks the filter chains (`proxy.listener`):
STRICT has only a TLS chain, which requires a client certificate; PERMISSIVE and
DISABLE add a plaintext chain, chosen by the TLS inspector for non-TLS connections.
"""

from __future__ import annotations

import ssl

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2

from proxy.envoy.access_log_convert import (
    PEER_METADATA_KEY,
    PEER_METADATA_NAMESPACE,
    PEER_SPAN_TAG,
    peer_metadata_filter,
)
from proxy.envoy.resources import XdsResources
from proxy.policy.peer import effective_mtls

from . import clusters, jwt_authn, listeners, ratelimit, rbac, rbac_route, tls
from .model import MeshView, ProxyNode
from .names import (
    INBOUND_HTTP_LISTENER,
    INBOUND_HTTP_ROUTE,
    inbound_cluster,
    inbound_tcp_listener,
)
from .protos import Json, parse


def jwks_ca_file(node: ProxyNode) -> str:
    return node.jwks_ca_file or ssl.get_default_verify_paths().cafile or ""


def trusted_hops(view: MeshView) -> int:
    return view.inbound.num_trusted_proxies if view.inbound is not None else 0


def _trusted_hops(view: MeshView) -> Json:
    """MeshConfig `numTrustedProxies`: the client `remoteIpBlocks` sees is taken from
    X-Forwarded-For past that many proxies (none set: the peer, as before)."""
    hops = trusted_hops(view)
    return {"useRemoteAddress": True, "xffNumTrustedHops": hops} if hops else {}


def mode_of(node: ProxyNode, view: MeshView, port: int) -> str:
    peer = view.inbound.peer_authentication if view.inbound is not None else ()
    return effective_mtls(peer, node.labels, port)


def _chains(
    mode: str, filters_for: dict[bool, list[Json]], trust_domain: str, alpn: list[str] | None
) -> list[Json]:
    chains = [
        {
            "name": "mtls",
            "filterChainMatch": {"transportProtocol": "tls"},
            "transportSocket": tls.downstream_mtls(trust_domain, alpn),
            "filters": filters_for[True],
        }
    ]
    if mode != "STRICT":
        chains.append(
            {
                "name": "plaintext",
                "filterChainMatch": {"transportProtocol": "raw_buffer"},
                "filters": filters_for[False],
            }
        )
    return chains


def permissive_chains(filters: list[Json], trust_domain: str) -> list[Json]:
    """mTLS (a mesh client certificate required) or plaintext on one listener, the
    same filters behind both (an egress gateway's listener)."""
    return _chains("PERMISSIVE", {True: filters, False: filters}, trust_domain, tls.MESH_ALPN)


# Paths the Python engine refuses (architecture §6, `proxy/http/target.py`) that Envoy's
# normaliser keeps: a segment ending in "." or an encoded space (Windows and IIS serve
# `/admin.` as `/admin`), and overlong UTF-8 escapes (`%C0%AE` is "." to a lenient
# decoder). Route regexes see the path without its query; each stays far below RE2's
# program-size limit of 100.
REFUSED_PATHS = (
    ("segment_ending_in_dot_or_space", r".*(\.|%20)(/.*)?"),
    ("overlong_utf8", r".*%([cC][01]|[eE]0%[89]|[fF]0%8).*"),
)


def refused_path_routes() -> list[Json]:
    return [
        {
            "name": f"refused_path|{name}",
            "match": {"safeRegex": {"regex": regex}},
            "directResponse": {"status": 400, "body": {"inlineString": "Bad Request\n"}},
        }
        for name, regex in REFUSED_PATHS
    ]


def inbound_route_config(node: ProxyNode, per_filter: Json | None = None) -> Json:
    """`per_filter`: the virtual host's `typedPerFilterConfig` (the RBAC rules in
    force, `rbac_route`)."""
    if node.app_port:
        action: Json = {"route": {"cluster": inbound_cluster(node.app_port), "timeout": "0s"}}
    else:
        action = {
            "directResponse": {
                "status": 503,
                "body": {"inlineString": "this sidecar has no app port"},
            }
        }
    vhost: Json = {
        "name": "inbound",
        "domains": ["*"],
        "routes": [*refused_path_routes(), {"name": "app", "match": {"prefix": "/"}, **action}],
    }
    if per_filter:
        vhost["typedPerFilterConfig"] = per_filter
    return {"name": INBOUND_HTTP_ROUTE, "virtualHosts": [vhost], "validateClusters": False}


def add_inbound_http(node: ProxyNode, view: MeshView, out: XdsResources) -> None:
    assert node.inbound is not None
    port = node.app_port
    policies = rbac.selected(view.inbound, node.labels)
    authns = jwt_authn.selected(view.inbound, node.labels)
    jwt_filters, jwks_clusters = jwt_authn.jwt_authn_filters(
        authns, jwks_ca_file(node), view.discovered_jwks
    )
    # authorization rules travel per route (RDS), so a change applies to open connections
    authz_filters, authz_per_route = rbac_route.split(
        rbac.rbac_filters(
            policies,
            port,
            tcp=False,
            stat_prefix="inbound",
            issuers=jwt_authn.issuers(authns),
            inbound=view.inbound,
            namespace=node.namespace,
        )
    )
    # JWT, authorization, then rate limits, as the Python inbound path orders them
    http_filters = [
        # the caller's peer metadata moves into dynamic metadata: the app never sees
        # it, the access log still carries it (a header removed is gone from the log)
        peer_metadata_filter(),
        *jwt_filters,
        *authz_filters,
        *ratelimit.ratelimit_filters(ratelimit.selected(view.inbound, node.labels)),
    ]
    filters = {}
    for mtls in (True, False):
        filters[mtls] = [
            listeners.http_connection_manager(
                f"inbound_{port}",
                route_config_name=INBOUND_HTTP_ROUTE,
                http_filters=http_filters,
                access_log_name="inbound",
                access_log_cluster=node.access_log_cluster,
                telemetry_mode=node.telemetry_mode,
                tracing=listeners.tracing(
                    node.tracing_cluster,
                    node.service,
                    node.trace_sampling,
                    peer_tag=(PEER_SPAN_TAG, PEER_METADATA_NAMESPACE, PEER_METADATA_KEY),
                ),
                # the caller's identity is what its certificate proves, nothing else
                extra={
                    "forwardClientCertDetails": "SANITIZE_SET",
                    "setCurrentClientCertDetails": {"uri": True},
                    **_trusted_hops(view),
                },
            )
        ]
    mode = mode_of(node, view, port)
    out.listeners[INBOUND_HTTP_LISTENER] = listeners.listener(
        INBOUND_HTTP_LISTENER,
        node.inbound,
        _chains(mode, filters, node.trust_domain, tls.MESH_ALPN),
        listener_filters=[listeners.tls_inspector()],
        direction="INBOUND",
    )
    out.routes[INBOUND_HTTP_ROUTE] = parse(
        route_pb2.RouteConfiguration, inbound_route_config(node, authz_per_route)
    )
    for name, cluster in jwks_clusters.items():
        out.clusters[name] = parse(cluster_pb2.Cluster, cluster)
    if port:
        name = inbound_cluster(port)
        out.clusters[name] = clusters.static_cluster(
            name, node.app_host, port, http=True, h2c=node.app_h2c
        )


def add_inbound_tcp(node: ProxyNode, view: MeshView, out: XdsResources) -> None:
    """A relay per app TCP port: network RBAC (the port's policies, with Istio's
    rules for HTTP-only fields), then the app's port on localhost."""
    policies = rbac.selected(view.inbound, node.labels)
    for port, bind in node.tcp_inbound:
        name = inbound_tcp_listener(port)
        cluster = inbound_cluster(port)
        network = [
            *rbac.rbac_filters(policies, port, tcp=True, stat_prefix=f"inbound_tcp_{port}"),
            listeners.tcp_proxy(
                f"inbound_tcp_{port}", cluster, "inbound_tcp", node.access_log_cluster
            ),
        ]
        out.listeners[name] = listeners.listener(
            name,
            bind,
            _chains(
                mode_of(node, view, port), {True: network, False: network}, node.trust_domain, None
            ),
            listener_filters=[listeners.tls_inspector()],
        )
        out.clusters[cluster] = clusters.static_cluster(cluster, node.app_host, port, http=False)
