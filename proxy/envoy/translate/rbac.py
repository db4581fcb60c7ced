"""AuthorizationPolicy -> Envoy RBAC, with Istio's translation rules and the Python
sidecar's semantics (`proxy.policy.authz`).

One RBAC filter per action, in Istio's order: AUDIT (Envoy action LOG), DENY, ALLOW.
No ALLOW policy: no ALLOW filter (everything not denied is allowed); ALLOW policies
without rules leave an ALLOW filter with no policy, which denies everything.

- `source.principal` is the peer certificate's URI SAN without `spiffe://` (Istio's
  form `td/ns/N/sa/SA`); patterns are matched against the SAN with `spiffe://`
  prepended. `*` means "any authenticated caller": a plaintext caller has no principal
  and matches no pattern.
- `namespaces` become regexes on the principal's `/ns/<N>/` segment.
- `ipBlocks` compare the direct peer address (`direct_remote_ip`), as the Python
  sidecar compares the connection's address.
- `ports` and `destination.port` are decided here: the port of the listener (the
  workload's app port) is known.
- End-user identity (`requestPrincipals`, `request.auth.*`) is matched on the JWT
  payload `jwt_authn` leaves in dynamic metadata: a principal `<iss>/<sub>` becomes
  `iss` and `sub` matchers, split at one of the configured issuers (only their tokens
  validate), claims match as a string or as any element of a list (Istio's rule).
  A suffix pattern whose tail spans the issuer (`*a/b`) cannot be split: refused.
- On TCP, a rule using HTTP-only fields (methods, paths, hosts, request headers,
  request principals and `request.auth.*`)
  never matches in an ALLOW policy and has those fields removed in DENY/AUDIT ones
  (Istio's rule: either way, less is allowed).
- Entries the Python sidecar cannot evaluate (an unknown `when` key, a condition with
  no values, an unparseable CIDR) fail closed exactly as there: in ALLOW they match
  nothing, in DENY/AUDIT they match everything.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence

import msgspec

from mesh.compiled import AuthzPolicy, AuthzRule, Condition, InboundPolicy, Operation, Source

from . import ext_authz
from .model import TranslationError
from .protos import HTTP_RBAC, NETWORK_RBAC, Json, typed

ANY: Json = {"any": True}
NOTHING: Json = {"notRule": {"any": True}}
NOBODY: Json = {"notId": {"any": True}}
_HEADER_KEY = re.compile(r"request\.headers\[([^\[\]]+)\]")
_CLAIM_KEY = re.compile(r"request\.auth\.claims((?:\[[^\[\]]+\])+)")
_AUTH_KEYS = ("request.auth.principal", "request.auth.audiences", "request.auth.presenter")
JWT_FILTER = "envoy.filters.http.jwt_authn"
_ACTIONS = (("AUDIT", "LOG"), ("DENY", "DENY"), ("ALLOW", "ALLOW"))


def selected(policy: InboundPolicy | None, labels: Mapping[str, str]) -> list[AuthzPolicy]:
    """The policies whose selector is empty or a subset of `labels`."""
    if policy is None:
        return []
    return [
        p for p in policy.authorization if all(labels.get(k) == v for k, v in p.selector.items())
    ]


def rbac_filters(
    policies: Sequence[AuthzPolicy],
    port: int,
    *,
    tcp: bool,
    stat_prefix: str,
    issuers: Sequence[str] = (),
    inbound: InboundPolicy | None = None,
    namespace: str = "",
) -> list[Json]:
    """The RBAC filters (HTTP, or network for `tcp`) enforcing `policies` on `port`;
    `issuers` are those of the RequestAuthentications in force (`jwt_authn`). CUSTOM
    policies become the ext_authz filters first (`ext_authz`; their providers from
    `inbound`, hosts resolved in `namespace`); on TCP they deny what they match, as
    the Python sidecar does (their authorizer speaks HTTP).

    Policies annotated `istio.io/dry-run` are never enforced: they become filters with
    `shadow_rules` only (as Istio translates them), whose would-be result Envoy writes
    to dynamic metadata (`<prefix>shadow_engine_result`,
    `<prefix>shadow_effective_policy_id`) for the access log to carry. AUDIT has no
    shadow form (it decides nothing), nor has CUSTOM (Istio's dry-run skips it)."""
    dry_run = [p for p in policies if p.dry_run and p.action in ("DENY", "ALLOW")]
    policies = [p for p in policies if not p.dry_run]
    out: list[Json] = []
    # TCP has no X-Forwarded-For: its client is the peer
    trusted = inbound.num_trusted_proxies if inbound is not None and not tcp else 0
    if tcp:
        policies = [
            msgspec.structs.replace(p, action="DENY") if p.action == "CUSTOM" else p
            for p in policies
        ]
    else:
        policies, custom, provider = ext_authz.split_custom(policies, inbound)
        shadow: dict[str, Json] = {}
        for p in custom:
            for i, rule in enumerate(p.rules):
                built = _policy(
                    rule, port, tcp=False, lenient=True, issuers=issuers, trusted_proxies=trusted
                )
                if built is not None:
                    name = f"{ext_authz.POLICY_PREFIX}-ns[{p.namespace}]-policy[{p.name}]-rule[{i}]"
                    shadow[name] = built
        out.extend(ext_authz.ext_authz_filters(custom, provider, namespace, shadow))
    for action, envoy_action in _ACTIONS:
        chosen = [p for p in policies if p.action == action]
        if not chosen:
            continue
        lenient = action != "ALLOW"
        rules: dict[str, Json] = {}
        for p in chosen:
            for i, rule in enumerate(p.rules):
                built = _policy(
                    rule, port, tcp=tcp, lenient=lenient, issuers=issuers, trusted_proxies=trusted
                )
                if built is not None:
                    rules[f"{p.namespace}/{p.name}[{i}]"] = built
        body: Json = {"rules": {"action": envoy_action, "policies": rules}}
        if tcp:
            body["statPrefix"] = f"{stat_prefix}_{action.lower()}_"
        out.append(_filter(body, tcp=tcp))
    for action, envoy_action in _ACTIONS:
        chosen = [p for p in dry_run if p.action == action]
        if not chosen:
            continue
        shadow_rules: dict[str, Json] = {}
        for p in chosen:
            for i, rule in enumerate(p.rules):
                built = _policy(
                    rule,
                    port,
                    tcp=tcp,
                    lenient=action != "ALLOW",
                    issuers=issuers,
                    trusted_proxies=trusted,
                )
                if built is not None:
                    shadow_rules[f"{p.namespace}/{p.name}[{i}]"] = built
        prefix = f"{stat_prefix}_dry_run_{action.lower()}_"
        body = {
            "shadowRules": {"action": envoy_action, "policies": shadow_rules},
            "shadowRulesStatPrefix": prefix,
        }
        if tcp:
            body["statPrefix"] = prefix
        out.append(_filter(body, tcp=tcp))
    return out


def _filter(body: Json, *, tcp: bool) -> Json:
    if tcp:
        return {"name": "envoy.filters.network.rbac", "typedConfig": typed(NETWORK_RBAC, body)}
    return {"name": "envoy.filters.http.rbac", "typedConfig": typed(HTTP_RBAC, body)}


def _policy(
    rule: AuthzRule,
    port: int,
    *,
    tcp: bool,
    lenient: bool,
    issuers: Sequence[str] = (),
    trusted_proxies: int = 0,
) -> Json | None:
    """One rule as an Envoy Policy: some source, some operation and every `when`.
    None when the rule can never match (left out: it allows or denies nothing)."""
    if tcp and _http_only(rule):
        if not lenient:
            return None
        rule = _without_http_fields(rule)
    permissions: list[Json] = []
    principals: list[Json] = []
    if rule.operations:
        ops = [op for op in (_operation(o, port) for o in rule.operations) if op is not None]
        if not ops:
            return None
        permissions.append(_or("orRules", ops))
    if rule.sources:
        principals.append(
            _or("orIds", [_source(s, lenient, issuers, trusted_proxies) for s in rule.sources])
        )
    for condition in rule.when:
        kind, matcher = _condition(condition, port, lenient, issuers, trusted_proxies)
        (permissions if kind == "permission" else principals).append(matcher)
    return {
        "permissions": [_and("andRules", permissions) if permissions else ANY],
        "principals": [_and("andIds", principals) if principals else ANY],
    }


def _or(key: str, items: list[Json]) -> Json:
    return items[0] if len(items) == 1 else {key: {"rules" if key == "orRules" else "ids": items}}


def _and(key: str, items: list[Json]) -> Json:
    return items[0] if len(items) == 1 else {key: {"rules" if key == "andRules" else "ids": items}}


def _http_only_key(key: str) -> bool:
    return bool(_HEADER_KEY.fullmatch(key) or _CLAIM_KEY.fullmatch(key) or key in _AUTH_KEYS)


def _http_only(rule: AuthzRule) -> bool:
    ops = any(
        o.methods or o.not_methods or o.paths or o.not_paths or o.hosts or o.not_hosts
        for o in rule.operations
    )
    users = any(s.request_principals or s.not_request_principals for s in rule.sources)
    return ops or users or any(_http_only_key(c.key) for c in rule.when)


def _without_http_fields(rule: AuthzRule) -> AuthzRule:
    return AuthzRule(
        sources=tuple(
            msgspec.structs.replace(s, request_principals=(), not_request_principals=())
            for s in rule.sources
        ),
        operations=tuple(Operation(ports=o.ports, not_ports=o.not_ports) for o in rule.operations),
        when=tuple(c for c in rule.when if not _http_only_key(c.key)),
    )


# ---------------------------------------------------------------- string patterns


def _pattern(value: str, *, prefix: str = "") -> Json:
    """Istio's pattern rules (`*`, `*suffix`, `prefix*`, exact) as a StringMatcher on
    `prefix + value`; `*` alone means any non-empty value."""
    if value == "*":
        return {"safeRegex": {"regex": re.escape(prefix) + ".+"}}
    if value.startswith("*"):
        return {"suffix": value[1:]}
    if value.endswith("*"):
        return {"prefix": prefix + value[:-1]}
    return {"exact": prefix + value}


def _payload(path: Sequence[str], value: Json) -> Json:
    """A principal matching the validated JWT payload at `path` (jwt_authn metadata)."""
    return {
        "metadata": {
            "filter": JWT_FILTER,
            "path": [{"key": "payload"}, *({"key": k} for k in path)],
            "value": value,
        }
    }


def _claim(path: Sequence[str], value: str, *, lists: bool = True) -> Json:
    """A claim holding `value` (a pattern): as a string, or as an element of a list."""
    string = _payload(path, {"stringMatch": _pattern(value)})
    if not lists:
        return string
    listed = _payload(path, {"listMatch": {"oneOf": {"stringMatch": _pattern(value)}}})
    return {"orIds": {"ids": [string, listed]}}


def _request_principal(value: str, issuers: Sequence[str]) -> Json:
    """`<iss>/<sub>` patterns as `iss` and `sub` matchers (module doc)."""
    if value == "*":
        return _payload(["iss"], {"presentMatch": True})
    options: list[Json] = []
    if value.startswith("*"):
        tail = value[1:]
        if "/" not in tail:
            return _payload(["sub"], {"stringMatch": {"suffix": tail}})
        if tail.startswith("/") and "/" not in tail[1:] and tail[1:]:
            exact = _payload(["sub"], {"stringMatch": {"exact": tail[1:]}})
            suffix = _payload(["sub"], {"stringMatch": {"suffix": tail}})
            return {"orIds": {"ids": [exact, suffix]}}
        raise TranslationError(
            "AuthorizationPolicy", "requestPrincipals", value,
            "a suffix spanning the issuer and the subject is not translated to Envoy",
        )  # fmt: skip
    prefix = value.endswith("*")
    text = value[:-1] if prefix else value
    for issuer in issuers:
        iss = _payload(["iss"], {"stringMatch": {"exact": issuer}})
        head = issuer + "/"
        if prefix and head.startswith(text):
            options.append(iss)
        elif text.startswith(head):
            rest = text[len(head) :]
            kind = "prefix" if prefix else "exact"
            sub = _payload(["sub"], {"stringMatch": {kind: rest}})
            options.append({"andIds": {"ids": [iss, sub]}})
    # no configured issuer can produce such a principal: nobody matches
    return _or("orIds", options) if options else NOBODY


def _principal(value: str) -> Json:
    return {"authenticated": {"principalName": _pattern(value, prefix="spiffe://")}}


def _namespace(value: str) -> Json:
    if value == "*":
        ns = "[^/]+"
    elif value.startswith("*"):
        ns = "[^/]*" + re.escape(value[1:])
    elif value.endswith("*"):
        ns = re.escape(value[:-1]) + "[^/]*"
    else:
        ns = re.escape(value)
    regex = f"spiffe://[^/]+/ns/{ns}/sa/[^/]+"
    return {"authenticated": {"principalName": {"safeRegex": {"regex": regex}}}}


def _host(value: str) -> Json:
    """`hosts`: the authority compared case-insensitively, with or without its port."""
    value = value.lower()
    port = "(?::[0-9]+)?"
    if value == "*":
        regex = ".+"
    elif value.startswith("*"):
        regex = "(?i).*" + re.escape(value[1:]) + port
    elif value.endswith("*"):
        regex = "(?i)" + re.escape(value[:-1]) + ".*"
    else:
        regex = "(?i)" + re.escape(value) + port
    return {"header": {"name": ":authority", "stringMatch": {"safeRegex": {"regex": regex}}}}


def _method(value: str) -> Json:
    return {"header": {"name": ":method", "stringMatch": _pattern(value)}}


URI_TEMPLATE = (
    "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig"
)


def _path(value: str) -> Json:
    if "{" in value:
        # Istio: a path with `{*}`/`{**}` is an Envoy URI template, whose operators
        # are written bare (`{name}` would be a variable)
        template = value.replace("{**}", "**").replace("{*}", "*")
        return {
            "uriTemplate": {
                "name": "envoy.path.match.uri_template.uri_template_matcher",
                "typedConfig": typed(URI_TEMPLATE, {"pathTemplate": template}),
            }
        }
    return {"urlPath": {"path": _pattern(value)}}


def _service_account(value: str) -> Json:
    namespace, _, account = value.partition("/")
    regex = f"spiffe://[^/]+/ns/{re.escape(namespace)}/sa/{re.escape(account)}"
    return {"authenticated": {"principalName": {"safeRegex": {"regex": regex}}}}


def _cidrs(
    entries: Sequence[str], *, poisoned_matches: bool, kind: str = "directRemoteIp"
) -> list[Json] | None:
    """CIDR ranges; None when an unparseable entry makes the field match every
    address (`poisoned_matches`), else unparseable entries are skipped."""
    out = []
    for entry in entries:
        try:
            net = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            if poisoned_matches:
                return None
            continue
        out.append({kind: {"addressPrefix": str(net.network_address), "prefixLen": net.prefixlen}})
    return out


def _ip_field(
    entries: Sequence[str], lenient: bool, *, negated: bool, kind: str = "directRemoteIp"
) -> Json:
    """`ipBlocks` (or `notIpBlocks` when `negated`) as one principal; `kind`
    `remoteIp` for `remoteIpBlocks` (the XFF client past the trusted hops)."""
    # an unparseable entry makes "contains" true in DENY/AUDIT for ipBlocks and in
    # ALLOW for notIpBlocks (see the module doc)
    ranges = _cidrs(entries, poisoned_matches=lenient != negated, kind=kind)
    if ranges is None:
        return NOBODY if negated else ANY
    if not ranges:
        return ANY if negated else NOBODY
    matched = _or("orIds", ranges)
    return {"notId": matched} if negated else matched


def _destination_ip(entries: Sequence[str], lenient: bool, *, negated: bool) -> Json:
    """`destination.ip` values (notValues when `negated`) as one permission, with
    `_ip_field`'s rules for unparseable entries."""
    ranges = _cidrs(entries, poisoned_matches=lenient != negated, kind="destinationIp")
    if ranges is None:
        return NOTHING if negated else ANY
    if not ranges:
        return ANY if negated else NOTHING
    matched = _or("orRules", ranges)
    return {"notRule": matched} if negated else matched


# ---------------------------------------------------------------- rule parts


def _source(
    source: Source, lenient: bool, issuers: Sequence[str] = (), trusted_proxies: int = 0
) -> Json:
    parts: list[Json] = []
    if source.request_principals:
        parts.append(
            _or("orIds", [_request_principal(p, issuers) for p in source.request_principals])
        )
    if source.not_request_principals:
        matched = [_request_principal(p, issuers) for p in source.not_request_principals]
        parts.append({"notId": _or("orIds", matched)})
    if source.principals:
        parts.append(_or("orIds", [_principal(p) for p in source.principals]))
    if source.not_principals:
        parts.append({"notId": _or("orIds", [_principal(p) for p in source.not_principals])})
    if source.service_accounts:
        parts.append(_or("orIds", [_service_account(a) for a in source.service_accounts]))
    if source.not_service_accounts:
        matched = [_service_account(a) for a in source.not_service_accounts]
        parts.append({"notId": _or("orIds", matched)})
    if source.namespaces:
        parts.append(_or("orIds", [_namespace(n) for n in source.namespaces]))
    if source.not_namespaces:
        parts.append({"notId": _or("orIds", [_namespace(n) for n in source.not_namespaces])})
    if source.ip_blocks:
        parts.append(_ip_field(source.ip_blocks, lenient, negated=False))
    if source.not_ip_blocks:
        parts.append(_ip_field(source.not_ip_blocks, lenient, negated=True))
    # with no trusted proxy the client is the peer, as the Python proxy decides it
    remote = "remoteIp" if trusted_proxies else "directRemoteIp"
    if source.remote_ip_blocks:
        parts.append(_ip_field(source.remote_ip_blocks, lenient, negated=False, kind=remote))
    if source.not_remote_ip_blocks:
        parts.append(_ip_field(source.not_remote_ip_blocks, lenient, negated=True, kind=remote))
    return _and("andIds", parts) if parts else ANY


def _operation(op: Operation, port: int) -> Json | None:
    """One `to.operation`; None when its ports rule out this listener's port."""
    if op.ports and str(port) not in op.ports:
        return None
    if op.not_ports and str(port) in op.not_ports:
        return None
    parts: list[Json] = []
    for values, build, negated in (
        (op.methods, _method, False),
        (op.not_methods, _method, True),
        (op.paths, _path, False),
        (op.not_paths, _path, True),
        (op.hosts, _host, False),
        (op.not_hosts, _host, True),
    ):
        if values:
            matched = _or("orRules", [build(v) for v in values])
            parts.append({"notRule": matched} if negated else matched)
    return _and("andRules", parts) if parts else ANY


def _condition(
    c: Condition,
    port: int,
    lenient: bool,
    issuers: Sequence[str] = (),
    trusted_proxies: int = 0,
) -> tuple[str, Json]:
    """("permission" | "principal", matcher) for one `when` entry."""
    unevaluable = ("permission", ANY if lenient else NOTHING)
    if not c.values and not c.not_values:
        return unevaluable
    header = _HEADER_KEY.fullmatch(c.key)
    if header is not None:
        name = header.group(1).strip().lower()

        def build(v: str) -> Json:
            return {"header": {"name": name, "stringMatch": _pattern(v)}}

        return "permission", _values_match(c, build, "orRules", "andRules", "notRule")
    claim = _CLAIM_KEY.fullmatch(c.key)
    if claim is not None:
        path = [part.strip() for part in claim.group(1)[1:-1].split("][")]
        return "principal", _values_match(c, lambda v: _claim(path, v), "orIds", "andIds", "notId")
    if c.key == "request.auth.principal":
        return "principal", _values_match(
            c, lambda v: _request_principal(v, issuers), "orIds", "andIds", "notId"
        )
    if c.key == "request.auth.audiences":
        return "principal", _values_match(
            c, lambda v: _claim(["aud"], v), "orIds", "andIds", "notId"
        )
    if c.key == "request.auth.presenter":
        return "principal", _values_match(
            c, lambda v: _claim(["azp"], v, lists=False), "orIds", "andIds", "notId"
        )
    if c.key == "source.principal":
        return "principal", _values_match(c, _principal, "orIds", "andIds", "notId")
    if c.key == "source.namespace":
        return "principal", _values_match(c, _namespace, "orIds", "andIds", "notId")
    if c.key == "source.ip":
        parts = []
        if c.values:
            parts.append(_ip_field(c.values, lenient, negated=False))
        if c.not_values:
            parts.append(_ip_field(c.not_values, lenient, negated=True))
        return "principal", _and("andIds", parts)
    if c.key == "remote.ip":
        # with no trusted proxy the client is the peer, as for remoteIpBlocks
        remote = "remoteIp" if trusted_proxies else "directRemoteIp"
        parts = []
        if c.values:
            parts.append(_ip_field(c.values, lenient, negated=False, kind=remote))
        if c.not_values:
            parts.append(_ip_field(c.not_values, lenient, negated=True, kind=remote))
        return "principal", _and("andIds", parts)
    if c.key == "destination.ip":
        parts = []
        if c.values:
            parts.append(_destination_ip(c.values, lenient, negated=False))
        if c.not_values:
            parts.append(_destination_ip(c.not_values, lenient, negated=True))
        return "permission", _and("andRules", parts)
    if c.key == "connection.sni":
        return "permission", _values_match(
            c, lambda v: {"requestedServerName": _pattern(v)}, "orRules", "andRules", "notRule"
        )
    if c.key == "destination.port":
        holds = (not c.values or _port_matches(c.values, port)) and not (
            c.not_values and _port_matches(c.not_values, port)
        )
        return "permission", ANY if holds else NOTHING
    return unevaluable


def _port_matches(patterns: Sequence[str], port: int) -> bool:
    text = str(port)
    for p in patterns:
        if p == "*" or p == text:
            return True
        if p.startswith("*") and text.endswith(p[1:]):
            return True
        if p.endswith("*") and text.startswith(p[:-1]):
            return True
    return False


def _values_match(c: Condition, build, or_key: str, and_key: str, not_key: str) -> Json:  # type: ignore[no-untyped-def]
    parts = []
    if c.values:
        parts.append(_or(or_key, [build(v) for v in c.values]))
    if c.not_values:
        parts.append({not_key: _or(or_key, [build(v) for v in c.not_values])})
    return _and(and_key, parts)
