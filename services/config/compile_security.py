"""Pure compiler for inbound policy: PeerAuthentication, AuthorizationPolicy and
RateLimitPolicy resources -> the `InboundPolicy` the server sidecars of one service
enforce.

Which resources reach a service follows Istio:
- PeerAuthentication: the selector-less one in the root namespace is mesh-wide; one in
  the service's namespace is namespace-wide without a selector and workload-scoped with
  one; a root-namespace one *with* a selector is workload-scoped and applies only to
  workloads in the root namespace (Istio ignores it elsewhere).
- AuthorizationPolicy: those of the service's namespace and of the root namespace (the
  latter mesh-wide, its selector matched against workloads of every namespace).
- RequestAuthentication: as PeerAuthentication, without the ordering: the root
  namespace's selector-less ones are mesh-wide, the service namespace's apply (with
  their selectors), a root-namespace one with a selector applies only in the root
  namespace (the ingress gateway's); every one that applies contributes its jwtRules.
- MeshConfig (`meshwork.io`): those of the root namespace define the extension
  providers; a service's policy carries those its CUSTOM policies name (the first
  definition of a name wins, in (namespace, name) order; validation keeps names
  unique within one MeshConfig). A dry-run CUSTOM policy is not applied (Istio does
  not support dry-run for CUSTOM).
- RateLimitPolicy (`meshwork.io`): those of the service's namespace. Every one of them
  may match: the compiler knows the service, not its instances' labels (`app` defaults
  to the service name but `--labels` may change it), so filtering on `app` here could
  drop a limit a sidecar should enforce.

Selectors are kept rather than resolved here: the instances of one service differ in
labels (version), so each sidecar keeps the policies that select it. Output order is
(namespace, name), so equal inputs give equal Structs and the leader can skip a
publish when nothing changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from mesh import compiled
from mesh.hosts import ServiceRef
from mesh.resources import (
    DRY_RUN_ANNOTATION,
    AuthorizationPolicySpec,
    ExtAuthzGrpc,
    ExtAuthzHttp,
    JwtRule,
    MeshConfigSpec,
    MutualTLS,
    PeerAuthenticationSpec,
    PolicyTargetReference,
    RateLimitPolicySpec,
    RequestAuthenticationSpec,
    RequestRate,
    Resource,
    Rule,
    WorkloadSelector,
    parse_duration_ms,
)

__all__ = ["DEFAULT_ROOT_NAMESPACE", "compile_inbound_policy"]

DEFAULT_ROOT_NAMESPACE = "istio-system"

_MTLS_MODES: Mapping[str, compiled.MtlsMode] = {
    "UNSET": "UNSET",
    "STRICT": "STRICT",
    "PERMISSIVE": "PERMISSIVE",
    "DISABLE": "DISABLE",
}
_Action = Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"]
_Scope = Literal["mesh", "namespace", "workload"]
_ACTIONS: Mapping[str, _Action] = {
    "ALLOW": "ALLOW",
    "DENY": "DENY",
    "AUDIT": "AUDIT",
    "CUSTOM": "CUSTOM",
}


def compile_inbound_policy(
    resources: Sequence[Resource],
    ref: ServiceRef,
    revision: int,
    root_namespace: str,
    *,
    create_revisions: Mapping[tuple[str, str, str], int] | None = None,
) -> compiled.InboundPolicy:
    """What the sidecars serving `ref` enforce on inbound connections and requests.

    `create_revisions` maps a resource's (kind, namespace, name) to the etcd revision
    that created it; the sidecar uses it to let the oldest of two equally specific
    PeerAuthentications win, as Istio does. Missing entries compile to 0 (unknown).
    """
    created = create_revisions or {}
    peer: list[compiled.PeerAuthn] = []
    authz: list[compiled.AuthzPolicy] = []
    rate_limits: list[compiled.RateLimit] = []
    request_authn: list[compiled.RequestAuthn] = []
    providers: dict[str, compiled.ExtAuthzProvider] = {}
    trusted_proxies: int | None = None
    trust_domains = trust_domain_bundle(resources, root_namespace)
    for resource in sorted(resources, key=lambda r: (r.metadata.namespace, r.metadata.name)):
        spec = resource.spec
        if isinstance(spec, PeerAuthenticationSpec):
            authn = _peer_authn(resource, spec, ref, root_namespace, created.get(resource.ref, 0))
            if authn is not None:
                peer.append(authn)
        elif isinstance(spec, AuthorizationPolicySpec):
            namespace = resource.metadata.namespace
            dry_run_custom = spec.action == "CUSTOM" and _dry_run(resource)
            # Istio does not support dry-run for CUSTOM: such a policy is not applied
            targeted = target_selectors(spec.target_ref, spec.target_refs, namespace, ref)
            if targeted is not None:
                # attached by reference: only there, never mesh-wide (Istio)
                if not dry_run_custom:
                    authz.extend(
                        _authz_policy(
                            resource, spec, mesh_wide=False, trust_domains=trust_domains,
                            selector=selector,
                        )
                        for selector in targeted
                    )  # fmt: skip
            elif namespace in (ref.namespace, root_namespace) and not dry_run_custom:
                authz.append(
                    _authz_policy(
                        resource, spec, mesh_wide=namespace == root_namespace,
                        trust_domains=trust_domains,
                    )
                )  # fmt: skip
        elif isinstance(spec, MeshConfigSpec):
            if resource.metadata.namespace == root_namespace:
                topology = spec.default_config.gateway_topology if spec.default_config else None
                if trusted_proxies is None and topology is not None:
                    trusted_proxies = topology.num_trusted_proxies
                for provider in spec.extension_providers:
                    if provider.envoy_ext_authz_http is not None:
                        providers.setdefault(
                            provider.name, _provider(provider.name, provider.envoy_ext_authz_http)
                        )
                    elif provider.envoy_ext_authz_grpc is not None:
                        providers.setdefault(
                            provider.name,
                            _grpc_provider(provider.name, provider.envoy_ext_authz_grpc),
                        )
        elif isinstance(spec, RequestAuthenticationSpec):
            request_authn.extend(_request_authn(resource, spec, ref, root_namespace))
        elif isinstance(spec, RateLimitPolicySpec):
            if resource.metadata.namespace == ref.namespace:
                rate_limits.append(_rate_limit(resource, spec))
    return compiled.InboundPolicy(
        namespace=ref.namespace,
        service=ref.name,
        revision=revision,
        peer_authentication=tuple(peer),
        authorization=tuple(authz),
        rate_limits=tuple(rate_limits),
        request_authentication=tuple(request_authn),
        extension_providers=tuple(
            providers[name]
            for name in sorted({p.provider for p in authz if p.action == "CUSTOM"})
            if name in providers
        ),
        num_trusted_proxies=trusted_proxies or 0,
    )


# ---------------------------------------------------------------- PeerAuthentication


def _peer_authn(
    resource: Resource,
    spec: PeerAuthenticationSpec,
    ref: ServiceRef,
    root_namespace: str,
    create_revision: int,
) -> compiled.PeerAuthn | None:
    namespace = resource.metadata.namespace
    selector = _labels(spec.selector)
    scope: _Scope
    if namespace == root_namespace and not selector:
        scope = "mesh"
    elif namespace != ref.namespace:
        return None  # another namespace's, or a root-namespace workload policy
    else:
        scope = "workload" if selector else "namespace"
    return compiled.PeerAuthn(
        name=resource.metadata.name,
        namespace=namespace,
        scope=scope,
        selector=selector,
        mode=_mode(spec.mtls),
        # validation guarantees int keys in 1..65535 and a selector when set
        port_modes={int(p): _mode(m) for p, m in (spec.port_level_mtls or {}).items()},
        create_revision=create_revision,
    )


def _mode(mtls: MutualTLS | None) -> compiled.MtlsMode:
    if mtls is None or mtls.mode is None:
        return "UNSET"
    return _MTLS_MODES[mtls.mode]


# ---------------------------------------------------------------- AuthorizationPolicy


def _authz_policy(
    resource: Resource,
    spec: AuthorizationPolicySpec,
    *,
    mesh_wide: bool,
    trust_domains: tuple[str, ...] = (),
    selector: dict[str, str] | None = None,
) -> compiled.AuthzPolicy:
    return compiled.AuthzPolicy(
        name=resource.metadata.name,
        namespace=resource.metadata.namespace,
        action=_ACTIONS[spec.action or "ALLOW"],
        selector=_labels(spec.selector) if selector is None else selector,
        mesh_wide=mesh_wide,
        rules=tuple(_rule(rule, trust_domains) for rule in spec.rules),
        dry_run=_dry_run(resource),
        provider=spec.provider.name if spec.action == "CUSTOM" and spec.provider else "",
    )


def _dry_run(resource: Resource) -> bool:
    # validation admits only "true" and "false"
    return resource.metadata.annotations.get(DRY_RUN_ANNOTATION) == "true"


def _provider(name: str, http: ExtAuthzHttp) -> compiled.ExtAuthzProvider:
    # validation guarantees a service, a port, a positive timeout and a status
    body = http.include_request_body_in_check
    lower = lambda names: tuple(n.lower() for n in names)  # noqa: E731
    return compiled.ExtAuthzProvider(
        name=name,
        service=http.service,
        port=int(http.port or 0),
        timeout_ms=parse_duration_ms(http.timeout) if http.timeout else 600_000,
        path_prefix=http.path_prefix,
        fail_open=http.fail_open,
        status_on_error=int(http.status_on_error) if http.status_on_error else 403,
        include_request_headers=lower(http.include_request_headers_in_check),
        headers_to_upstream_on_allow=lower(http.headers_to_upstream_on_allow),
        headers_to_downstream_on_deny=lower(http.headers_to_downstream_on_deny),
        headers_to_downstream_on_allow=lower(http.headers_to_downstream_on_allow),
        max_request_bytes=(body.max_request_bytes or 0) if body is not None else 0,
        allow_partial_message=body.allow_partial_message if body is not None else False,
    )


def _grpc_provider(name: str, grpc: ExtAuthzGrpc) -> compiled.ExtAuthzProvider:
    # validation guarantees a service, a port, a positive timeout, a status and a
    # maxRequestBytes when the body is included
    body = grpc.include_request_body_in_check
    return compiled.ExtAuthzProvider(
        name=name,
        service=grpc.service,
        port=int(grpc.port or 0),
        timeout_ms=parse_duration_ms(grpc.timeout) if grpc.timeout else 600_000,
        protocol="grpc",
        fail_open=grpc.fail_open,
        status_on_error=int(grpc.status_on_error) if grpc.status_on_error else 403,
        max_request_bytes=(body.max_request_bytes or 0) if body is not None else 0,
        allow_partial_message=body.allow_partial_message if body is not None else False,
        pack_as_bytes=body.pack_as_bytes if body is not None else False,
    )


DEFAULT_TRUST_DOMAIN = "cluster.local"


def trust_domain_bundle(resources: Sequence[Resource], root_namespace: str) -> tuple[str, ...]:
    """(the mesh's trust domain, its aliases) from the root namespace's MeshConfigs
    (the first, by name, that sets them); () when none does: policies stay as written."""
    for resource in sorted(resources, key=lambda r: r.metadata.name):
        spec = resource.spec
        if (
            isinstance(spec, MeshConfigSpec)
            and resource.metadata.namespace == root_namespace
            and (spec.trust_domain or spec.trust_domain_aliases)
        ):
            own = spec.trust_domain or DEFAULT_TRUST_DOMAIN
            return tuple(dict.fromkeys((own, *spec.trust_domain_aliases)))
    return ()


def with_trust_domain_aliases(principals: Sequence[str], bundle: Sequence[str]) -> tuple[str, ...]:
    """Istio's `ReplaceTrustDomainAliases`: a principal `<td>/ns/<ns>/sa/<sa>` whose trust
    domain is in `bundle` (the mesh's and its aliases) or is "cluster.local" stands for
    the same workload in every trust domain of the bundle; a pattern trust domain
    (`*-td`) is kept as written for the ones it matches. Other principals, `*/...` and
    ones not of that form are kept as written."""
    if not bundle:
        return tuple(principals)
    out: list[str] = []
    for principal in principals:
        parts = principal.split("/")
        domain = parts[0]
        if (
            len(parts) != 5
            or domain == "*"
            or (domain != DEFAULT_TRUST_DOMAIN and not any(_matches(domain, td) for td in bundle))
        ):
            out.append(principal)
            continue
        for td in bundle:
            kept = domain.startswith("*") and td.endswith(domain[1:])
            out.append(principal if kept else "/".join((td, *parts[1:])))
    return tuple(dict.fromkeys(out))


def _matches(pattern: str, trust_domain: str) -> bool:
    """Istio's string match of a principal's trust domain: exact, `*suffix`, `prefix*`."""
    if pattern.startswith("*"):
        return trust_domain.endswith(pattern[1:])
    if pattern.endswith("*"):
        return trust_domain.startswith(pattern[:-1])
    return pattern == trust_domain


def _rule(rule: Rule, trust_domains: Sequence[str] = ()) -> compiled.AuthzRule:
    aliased = lambda principals: with_trust_domain_aliases(principals, trust_domains)  # noqa: E731
    sources = tuple(
        compiled.Source(
            principals=aliased(s.principals),
            not_principals=aliased(s.not_principals),
            namespaces=s.namespaces,
            not_namespaces=s.not_namespaces,
            ip_blocks=s.ip_blocks,
            not_ip_blocks=s.not_ip_blocks,
            request_principals=s.request_principals,
            not_request_principals=s.not_request_principals,
            service_accounts=s.service_accounts,
            not_service_accounts=s.not_service_accounts,
            remote_ip_blocks=s.remote_ip_blocks,
            not_remote_ip_blocks=s.not_remote_ip_blocks,
        )
        for entry in rule.from_ or ()
        if (s := entry.source) is not None
    )
    operations = tuple(
        compiled.Operation(
            methods=o.methods,
            not_methods=o.not_methods,
            paths=o.paths,
            not_paths=o.not_paths,
            hosts=o.hosts,
            not_hosts=o.not_hosts,
            ports=o.ports,
            not_ports=o.not_ports,
        )
        for entry in rule.to or ()
        if (o := entry.operation) is not None
    )
    when = tuple(
        compiled.Condition(key=c.key, values=aliased(c.values), not_values=aliased(c.not_values))
        if c.key == "source.principal"
        else compiled.Condition(key=c.key, values=c.values, not_values=c.not_values)
        for c in rule.when
    )
    return compiled.AuthzRule(sources=sources, operations=operations, when=when)


# ---------------------------------------------------------------- RequestAuthentication


def _request_authn(
    resource: Resource, spec: RequestAuthenticationSpec, ref: ServiceRef, root_namespace: str
) -> list[compiled.RequestAuthn]:
    """The RequestAuthentication as `ref`'s workloads see it: one entry per selector
    under which it applies (none when it does not)."""
    namespace = resource.metadata.namespace
    targeted = target_selectors(spec.target_ref, spec.target_refs, namespace, ref)
    if targeted is None:
        selector = _labels(spec.selector)
        mesh_wide = namespace == root_namespace and not selector
        if not mesh_wide and namespace != ref.namespace:
            return []
        targeted = [selector]
    rules = tuple(_jwt_rule(rule) for rule in spec.jwt_rules)
    return [
        compiled.RequestAuthn(
            name=resource.metadata.name, namespace=namespace, selector=selector, rules=rules
        )
        for selector in targeted
    ]


def _jwt_rule(rule: JwtRule) -> compiled.JwtRule:
    # validation guarantees an issuer, one key source and a positive timeout
    return compiled.JwtRule(
        issuer=rule.issuer,
        audiences=rule.audiences,
        jwks=rule.jwks,
        jwks_uri=rule.jwks_uri,
        from_headers=tuple(
            compiled.JwtFromHeader(name=h.name.lower(), prefix=h.prefix) for h in rule.from_headers
        ),
        from_params=rule.from_params,
        from_cookies=rule.from_cookies,
        output_payload_to_header=rule.output_payload_to_header.lower(),
        output_claim_to_headers=tuple(
            compiled.ClaimHeader(header=c.header.lower(), claim=c.claim)
            for c in rule.output_claim_to_headers
        ),
        forward_original_token=rule.forward_original_token,
        timeout_ms=parse_duration_ms(rule.timeout) if rule.timeout else 5000,
    )


# ---------------------------------------------------------------- RateLimitPolicy


def _rate_limit(resource: Resource, spec: RateLimitPolicySpec) -> compiled.RateLimit:
    # validation guarantees every rate is set and positive and every override has
    # principals, so 0 below only ever means "not configured"
    return compiled.RateLimit(
        name=resource.metadata.name,
        namespace=resource.metadata.namespace,
        selector=_labels(spec.selector),
        total_rps=_rps(spec.total),
        identity_rps=_rps(spec.identity),
        overrides=tuple(
            compiled.RateLimitOverride(
                principals=o.client_refs.principals if o.client_refs is not None else (),
                rps=o.requests_per_second or 0,
            )
            for o in spec.overrides
        ),
    )


def _rps(rate: RequestRate | None) -> int:
    return 0 if rate is None else rate.requests_per_second or 0


# the label Istio puts on a Gateway API Gateway's deployment (its proxies)
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


def target_selectors(
    target_ref: PolicyTargetReference | None,
    target_refs: Sequence[PolicyTargetReference],
    namespace: str,
    ref: ServiceRef,
) -> list[dict[str, str]] | None:
    """For a policy attached by `targetRef`/`targetRefs` (validation admits Service and
    Gateway API Gateway, in the policy's namespace): the selectors under which it
    applies to `ref`'s workloads ([] when it does not); None when it has no reference
    (its `selector`, or none, decides). A Service reference means every workload of
    that service; a Gateway reference the gateway proxies labelled with its name."""
    refs = [target_ref] if target_ref is not None else list(target_refs)
    if not refs:
        return None
    if namespace != ref.namespace:
        return []
    if any(r.kind == "Service" and r.name == ref.name for r in refs):
        return [{}]
    names = sorted({r.name for r in refs if r.kind == "Gateway"})
    return [{GATEWAY_NAME_LABEL: name} for name in names]


def _labels(selector: WorkloadSelector | None) -> dict[str, str]:
    return dict(selector.match_labels) if selector is not None else {}
