"""Analyzers of security resources: selectors that select nothing, policies that deny
everything, STRICT mTLS with plaintext callers, the `istio.io/dry-run` annotation."""

from __future__ import annotations

from mesh.resources import (
    AuthorizationPolicySpec,
    PeerAuthenticationSpec,
    RateLimitPolicySpec,
    Resource,
)

from .context import Context, Workload, name_of, selects
from .messages import (
    AUTHORIZATION_DENIES_ALL,
    DRY_RUN_POLICY,
    NO_MATCHING_WORKLOADS_FOUND,
    STRICT_WITH_PLAINTEXT_CALLERS,
    Message,
    message,
)

DRY_RUN_ANNOTATION = "istio.io/dry-run"
# the label of a Gateway API Gateway's proxies (services.config.compile_security)
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"

_Selected = AuthorizationPolicySpec | PeerAuthenticationSpec | RateLimitPolicySpec


def _selector(spec: _Selected) -> dict[str, str]:
    selector = spec.selector
    if selector is None:
        return {}
    labels = getattr(selector, "match_labels", selector)
    return dict(labels) if isinstance(labels, dict) else {}


def selected_workloads(ctx: Context, resource: Resource) -> list[Workload]:
    """The registered instances a policy applies to: its namespace (all of them in the
    root namespace), filtered by its selector."""
    spec = resource.spec
    assert isinstance(spec, _Selected)
    ns = resource.metadata.namespace
    if isinstance(spec, AuthorizationPolicySpec):
        refs = [spec.target_ref] if spec.target_ref is not None else list(spec.target_refs)
        if refs:  # attached by reference, in its own namespace only
            services = {r.name for r in refs if r.kind == "Service"}
            gateways = {r.name for r in refs if r.kind == "Gateway"}
            return [
                w
                for w in ctx.workloads
                if w.namespace == ns
                and (w.service in services or w.labels.get(GATEWAY_NAME_LABEL) in gateways)
            ]
    selector = _selector(spec)
    return [
        w
        for w in ctx.workloads
        if (ns == ctx.root_namespace or w.namespace == ns) and selects(selector, w.labels)
    ]


def _policies(ctx: Context) -> list[Resource]:
    return [r for r in ctx.resources if isinstance(r.spec, _Selected)]


def no_matching_workloads(ctx: Context) -> list[Message]:
    """IST0127: a policy with a selector that no registered instance matches."""
    out: list[Message] = []
    for resource in _policies(ctx):
        assert isinstance(resource.spec, _Selected)
        selector = _selector(resource.spec)
        if not selector or selected_workloads(ctx, resource):
            continue
        labels = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        out.append(
            message(
                NO_MATCHING_WORKLOADS_FOUND,
                name_of(resource),
                f"No matching workloads for this resource with the following labels: {labels}",
            )
        )
    return out


def denies_everything(ctx: Context) -> list[Message]:
    """MW0102: an ALLOW policy without rules (allows nothing, so denies every request
    to what it selects) or a DENY policy with a rule that has no conditions."""
    out: list[Message] = []
    for resource in ctx.of_kind("AuthorizationPolicy"):
        spec = resource.spec
        assert isinstance(spec, AuthorizationPolicySpec)
        action = spec.action or "ALLOW"
        scope = _scope(resource, spec)
        if action == "ALLOW" and not spec.rules:
            out.append(
                message(
                    AUTHORIZATION_DENIES_ALL,
                    name_of(resource),
                    f"ALLOW policy without rules matches no request: every request to {scope} "
                    "is denied (403 RBAC: access denied) unless another ALLOW policy matches.",
                )
            )
        if action == "DENY":
            for i, rule in enumerate(spec.rules):
                if rule.from_ is None and rule.to is None and not rule.when:
                    out.append(
                        message(
                            AUTHORIZATION_DENIES_ALL,
                            name_of(resource),
                            f"DENY rule #{i} has no from, to or when: every request to {scope} "
                            "is denied (403 RBAC: access denied).",
                        )
                    )
    return out


def _scope(resource: Resource, spec: AuthorizationPolicySpec) -> str:
    refs = [spec.target_ref] if spec.target_ref is not None else list(spec.target_refs)
    if refs:
        return "the targets " + ", ".join(f"{r.kind} {r.name}" for r in refs)
    selector = _selector(spec)
    if selector:
        return "the workloads with " + ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    return f"every workload in namespace {resource.metadata.namespace}"


def strict_with_plaintext_callers(ctx: Context) -> list[Message]:
    """MW0103: STRICT mTLS on workloads while instances without a certificate (sidecars
    started without mTLS) are registered: their requests would be refused."""
    plaintext = sorted({f"{w.service}.{w.namespace}" for w in ctx.workloads if not w.mtls})
    if not plaintext:
        return []
    out: list[Message] = []
    for resource in ctx.of_kind("PeerAuthentication"):
        spec = resource.spec
        assert isinstance(spec, PeerAuthenticationSpec)
        modes = [spec.mtls.mode if spec.mtls else None]
        modes += [m.mode for m in (spec.port_level_mtls or {}).values()]
        if "STRICT" not in modes or not selected_workloads(ctx, resource):
            continue
        out.append(
            message(
                STRICT_WITH_PLAINTEXT_CALLERS,
                name_of(resource),
                "STRICT mTLS refuses callers without a certificate, and instances of "
                f"{', '.join(plaintext)} are registered without one: their requests to the "
                "workloads this policy selects fail (403 mTLS required).",
            )
        )
    return out


def dry_run(ctx: Context) -> list[Message]:
    """MW0104: a policy in dry-run is evaluated in shadow and never enforced: worth
    saying, since a user may have left the annotation on by mistake."""
    out: list[Message] = []
    for resource in ctx.of_kind("AuthorizationPolicy"):
        value = resource.metadata.annotations.get(DRY_RUN_ANNOTATION)
        if value != "true":
            continue
        out.append(
            message(
                DRY_RUN_POLICY,
                name_of(resource),
                f"Annotation {DRY_RUN_ANNOTATION}=true: this policy is evaluated in shadow "
                "and never enforced; its would-be decisions are counted in "
                "meshwork_proxy_authz_dry_run_total and recorded in access records "
                "(dry_run_result, dry_run_policy).",
            )
        )
    return out
