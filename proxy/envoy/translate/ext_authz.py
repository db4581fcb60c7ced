"""CUSTOM AuthorizationPolicy -> Envoy's `ext_authz` HTTP filter, as Istio builds it.

An RBAC filter with the CUSTOM rules as *shadow* rules (it never decides) marks the
requests they match (`istio_ext_authz_shadow_effective_policy_id` in its dynamic
metadata); the ext_authz filter after it runs only for those
(`filter_enabled_metadata`), asking the provider's mesh service through its outbound
cluster (`outbound|0||<fqdn>`, mTLS to its sidecar), before the DENY and ALLOW RBAC
filters: Istio's order, and the Python sidecar's (`proxy.policy.ext_authz`). A CUSTOM
policy whose provider is not defined denies what it matches (a DENY RBAC policy), as
the Python sidecar does.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from mesh.compiled import AuthzPolicy, ExtAuthzProvider, InboundPolicy
from mesh.hosts import canonical_host, service_of_host

from .model import TranslationError
from .names import outbound_cluster
from .protos import HTTP_RBAC, Json, duration, typed

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
        raise TranslationError(
            f"ExtensionProvider {provider.name}", "envoyExtAuthzHttp.service", provider.service,
            "not a mesh service",
        )  # fmt: skip
    shadow: Json = {
        "shadowRules": {"action": "DENY", "policies": shadow_policies},
        "shadowRulesStatPrefix": SHADOW_PREFIX,
    }

    def patterns(names: Sequence[str]) -> Json:
        return {"patterns": [{"exact": n, "ignoreCase": True} for n in names]}

    response: Json = {}
    if provider.headers_to_upstream_on_allow:
        response["allowedUpstreamHeaders"] = patterns(provider.headers_to_upstream_on_allow)
    if provider.headers_to_downstream_on_deny:
        response["allowedClientHeaders"] = patterns(provider.headers_to_downstream_on_deny)
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
        "filterEnabledMetadata": {
            "filter": "envoy.filters.http.rbac",
            "path": [{"key": f"{SHADOW_PREFIX}shadow_effective_policy_id"}],
            "value": {"stringMatch": {"prefix": POLICY_PREFIX}},
        },
    }
    return [
        {"name": "envoy.filters.http.rbac", "typedConfig": typed(HTTP_RBAC, shadow)},
        {"name": "envoy.filters.http.ext_authz", "typedConfig": typed(EXT_AUTHZ, body)},
    ]
