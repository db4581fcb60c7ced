"""Why inbound policy allows or refuses a request: the verdicts, with reasons.

`explain_authorization` asks the workload's `Authorizer` for its `Decision` (the
verdict the sidecar would reach) and, for every policy that applies, which rule
matched or, for each rule, the first part that did not (`from`, `to`, `when`). The
reasons reuse the authorizer's compiled matchers (`_SourceMatch`, `_OperationMatch`,
`_ConditionMatch`) field by field in the order they test them; whether a policy
matched is always the matcher's own answer.

`explain_mtls` gives the mode `effective_mtls` resolves and the policy it came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from mesh.compiled import InboundPolicy, PeerAuthn

from .authz import (
    Authorizer,
    Decision,
    RequestFacts,
    _ConditionMatch,
    _OperationMatch,
    _PolicyMatch,
    _Request,
    _RuleMatch,
    _SourceMatch,
)
from .peer import _SCOPE_ORDER, EffectiveMode, _oldest, effective_mtls


class PolicyVerdict(NamedTuple):
    """One AuthorizationPolicy applying to the workload: `matched` is the matcher's
    answer; `why` names the rule that matched, or why each rule did not."""

    policy: str
    action: str
    matched: bool
    why: tuple[str, ...]


class AuthzExplanation(NamedTuple):
    decision: Decision
    policies: tuple[PolicyVerdict, ...]


class MtlsExplanation(NamedTuple):
    """`source` is "<scope> policy <ns>/<name>" or "mesh default"."""

    mode: EffectiveMode
    source: str


def _source_miss(source: _SourceMatch, request: _Request) -> str:
    facts = request.facts
    principal = facts.principal
    if source.principals is not None and not (principal and source.principals.matches(principal)):
        who = repr(principal) if principal else "none (plaintext caller)"
        return f"principals: caller principal {who} is not listed"
    if source.not_principals is not None and principal and source.not_principals.matches(principal):
        return f"notPrincipals: caller principal {principal!r} is excluded"
    account = principal.partition("/")[2] if principal else ""
    if source.service_accounts is not None and account not in source.service_accounts:
        return f"serviceAccounts: caller {account or 'none (plaintext caller)'!r} is not listed"
    if source.not_service_accounts is not None and account in source.not_service_accounts:
        return f"notServiceAccounts: caller {account!r} is excluded"
    user = facts.auth.principal if facts.auth is not None else ""
    if source.request_principals is not None and not (
        user and source.request_principals.matches(user)
    ):
        who = repr(user) if user else "none (no valid JWT)"
        return f"requestPrincipals: request principal {who} is not listed"
    if source.not_request_principals is not None and user:
        if source.not_request_principals.matches(user):
            return f"notRequestPrincipals: request principal {user!r} is excluded"
    namespace = facts.namespace
    if source.namespaces is not None and not (namespace and source.namespaces.matches(namespace)):
        who = repr(namespace) if namespace else "none (plaintext caller)"
        return f"namespaces: caller namespace {who} is not listed"
    if source.not_namespaces is not None and namespace and source.not_namespaces.matches(namespace):
        return f"notNamespaces: caller namespace {namespace!r} is excluded"
    if source.ip_blocks is not None and not source.ip_blocks.contains(request.ip()):
        return f"ipBlocks: caller address {facts.source_ip or 'unknown'!r} is not listed"
    if source.not_ip_blocks is not None and source.not_ip_blocks.contains(request.ip()):
        return f"notIpBlocks: caller address {facts.source_ip!r} is excluded"
    client = facts.remote_ip or facts.source_ip
    if source.remote_ip_blocks is not None:
        if not source.remote_ip_blocks.contains(request.remote_ip()):
            return f"remoteIpBlocks: client address {client or 'unknown'!r} is not listed"
    if source.not_remote_ip_blocks is not None:
        if source.not_remote_ip_blocks.contains(request.remote_ip()):
            return f"notRemoteIpBlocks: client address {client!r} is excluded"
    return ""


def _operation_miss(operation: _OperationMatch, request: _Request) -> str:
    method = request.facts.method
    if operation.methods is not None and not operation.methods.matches(method):
        return f"methods: {method!r} is not listed"
    if operation.not_methods is not None and operation.not_methods.matches(method):
        return f"notMethods: {method!r} is excluded"
    if operation.paths is not None and not operation.paths.matches(request.path):
        return f"paths: {request.path!r} is not listed"
    if operation.not_paths is not None and operation.not_paths.matches(request.path):
        return f"notPaths: {request.path!r} is excluded"
    hosts = request.hosts()
    if operation.hosts is not None and not any(map(operation.hosts.matches, hosts)):
        return f"hosts: {request.facts.host!r} is not listed"
    if operation.not_hosts is not None and any(map(operation.not_hosts.matches, hosts)):
        return f"notHosts: {request.facts.host!r} is excluded"
    if operation.ports is not None and request.port not in operation.ports:
        return f"ports: {request.port} is not listed"
    if operation.not_ports is not None and request.port in operation.not_ports:
        return f"notPorts: {request.port} is excluded"
    return ""


def _condition_miss(index: int, condition: _ConditionMatch, request: _Request) -> str:
    if condition.holds(request):
        return ""
    if condition.kind == "":
        return f"when[{index}]: condition cannot be evaluated (counts as not holding)"
    if condition.kind == "header":
        sent = request.facts.headers.get(condition.header)
        state = "absent" if sent is None else "value not accepted"
        return f"when[{index}] request.headers[{condition.header}]: {state}"
    return f"when[{index}] {condition.kind}: value not accepted"


def _rule_miss(rule: _RuleMatch, request: _Request) -> str:
    if rule.sources:
        misses = [_source_miss(s, request) for s in rule.sources]
        if all(misses):
            return "from: " + "; ".join(misses)
    if rule.operations:
        misses = [_operation_miss(o, request) for o in rule.operations]
        if all(misses):
            return "to: " + "; ".join(misses)
    for i, condition in enumerate(rule.conditions):
        miss = _condition_miss(i, condition, request)
        if miss:
            return miss
    return ""


def _policy_verdict(policy: _PolicyMatch, action: str, request: _Request) -> PolicyVerdict:
    matched = policy.matches(request)
    if not policy.rules:
        return PolicyVerdict(policy.ref, action, matched, ("has no rules: matches no request",))
    why: list[str] = []
    for i, rule in enumerate(policy.rules):
        if rule.matches(request):
            why.append(f"rules[{i}] matches")
            break
        miss = _rule_miss(rule, request)
        why.append(f"rules[{i}] {miss or 'does not match'}")
    return PolicyVerdict(policy.ref, action, matched, tuple(why))


def explain_authorization(
    policy: InboundPolicy | None, labels: Mapping[str, str], facts: RequestFacts
) -> AuthzExplanation:
    """The decision the workload with `labels` reaches for `facts`, and every
    applicable policy's verdict in evaluation order (CUSTOM: whether the external
    authorizer is asked; AUDIT, DENY, ALLOW), then the
    dry-run policies' (evaluated in shadow: they never change the decision)."""
    authorizer = Authorizer.build(policy, labels)
    decision = authorizer.decide(facts)
    request = _Request(facts)
    enforced = authorizer._http
    verdicts = [
        _policy_verdict(p, action, request)
        for action, group in (
            ("CUSTOM", enforced.custom),
            ("AUDIT", enforced.audit),
            ("DENY", enforced.deny),
            ("ALLOW", enforced.allow),
        )
        for p in group
    ]
    # dry-run policies never decide; shown after the enforced ones, marked as such
    shadow = authorizer._shadow_http
    if shadow is not None:
        verdicts += [
            _policy_verdict(p, f"{action} (dry-run)", request)
            for action, group in (
                ("AUDIT", shadow.audit),
                ("DENY", shadow.deny),
                ("ALLOW", shadow.allow),
            )
            for p in group
        ]
    return AuthzExplanation(decision, tuple(verdicts))


def explain_mtls(
    policies: Sequence[PeerAuthn], labels: Mapping[str, str], port: int
) -> MtlsExplanation:
    """The mode `effective_mtls` resolves and the (most specific, non-UNSET) policy
    that set it."""
    mode = effective_mtls(policies, labels, port)
    for scope in _SCOPE_ORDER:
        candidates = [
            p
            for p in policies
            if p.scope == scope
            and (scope != "workload" or all(labels.get(k) == v for k, v in p.selector.items()))
        ]
        chosen = _oldest(candidates)
        if chosen is None:
            continue
        ref = f"{chosen.namespace}/{chosen.name}"
        if scope == "workload" and chosen.port_modes.get(port, "UNSET") != "UNSET":
            return MtlsExplanation(mode, f"workload policy {ref} (port {port})")
        if chosen.mode != "UNSET":
            return MtlsExplanation(mode, f"{scope} policy {ref}")
    return MtlsExplanation(mode, "mesh default (no PeerAuthentication sets a mode)")
