"""CUSTOM AuthorizationPolicy -> Envoy's `ext_authz` HTTP filter, as Istio builds it.

An RBAC filter with the CUSTOM rules as *shadow* rules (it never decides) marks the
requests they match (`istio_ext_authz_shadow_effective_policy_id` in its dynamic
metadata); the ext_authz filter after it runs only for those
(`filter_enabled_metadata`), asking the provider's mesh service through its outbound
cluster (`outbound|0||<fqdn>`, mTLS to its sidecar), before the DENY and ALLOW RBAC
filters: Istio's order, and the Python sidecar's (`proxy.policy.ext_authz`). A CUSTOM
policy whose provider is not defined denies what it matches (a DENY RBAC policy), as
the Python sidecar does.

A gRPC provider (`envoyExtAuthzGrpc`) becomes the filter's `grpc_service`
(`envoy_grpc`) on a cluster of its own, `ext_authz_grpc|<fqdn>`: the provider's
endpoints, as its outbound cluster lists them, reached over mTLS with ALPN `h2` and
HTTP/2, since
the mesh's outbound clusters speak HTTP/1.1 on Envoy. The authorizer's own sidecar
must therefore accept HTTP/2 (the Python data plane does).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from envoy.config.cluster.v3 import cluster_pb2

from mesh.compiled import AuthzPolicy, ExtAuthzProvider, InboundPolicy
from mesh.hosts import canonical_host, service_of_host
from proxy.envoy.resources import XdsResources

from . import clusters, tls
from .model import MeshView, TranslationError
from .names import outbound_cluster
from .protos import ADS, HTTP_PROTOCOL_OPTIONS, HTTP_RBAC, Json, duration, parse, typed

EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
SHADOW_PREFIX = "istio_ext_authz_"
POLICY_PREFIX = "istio-ext-authz"


def provider_hosts(policy: InboundPolicy | None, namespace: str) -> set[str]:
    """The mesh hosts of the providers a policy defines (their clusters must exist)."""
    if policy is None:
        return set()
    return {canonical_host(p.service, namespace) for p in policy.extension_providers}


def split_custom(
    policies: Sequence[AuthzPolicy], view_inbound: InboundPolicy | None
) -> tuple[list[AuthzPolicy], list[AuthzPolicy], ExtAuthzProvider | None]:
    """(the policies left to RBAC, with undefined-provider CUSTOM ones as DENY; the
    CUSTOM policies to check with the provider; that provider)."""
    defined = {p.name: p for p in (view_inbound.extension_providers if view_inbound else ())}
    rest: list[AuthzPolicy] = []
    custom: list[AuthzPolicy] = []
    for p in policies:
        if p.action != "CUSTOM":
            rest.append(p)
        elif p.provider in defined:
            custom.append(p)
        else:
            # selector and mesh_wide kept: only the action changes
            rest.append(msgspec.structs.replace(p, action="DENY", provider=""))
    names = sorted({p.provider for p in custom})
    if len(names) > 1:
        raise TranslationError(
            "AuthorizationPolicy", "provider.name", names,
            "only one extension provider per workload is supported",
        )  # fmt: skip
    return rest, custom, defined[names[0]] if names else None


def ext_authz_filters(
    custom: Sequence[AuthzPolicy],
    provider: ExtAuthzProvider | None,
    namespace: str,
    shadow_policies: dict[str, Json],
) -> list[Json]:
    """The shadow RBAC filter marking requests and the ext_authz filter checking them;
    `shadow_policies` are the CUSTOM rules already built as RBAC policies, by name."""
    if not custom or provider is None:
        return []
    fqdn = canonical_host(provider.service, namespace)
    if service_of_host(fqdn) is None:
        kind = "envoyExtAuthzGrpc" if provider.protocol == "grpc" else "envoyExtAuthzHttp"
        raise TranslationError(
            f"ExtensionProvider {provider.name}", f"{kind}.service", provider.service,
            "not a mesh service",
        )  # fmt: skip
    shadow: Json = {
        "shadowRules": {"action": "DENY", "policies": shadow_policies},
        "shadowRulesStatPrefix": SHADOW_PREFIX,
    }
    enabled: Json = {
        "filter": "envoy.filters.http.rbac",
        "path": [{"key": f"{SHADOW_PREFIX}shadow_effective_policy_id"}],
        "value": {"stringMatch": {"prefix": POLICY_PREFIX}},
    }
    if provider.protocol == "grpc":
        grpc_body: Json = {
            "grpcService": {
                "envoyGrpc": {"clusterName": grpc_cluster(fqdn), "authority": fqdn},
                "timeout": duration(provider.timeout_ms),
            },
            "transportApiVersion": "V3",
            "failureModeAllow": provider.fail_open,
            "statusOnError": {"code": provider.status_on_error},
            "filterEnabledMetadata": enabled,
        }
        if provider.max_request_bytes:
            grpc_body["withRequestBody"] = _with_request_body(provider)
        return [
            {"name": "envoy.filters.http.rbac", "typedConfig": typed(HTTP_RBAC, shadow)},
            {"name": "envoy.filters.http.ext_authz", "typedConfig": typed(EXT_AUTHZ, grpc_body)},
        ]

    def patterns(names: Sequence[str]) -> Json:
        return {"patterns": [{"exact": n, "ignoreCase": True} for n in names]}

    response: Json = {}
    if provider.headers_to_upstream_on_allow:
        response["allowedUpstreamHeaders"] = patterns(provider.headers_to_upstream_on_allow)
    if provider.headers_to_downstream_on_deny:
        response["allowedClientHeaders"] = patterns(provider.headers_to_downstream_on_deny)
    if provider.headers_to_downstream_on_allow:
        response["allowedClientHeadersOnSuccess"] = patterns(
            provider.headers_to_downstream_on_allow
        )
    service: Json = {
        "serverUri": {
            "uri": f"http://{fqdn}",
            "cluster": outbound_cluster(fqdn),
            "timeout": duration(provider.timeout_ms),
        },
        "authorizationRequest": {
            "allowedHeaders": patterns(provider.include_request_headers),
        },
        "authorizationResponse": response,
    }
    if provider.path_prefix:
        service["pathPrefix"] = provider.path_prefix
    if not provider.include_request_headers:
        del service["authorizationRequest"]
    body: Json = {
        "httpService": service,
        "transportApiVersion": "V3",
        "failureModeAllow": provider.fail_open,
        "statusOnError": {"code": provider.status_on_error},
        "filterEnabledMetadata": enabled,
    }
    if provider.max_request_bytes:
        body["withRequestBody"] = _with_request_body(provider)
    return [
        {"name": "envoy.filters.http.rbac", "typedConfig": typed(HTTP_RBAC, shadow)},
        {"name": "envoy.filters.http.ext_authz", "typedConfig": typed(EXT_AUTHZ, body)},
    ]


def _with_request_body(provider: ExtAuthzProvider) -> Json:
    """`includeRequestBodyInCheck` as Envoy's BufferSettings."""
    return {
        "maxRequestBytes": provider.max_request_bytes,
        "allowPartialMessage": provider.allow_partial_message,
        "packAsBytes": provider.pack_as_bytes,
    }


def grpc_cluster(fqdn: str) -> str:
    return f"ext_authz_grpc|{fqdn}"


def add_grpc_clusters(view: MeshView, namespace: str, out: XdsResources) -> None:
    """An HTTP/2 cluster per gRPC provider, with the endpoints of the provider's
    outbound cluster (`provider_hosts` made the caller follow its service)."""
    if view.inbound is None:
        return
    for provider in view.inbound.extension_providers:
        if provider.protocol != "grpc":
            continue
        fqdn = canonical_host(provider.service, namespace)
        name = grpc_cluster(fqdn)
        _, endpoint_set = view.destinations.get(fqdn, (None, None))
        lb = clusters.lb_endpoints(
            endpoint_set.endpoints if endpoint_set is not None else [],
            lambda ep: ep.address,
            f"ClusterLoadAssignment {name}",
        )
        out.endpoints[name] = clusters.load_assignment(name, lb)
        body: Json = {
            "name": name,
            "type": "EDS",
            "edsClusterConfig": {"edsConfig": ADS, "serviceName": name},
            "connectTimeout": duration(clusters.DEFAULT_CONNECT_TIMEOUT_MS),
            "transportSocketMatches": clusters.transport_socket_matches(lb, ["h2"]),
            "transportSocket": tls.raw_buffer(),
            "typedExtensionProtocolOptions": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
                    HTTP_PROTOCOL_OPTIONS, {"explicitHttpConfig": {"http2ProtocolOptions": {}}}
                )
            },
        }
        out.clusters[name] = parse(cluster_pb2.Cluster, body)  # type: ignore[assignment]
