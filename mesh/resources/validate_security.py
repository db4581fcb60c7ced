"""Semantic validation of the security kinds: Istio's own rules, plus refusals where
we enforce less than Istio and would otherwise ignore part of a policy.

Follows `pkg/config/validation` of Istio (empty sources and operations, empty values,
IPs and ports, `when` keys, DENY without rules, port-level mTLS only with a selector),
and in addition refuses what the sidecar does not evaluate: `when` keys other than
those below, and `*` anywhere but at the start or end of a value (Istio matches `a*b`
literally; here it is almost certainly a mistake in a policy).

RequestAuthentication follows Istio's checks (an issuer per rule, a valid `jwksUri`,
header names) and refuses a rule without `jwks` or `jwksUri` (we do not discover keys
from the issuer's OpenID configuration) or with both (which one wins is not obvious).
"""

from __future__ import annotations

import ipaddress
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence

from mesh.resources import checks
from mesh.resources.durations import parse_duration_ms
from mesh.resources.errors import Issue, field, item, key, required
from mesh.resources.model import Metadata
from mesh.resources.security import (
    DRY_RUN_ANNOTATION,
    DRY_RUN_VALUES,
    AuthorizationPolicySpec,
    Condition,
    JwtRule,
    MutualTLS,
    Operation,
    PeerAuthenticationSpec,
    PolicyTargetReference,
    RequestAuthenticationSpec,
    Rule,
    Source,
    WorkloadSelector,
)

MTLS_MODES = ("UNSET", "STRICT", "PERMISSIVE", "DISABLE")
AUTHZ_ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
# `when` keys the sidecar evaluates; `request.headers[<name>]` and
# `request.auth.claims[<name>]...` are families
WHEN_KEYS = (
    "source.principal", "source.namespace", "source.ip", "remote.ip", "destination.ip",
    "destination.port", "connection.sni",
    "request.auth.principal", "request.auth.audiences", "request.auth.presenter",
)  # fmt: skip
HEADER_KEY = re.compile(r"request\.headers\[(?P<name>[^\]]*)\]")
# Istio: `request.auth.claims[groups]`, nested `request.auth.claims[a][b]`
CLAIM_KEY = re.compile(r"request\.auth\.claims(?P<path>(?:\[[^\[\]]+\])+)")
SUPPORTED_WHEN_KEYS = ("request.headers[<name>]", "request.auth.claims[<name>]", *WHEN_KEYS)

# a value -> None when acceptable, else what is wrong with it
_Check = Callable[[str], str | None]

_SOURCE_FIELDS = (
    "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals",
    "namespaces", "notNamespaces", "ipBlocks", "notIpBlocks",
    "serviceAccounts", "notServiceAccounts", "remoteIpBlocks", "notRemoteIpBlocks",
)  # fmt: skip
_OPERATION_FIELDS = (
    "methods", "notMethods", "paths", "notPaths", "hosts", "notHosts", "ports", "notPorts",
)  # fmt: skip


def validate_peer_authentication(spec: PeerAuthenticationSpec, path: str = "spec") -> list[Issue]:
    out: list[Issue] = []
    has_selector = _selector(spec.selector, field(path, "selector"), out)
    if spec.mtls is not None:
        _mtls(spec.mtls, field(path, "mtls"), out)
    if spec.port_level_mtls is not None:
        ports_path = field(path, "portLevelMtls")
        if not has_selector:
            # Istio: a mesh or namespace policy cannot have port-level settings
            out.append(
                Issue(
                    ports_path,
                    f"{ports_path} requires {field(path, 'selector')} with matchLabels "
                    "(port-level mTLS applies to selected workloads only)",
                )
            )
        if not spec.port_level_mtls:
            out.append(Issue(ports_path, "must list at least one port"))
        for port, mtls in spec.port_level_mtls.items():
            port_path = key(ports_path, str(port))
            if not isinstance(port, int) or not 1 <= port <= 65535:
                out.append(Issue(port_path, f"port must be between 1 and 65535, got {port!r}"))
            _mtls(mtls, port_path, out)
    return out


def validate_authorization_policy(spec: AuthorizationPolicySpec, path: str = "spec") -> list[Issue]:
    out: list[Issue] = []
    _selector(spec.selector, field(path, "selector"), out)
    _targets(spec.selector, spec.target_ref, spec.target_refs, path, out)
    action_path = field(path, "action")
    provider_path = field(path, "provider")
    if spec.action is not None and spec.action not in AUTHZ_ACTIONS:
        out.append(
            Issue(action_path, f"must be one of {_one_of(AUTHZ_ACTIONS)}, got {spec.action!r}")
        )
    if spec.action == "CUSTOM":
        if spec.provider is None or not spec.provider.name:
            out.append(
                Issue(
                    field(provider_path, "name"),
                    f"{field(provider_path, 'name')} is required with action CUSTOM (an "
                    "extension provider of the mesh's MeshConfig)",
                )
            )
    elif spec.provider is not None:
        out.append(Issue(provider_path, f"{provider_path} is only allowed with action CUSTOM"))
    rules_path = field(path, "rules")
    if spec.action == "DENY" and not spec.rules:
        out.append(
            Issue(
                rules_path,
                "a DENY policy without rules never applies; add an empty rule {} to deny "
                "every request",
            )
        )
    for i, rule in enumerate(spec.rules):
        _rule(rule, item(rules_path, i), out)
    return out


def validate_authorization_metadata(metadata: Metadata, path: str = "metadata") -> list[Issue]:
    """`istio.io/dry-run` must be "true" or "false": a typo such as "True" or "yes"
    would otherwise enforce a policy its author meant only to try."""
    value = metadata.annotations.get(DRY_RUN_ANNOTATION)
    if value is None or value in DRY_RUN_VALUES:
        return []
    annotation_path = key(field(path, "annotations"), DRY_RUN_ANNOTATION)
    allowed = _one_of(tuple(f"'{v}'" for v in DRY_RUN_VALUES))
    return [Issue(annotation_path, f"must be {allowed}, got {value!r}")]


def validate_request_authentication(
    spec: RequestAuthenticationSpec, path: str = "spec"
) -> list[Issue]:
    out: list[Issue] = []
    _selector(spec.selector, field(path, "selector"), out)
    _targets(spec.selector, spec.target_ref, spec.target_refs, path, out)
    for i, rule in enumerate(spec.jwt_rules):
        _jwt_rule(rule, item(field(path, "jwtRules"), i), out)
    return out


# ---------------------------------------------------------------- parts

# (group, kind) a policy may target, as Istio accepts them for sidecars and gateways
GATEWAY_API_GROUP = "gateway.networking.k8s.io"
_TARGET_KINDS = {("", "Service"), ("core", "Service"), (GATEWAY_API_GROUP, "Gateway")}


def _targets(
    selector: WorkloadSelector | None,
    target_ref: PolicyTargetReference | None,
    target_refs: Sequence[PolicyTargetReference],
    path: str,
    out: list[Issue],
) -> None:
    """`selector`, `targetRef` and `targetRefs` exclude each other (Istio); each
    reference names a kind that maps to our workloads, in the policy's namespace."""
    given = [
        name
        for name, value in (
            ("selector", selector), ("targetRef", target_ref), ("targetRefs", target_refs)
        )
        if value
    ]  # fmt: skip
    if len(given) > 1:
        out.append(
            Issue(field(path, given[1]), f"set only one of {', '.join(given)} (Istio: exclusive)")
        )
    refs = [(field(path, "targetRef"), target_ref)] if target_ref is not None else []
    refs += [(item(field(path, "targetRefs"), i), r) for i, r in enumerate(target_refs)]
    for ref_path, ref in refs:
        if not ref.name:
            out.append(required(field(ref_path, "name")))
        if (ref.group, ref.kind) not in _TARGET_KINDS:
            out.append(
                Issue(
                    field(ref_path, "kind"),
                    f'a policy can target a Service (group "") or a Gateway (group '
                    f"{GATEWAY_API_GROUP}), got kind {ref.kind!r} in group {ref.group!r}",
                )
            )
        if ref.namespace:
            out.append(
                Issue(
                    field(ref_path, "namespace"),
                    "cross-namespace references are not supported: leave it empty (the "
                    f"policy's own namespace), got {ref.namespace!r}",
                )
            )


def _jwt_rule(rule: JwtRule, path: str, out: list[Issue]) -> None:
    if not rule.issuer:
        out.append(required(field(path, "issuer")))
    _each(rule.audiences, field(path, "audiences"), _non_empty, out)
    uri_path, jwks_path = field(path, "jwksUri"), field(path, "jwks")
    if rule.jwks and rule.jwks_uri:
        out.append(Issue(path, f"set only one of {jwks_path} or {uri_path}"))
    elif not rule.jwks and not rule.jwks_uri and rule.issuer:
        # keys by OIDC discovery: the issuer must be a URL to find them under
        if _jwks_uri(rule.issuer) is not None:
            out.append(
                Issue(
                    field(path, "issuer"),
                    f"must be an https:// (or http://) URL with a host when neither "
                    f"{jwks_path} nor {uri_path} is set (the keys are discovered from the "
                    f"issuer's OpenID configuration), got {rule.issuer!r}",
                )
            )
    if rule.jwks_uri:
        _add(out, uri_path, _jwks_uri(rule.jwks_uri))
    if rule.jwks:
        _add(out, jwks_path, _inline_jwks(rule.jwks))
    headers_path = field(path, "fromHeaders")
    for j, header in enumerate(rule.from_headers):
        entry = item(headers_path, j)
        if not header.name:
            out.append(required(field(entry, "name")))
        else:
            _add(out, field(entry, "name"), checks.header_name(header.name))
        _add(out, field(entry, "prefix"), checks.header_value(header.prefix))
    _each(rule.from_params, field(path, "fromParams"), _non_empty, out)
    _each(rule.from_cookies, field(path, "fromCookies"), _cookie_name, out)
    if rule.output_payload_to_header:
        _add(
            out,
            field(path, "outputPayloadToHeader"),
            checks.header_name(rule.output_payload_to_header),
        )
    claims_path = field(path, "outputClaimToHeaders")
    for j, claim in enumerate(rule.output_claim_to_headers):
        entry = item(claims_path, j)
        if not claim.header:
            out.append(required(field(entry, "header")))
        else:
            _add(out, field(entry, "header"), checks.header_name(claim.header))
        if not claim.claim:
            out.append(required(field(entry, "claim")))
    if rule.timeout is not None:
        timeout_path = field(path, "timeout")
        try:
            if parse_duration_ms(rule.timeout) <= 0:
                out.append(Issue(timeout_path, f"must be positive, got {rule.timeout!r}"))
        except ValueError as e:
            out.append(Issue(timeout_path, str(e)))


def _jwks_uri(value: str) -> str | None:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        return f"must be an https:// (or http://) URL with a host, got {value!r}"
    return None


def _inline_jwks(value: str) -> str | None:
    try:
        document = json.loads(value)
    except ValueError as e:
        return f"must be a JSON Web Key Set (JSON with a 'keys' list): {e}"
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys:
        return "must be a JSON Web Key Set: an object with a non-empty 'keys' list"
    for i, jwk in enumerate(keys):
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kty"), str):
            return f"keys[{i}] must be a JSON Web Key (an object with 'kty')"
    return None


def _non_empty(value: str) -> str | None:
    return None if value else "must not be empty"


_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _cookie_name(value: str) -> str | None:
    if not _COOKIE_NAME.fullmatch(value):
        return f"must be a cookie name (an RFC 6265 token), got {value!r}"
    return None


def _selector(selector: WorkloadSelector | None, path: str, out: list[Issue]) -> bool:
    """Checks the labels; True when the selector selects (Istio: non-empty matchLabels)."""
    if selector is None:
        return False
    labels_path = field(path, "matchLabels")
    for name, value in selector.match_labels.items():
        _add(out, key(labels_path, name), checks.label_key(name) or checks.label_value(value))
    return bool(selector.match_labels)


def _mtls(mtls: MutualTLS, path: str, out: list[Issue]) -> None:
    if mtls.mode is not None and mtls.mode not in MTLS_MODES:
        out.append(
            Issue(field(path, "mode"), f"must be one of {_one_of(MTLS_MODES)}, got {mtls.mode!r}")
        )


def _rule(rule: Rule, path: str, out: list[Issue]) -> None:
    from_path = field(path, "from")
    if rule.from_ is not None and not rule.from_:
        out.append(Issue(from_path, "must not be empty (omit it to match any source)"))
    for j, entry in enumerate(rule.from_ or ()):
        source_path = field(item(from_path, j), "source")
        if entry.source is None:
            out.append(required(source_path))
        else:
            _source(entry.source, source_path, out)
    to_path = field(path, "to")
    if rule.to is not None and not rule.to:
        out.append(Issue(to_path, "must not be empty (omit it to match any operation)"))
    for j, target in enumerate(rule.to or ()):
        operation_path = field(item(to_path, j), "operation")
        if target.operation is None:
            out.append(required(operation_path))
        else:
            _operation(target.operation, operation_path, out)
    for j, condition in enumerate(rule.when):
        _condition(condition, item(field(path, "when"), j), out)


def _source(source: Source, path: str, out: list[Issue]) -> None:
    values = dict(
        zip(
            _SOURCE_FIELDS,
            (
                source.principals, source.not_principals,
                source.request_principals, source.not_request_principals,
                source.namespaces, source.not_namespaces,
                source.ip_blocks, source.not_ip_blocks,
                source.service_accounts, source.not_service_accounts,
                source.remote_ip_blocks, source.not_remote_ip_blocks,
            ),
            strict=True,
        )
    )  # fmt: skip
    _at_least_one(values, path, out)
    for name in (
        "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals",
        "namespaces", "notNamespaces",
    ):  # fmt: skip
        _each(values[name], field(path, name), _pattern, out)
    for name in ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"):
        _each(values[name], field(path, name), _ip_or_cidr, out)
    for name in ("serviceAccounts", "notServiceAccounts"):
        _each(values[name], field(path, name), _service_account, out)


def _operation(operation: Operation, path: str, out: list[Issue]) -> None:
    values = dict(
        zip(
            _OPERATION_FIELDS,
            (
                operation.methods, operation.not_methods,
                operation.paths, operation.not_paths,
                operation.hosts, operation.not_hosts,
                operation.ports, operation.not_ports,
            ),
            strict=True,
        )
    )  # fmt: skip
    _at_least_one(values, path, out)
    for name in ("methods", "notMethods", "hosts", "notHosts"):
        _each(values[name], field(path, name), _pattern, out)
    for name in ("paths", "notPaths"):
        _each(values[name], field(path, name), _path_pattern, out)
    for name in ("ports", "notPorts"):
        _each(values[name], field(path, name), _port, out)


def _condition(condition: Condition, path: str, out: list[Issue]) -> None:
    key_path = field(path, "key")
    name = condition.key
    check = _pattern
    if not name:
        out.append(Issue(key_path, "must not be empty"))
        return
    header = HEADER_KEY.fullmatch(name)
    if header is not None:
        problem = checks.header_name(header["name"])
        if problem is not None:
            out.append(Issue(key_path, f"header in {name!r} {problem}"))
    elif name.startswith("request.headers"):
        out.append(Issue(key_path, f"must be request.headers[<name>], got {name!r}"))
    elif CLAIM_KEY.fullmatch(name) is not None:
        pass
    elif name.startswith("request.auth.claims"):
        out.append(
            Issue(key_path, f"must be request.auth.claims[<name>] (nested: [a][b]), got {name!r}")
        )
    elif name not in WHEN_KEYS:
        out.append(
            Issue(
                key_path,
                f"{key_path} {name!r} is not supported "
                f"(supported keys: {', '.join(SUPPORTED_WHEN_KEYS)})",
            )
        )
        return
    elif name in ("source.ip", "remote.ip", "destination.ip"):
        check = _ip_or_cidr
    elif name == "destination.port":
        check = _port
    if not condition.values and not condition.not_values:
        out.append(Issue(path, "must set values or notValues"))
    _each(condition.values, field(path, "values"), check, out)
    _each(condition.not_values, field(path, "notValues"), check, out)


# ---------------------------------------------------------------- single values


def _pattern(value: str) -> str | None:
    """Istio's string match: exact, `*`, prefix `abc*` or suffix `*abc`."""
    if not value:
        return "must not be empty"
    stars = value.count("*")
    if stars == 0 or value == "*":
        return None
    if stars == 1 and (value.startswith("*") or value.endswith("*")):
        return None
    return (
        "must be an exact value, '*', a prefix ('abc*') or a suffix ('*abc'): '*' is only "
        f"allowed at the start or the end, got {value!r}"
    )


def _service_account(value: str) -> str | None:
    """Istio's `<namespace>/<service account>`, no wildcards."""
    namespace, slash, account = value.partition("/")
    if (
        not slash
        or checks.dns_label(namespace) is not None
        or checks.dns_subdomain(account) is not None
    ):
        return (
            "must be <namespace>/<service account> without wildcards "
            f"(e.g. 'default/sleep'), got {value!r}"
        )
    return None


_TEMPLATE_LITERAL = re.compile(r"[A-Za-z0-9\-._~%!$&'()+,;:@=]*")


def _path_pattern(value: str) -> str | None:
    """Istio's patterns, or a path template (Envoy's URI template): `{*}` one path
    segment, `{**}` any number of segments, each a whole segment, `{**}` last."""
    if "{" not in value and "}" not in value:
        return _pattern(value)
    problem = (
        "must be a path template: start with '/', use {*} and {**} as whole segments, "
        f"{{**}} as the last operator, and no other '*', '{{' or '}}', got {value!r}"
    )
    if not value.startswith("/"):
        return problem
    segments = value.split("/")[1:]
    operators = [s for s in segments if s in ("{*}", "{**}")]
    for segment in segments:
        if segment in ("{*}", "{**}"):
            continue
        if any(c in segment for c in "*{}"):
            return problem
        if not _TEMPLATE_LITERAL.fullmatch(segment):
            # Envoy's URI template accepts only RFC 3986 path characters around them
            return (
                "must use only letters, digits and -._~%!$&'()+,;:@= in the segments of a "
                f"path template, got {value!r}"
            )
    if "{**}" in operators[:-1]:
        return problem
    return None


def _ip_or_cidr(value: str) -> str | None:
    """An IP address or a CIDR range; host bits may be set (`10.1.2.3/16`), as in Istio."""
    address, slash, bits = value.partition("/")
    try:
        ipaddress.ip_address(address)
        if slash:
            if not (bits.isascii() and bits.isdigit()):
                raise ValueError(bits)
            ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"must be an IP address or a CIDR range (e.g. 10.1.0.0/16), got {value!r}"
    return None


def _port(value: str) -> str | None:
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= 65535):
        return f"must be a port number between 1 and 65535 (as a string), got {value!r}"
    return None


# ---------------------------------------------------------------- helpers


def _at_least_one(values: Mapping[str, tuple[str, ...]], path: str, out: list[Issue]) -> None:
    if not any(values.values()):
        out.append(Issue(path, f"must set at least one of {_one_of(tuple(values))}"))


def _each(values: Iterable[str], path: str, check: _Check, out: list[Issue]) -> None:
    for i, value in enumerate(values):
        _add(out, item(path, i), check(value))


def _add(out: list[Issue], path: str, problem: str | None) -> None:
    if problem is not None:
        out.append(Issue(path, problem))


def _one_of(values: tuple[str, ...]) -> str:
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"
