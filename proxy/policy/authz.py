"""Istio AuthorizationPolicy evaluation for one workload: pure, built once per config.

`Authorizer.build` keeps the policies whose selector matches the sidecar's labels and
precompiles their patterns (value sets, CIDR networks, condition keys), so `decide`
does no parsing beyond the caller's IP, and only when a policy looks at IPs.

Evaluation order is Istio's: a matching CUSTOM policy names the external authorizer
to ask first (`Decision.custom`: the caller asks it, and its denial wins); AUDIT
policies only mark the decision; any matching DENY policy denies; with no ALLOW
policy the request is allowed; otherwise an ALLOW policy must match. A workload may be
selected by CUSTOM policies of one provider only (Istio's rule; `build` refuses more).
On a TCP connection a matching CUSTOM policy denies it: its authorizer speaks HTTP.

End-user identity comes from RequestAuthentication (`RequestFacts.auth`, a validated
JWT): `requestPrincipals` (`<iss>/<sub>`, Istio's patterns, `*` meaning "any valid
token") and the `when` keys `request.auth.principal`, `request.auth.audiences`,
`request.auth.presenter` and `request.auth.claims[a][b]` (a list-valued claim matches
when any of its strings does). A request without a valid token has none of them: it
matches no value and no notValue, as an absent header does.

TCP connections (`decide_connection`) are decided by the same policies, built a
second time with Istio's rules for fields that only exist in HTTP (`methods`,
`paths`, `hosts`, `requestPrincipals`, their `not*` forms and `request.headers[...]`
and `request.auth.*` conditions): an
ALLOW rule naming one never matches a connection (the rule allows less), while a
DENY or AUDIT rule drops them and matches on the fields that remain (the rule
denies more: `to: [{operation: {methods: [GET], ports: ["9000"]}}]` denies every
connection to port 9000). This is Istio's `forTCP` generation, where an HTTP-only
field is an error that skips an ALLOW rule and is ignored in a DENY or AUDIT one.

Policies annotated `istio.io/dry-run: "true"` (`AuthzPolicy.dry_run`) never change
a decision: they are left out of it and evaluated apart, in the same order, as
Envoy's `shadow_rules`; their would-be outcome is `Decision.shadow`.

Entries the sidecar cannot evaluate (an unknown `when` key, a condition with neither
values nor notValues, an unparseable CIDR, a caller address that is not an IP) should
not pass validation. If one arrives anyway it fails closed in both directions: in an
ALLOW policy it never matches (the rule allows less); in a DENY (and AUDIT) policy it
always matches (the rule denies more). This is what Istio does with rule fields a
proxy cannot enforce. For the negated fields (`notIpBlocks`, `notValues`) the same
outcome means the opposite answer: an unevaluable entry excludes every request in an
ALLOW policy and excludes none in a DENY policy.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import msgspec

from mesh.compiled import AuthzPolicy, AuthzRule, Condition, InboundPolicy, Operation, Source

from .jwt import AuthIdentity, claim_at, claim_strings

# An address as (IP version, integer value) and a network as (version, network
# integer, mask integer): membership is then two integer operations, much cheaper than
# `ipaddress`'s `in`.
_IP = tuple[int, int]
_Network = tuple[int, int, int]

_HEADER_KEY = re.compile(r"request\.headers\[([^\[\]]+)\]")
_CLAIM_KEY = re.compile(r"request\.auth\.claims((?:\[[^\[\]]+\])+)")
_AUTH_KEYS = frozenset(
    ("request.auth.principal", "request.auth.audiences", "request.auth.presenter")
)


class RequestFacts(NamedTuple):
    """What authorization looks at, built by the inbound I/O layer per request.

    `principal` is Istio's form `cluster.local/ns/N/sa/SA` and `namespace` the caller's
    namespace, both from its verified certificate and both empty for a plaintext
    caller. `path` is already normalised (`normalize_path`); a query string, if still
    attached, is ignored. `host` is the authority as sent; `port` the workload port.
    `headers` maps lower-case names to values, repeated headers joined with ",".
    `auth` is the end user of a JWT validated by RequestAuthentication, None without.
    """

    principal: str
    namespace: str
    source_ip: str
    method: str
    path: str
    host: str
    port: int
    headers: Mapping[str, str]
    auth: AuthIdentity | None = None
    # the original client (`remoteIpBlocks`), "" when it is `source_ip`
    remote_ip: str = ""
    # the address the connection reached (`destination.ip`) and the TLS server name
    # the caller asked for (`connection.sni`), "" when unknown or not sent
    destination_ip: str = ""
    sni: str = ""


def original_client(forwarded_for: str, peer_ip: str, trusted_proxies: int) -> str:
    """The client address `remoteIpBlocks` compares, as Envoy's `xff_num_trusted_hops`
    (with `use_remote_address`) picks it: with N trusted proxies, the N-th entry of
    X-Forwarded-For from the right; the peer's address when N is 0 or the list is
    shorter."""
    if trusted_proxies <= 0 or not forwarded_for:
        return peer_ip
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    return hops[-trusted_proxies] if len(hops) >= trusted_proxies else peer_ip


class ConnectionFacts(NamedTuple):
    """What authorization looks at for a TCP connection, built by the relay when it
    accepts one: the caller as in `RequestFacts`, and the workload port it reached."""

    principal: str
    namespace: str
    source_ip: str
    port: int
    destination_ip: str = ""
    sni: str = ""


class ShadowDecision(NamedTuple):
    """What the dry-run policies alone would have decided (they decide nothing):
    `policy` is the dry-run policy that decided (`ns/name`, "" when none did, e.g. no
    dry-run ALLOW policy matched)."""

    allowed: bool
    reason: str
    policy: str


class Decision(NamedTuple):
    """The outcome: `policy` is the deciding `ns/name` ("" when none decided).
    `shadow` is the dry-run outcome, None when no dry-run policy applies. `custom` is
    the extension provider a matching CUSTOM policy (`custom_policy`) asks to check
    the request before `allowed` counts ("" when none matched)."""

    allowed: bool
    reason: str
    policy: str
    audit: bool
    shadow: ShadowDecision | None = None
    custom: str = ""
    custom_policy: str = ""


_NO_POLICY = Decision(True, "no authorization policy applies", "", False)


class _Request:
    """Per-request values derived lazily from `RequestFacts`, shared by all rules."""

    __slots__ = ("_destination", "_hosts", "_ip", "_ip_parsed", "_remote", "facts", "path", "port")

    def __init__(self, facts: RequestFacts) -> None:
        self.facts = facts
        path = facts.path
        query = path.find("?")
        self.path = path if query < 0 else path[:query]
        self.port = str(facts.port)
        self._hosts: tuple[str, ...] | None = None
        self._ip: _IP | None = None
        self._ip_parsed = False
        self._remote: tuple[_IP | None] | None = None
        self._destination: tuple[_IP | None] | None = None

    def destination_ip(self) -> _IP | None:
        if self._destination is None:
            self._destination = (_parse_ip(self.facts.destination_ip),)
        return self._destination[0]

    def hosts(self) -> tuple[str, ...]:
        """The authority lower-cased, and again without `:port` when it has one."""
        if self._hosts is None:
            host = self.facts.host.lower()
            stripped = _strip_port(host)
            self._hosts = (host,) if stripped == host else (host, stripped)
        return self._hosts

    def remote_ip(self) -> _IP | None:
        if not self.facts.remote_ip:
            return self.ip()
        if self._remote is None:
            self._remote = (_parse_ip(self.facts.remote_ip),)
        return self._remote[0]

    def ip(self) -> _IP | None:
        if not self._ip_parsed:
            self._ip_parsed = True
            self._ip = _parse_ip(self.facts.source_ip)
        return self._ip


@functools.lru_cache(maxsize=4096)
def _parse_ip(text: str) -> _IP | None:
    # Cached: callers are few and reconnect from the same addresses, and parsing is
    # most of the cost of a decision that looks at IPs.
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # A dual-stack listener reports IPv4 callers as ::ffff:a.b.c.d.
        ip = ip.ipv4_mapped
    return ip.version, int(ip)


def _strip_port(host: str) -> str:
    colon = host.rfind(":")
    if colon < 0 or not host[colon + 1 :].isdigit():
        return host
    if host.startswith("["):
        # `[v6]:port`; a colon inside the brackets is part of the address
        return host[:colon] if host[colon - 1] == "]" else host
    if host.count(":") > 1:  # bare IPv6 literal, no port
        return host
    return host[:colon]


class _Values:
    """Istio string patterns: exact, `*` (any non-empty), `prefix*`, `*suffix`."""

    __slots__ = ("any", "exact", "prefixes", "suffixes")

    def __init__(self, patterns: Iterable[str], *, lower: bool = False) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        self.any = False
        for pattern in patterns:
            if lower:
                pattern = pattern.lower()
            # Istio's order (StringMatcherWithPrefix): "*" first, then a leading "*"
            # (suffix match), then a trailing "*" (prefix match).
            if pattern == "*":
                self.any = True
            elif pattern.startswith("*"):
                suffixes.append(pattern[1:])
            elif pattern.endswith("*"):
                prefixes.append(pattern[:-1])
            else:
                exact.add(pattern)
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)

    def matches(self, value: str) -> bool:
        return (
            value in self.exact
            or (self.any and value != "")
            or value.startswith(self.prefixes)
            or value.endswith(self.suffixes)
        )


def _values(patterns: tuple[str, ...], *, lower: bool = False) -> _Values | None:
    return _Values(patterns, lower=lower) if patterns else None


# Envoy's URI template (which Istio uses for `{*}`/`{**}` paths): a `{*}` is one or
# more characters of a segment, `{**}` zero or more characters across segments, each
# from RFC 3986's pchar set
_SEGMENT_CHARS = r"A-Za-z0-9\-._~%!$&'()+,;:@="
_TEMPLATE_PARTS = {"{*}": f"[{_SEGMENT_CHARS}]+", "{**}": f"[{_SEGMENT_CHARS}/]*"}


def path_template(template: str) -> re.Pattern[str]:
    """A validated path template as a regex for `fullmatch`."""
    parts = re.split(r"(\{\*\*\}|\{\*\})", template)
    return re.compile("".join(_TEMPLATE_PARTS.get(p) or re.escape(p) for p in parts))


class _Paths:
    """`paths`: Istio's patterns, and path templates when a value has `{`."""

    __slots__ = ("templates", "values")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.values = _values(tuple(p for p in patterns if "{" not in p))
        self.templates = tuple(path_template(p) for p in patterns if "{" in p)

    def matches(self, path: str) -> bool:
        if self.values is not None and self.values.matches(path):
            return True
        return any(t.fullmatch(path) for t in self.templates)


def _paths(patterns: tuple[str, ...]) -> _Paths | None:
    return _Paths(patterns) if patterns else None


class _Addresses:
    """IPs and CIDRs parsed once. `unevaluable` is what an unparseable entry, or a
    caller address that is not an IP, counts as (see the module doc)."""

    __slots__ = ("networks", "poisoned", "unevaluable")

    def __init__(self, entries: Iterable[str], *, unevaluable: bool) -> None:
        networks: list[_Network] = []
        poisoned = False
        for entry in entries:
            try:
                network = ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                poisoned = True
                continue
            networks.append((network.version, int(network.network_address), int(network.netmask)))
        self.networks = tuple(networks)
        self.unevaluable = unevaluable
        self.poisoned = poisoned and unevaluable

    def contains(self, ip: _IP | None) -> bool:
        if ip is None:
            return self.unevaluable
        if self.poisoned:
            return True
        version, value = ip
        return any(
            version == net_version and value & mask == net
            for net_version, net, mask in self.networks
        )


def _addresses(entries: tuple[str, ...], *, unevaluable: bool) -> _Addresses | None:
    return _Addresses(entries, unevaluable=unevaluable) if entries else None


class _SourceMatch:
    __slots__ = (
        "ip_blocks",
        "namespaces",
        "not_ip_blocks",
        "not_namespaces",
        "not_principals",
        "not_remote_ip_blocks",
        "not_request_principals",
        "not_service_accounts",
        "principals",
        "remote_ip_blocks",
        "request_principals",
        "service_accounts",
    )

    def __init__(self, source: Source, *, lenient: bool, tcp: bool = False) -> None:
        if tcp:
            # only reached for DENY/AUDIT rules: the HTTP-only fields are dropped
            source = msgspec.structs.replace(
                source, request_principals=(), not_request_principals=()
            )
        self.principals = _values(source.principals)
        self.not_principals = _values(source.not_principals)
        self.request_principals = _values(source.request_principals)
        self.not_request_principals = _values(source.not_request_principals)
        # `ns/sa` compared with the principal without its trust domain
        self.service_accounts = frozenset(f"ns/{n}/sa/{a}" for n, _, a in (
            v.partition("/") for v in source.service_accounts
        )) or None  # fmt: skip
        self.not_service_accounts = frozenset(f"ns/{n}/sa/{a}" for n, _, a in (
            v.partition("/") for v in source.not_service_accounts
        )) or None  # fmt: skip
        self.namespaces = _values(source.namespaces)
        self.not_namespaces = _values(source.not_namespaces)
        self.ip_blocks = _addresses(source.ip_blocks, unevaluable=lenient)
        self.not_ip_blocks = _addresses(source.not_ip_blocks, unevaluable=not lenient)
        self.remote_ip_blocks = _addresses(source.remote_ip_blocks, unevaluable=lenient)
        self.not_remote_ip_blocks = _addresses(source.not_remote_ip_blocks, unevaluable=not lenient)

    def matches(self, request: _Request) -> bool:
        facts = request.facts
        # An empty principal/namespace (plaintext caller) matches no pattern, not even
        # "*": Istio's `principals: ["*"]` means "any authenticated caller".
        principal = facts.principal
        if self.principals is not None and not (principal and self.principals.matches(principal)):
            return False
        if self.not_principals is not None and principal and self.not_principals.matches(principal):
            return False
        if self.service_accounts is not None or self.not_service_accounts is not None:
            # no certificate, no service account: matches none, excluded by none
            account = principal.partition("/")[2] if principal else ""
            if self.service_accounts is not None and account not in self.service_accounts:
                return False
            if self.not_service_accounts is not None and account in self.not_service_accounts:
                return False
        if self.request_principals is not None or self.not_request_principals is not None:
            # no valid token: no request principal, matching no pattern, not even "*"
            auth = facts.auth
            user = auth.principal if auth is not None else ""
            if self.request_principals is not None and not (
                user and self.request_principals.matches(user)
            ):
                return False
            if self.not_request_principals is not None and user:
                if self.not_request_principals.matches(user):
                    return False
        namespace = facts.namespace
        if self.namespaces is not None and not (namespace and self.namespaces.matches(namespace)):
            return False
        if self.not_namespaces is not None and namespace and self.not_namespaces.matches(namespace):
            return False
        if self.ip_blocks is not None and not self.ip_blocks.contains(request.ip()):
            return False
        if self.not_ip_blocks is not None and self.not_ip_blocks.contains(request.ip()):
            return False
        if self.remote_ip_blocks is not None:
            if not self.remote_ip_blocks.contains(request.remote_ip()):
                return False
        if self.not_remote_ip_blocks is not None:
            return not self.not_remote_ip_blocks.contains(request.remote_ip())
        return True


class _OperationMatch:
    __slots__ = (
        "hosts",
        "methods",
        "not_hosts",
        "not_methods",
        "not_paths",
        "not_ports",
        "paths",
        "ports",
    )

    def __init__(self, operation: Operation, *, tcp: bool = False) -> None:
        # Istio builds method matchers like header matchers, so "*"/prefix/suffix work
        # there too; values are compared case-sensitively.
        if tcp:
            # only reached for DENY/AUDIT rules (an ALLOW rule naming these fields is
            # dropped whole): the HTTP-only fields are left out, the ports remain
            operation = Operation(ports=operation.ports, not_ports=operation.not_ports)
        self.methods = _values(operation.methods)
        self.not_methods = _values(operation.not_methods)
        self.paths = _paths(operation.paths)
        self.not_paths = _paths(operation.not_paths)
        self.hosts = _values(operation.hosts, lower=True)
        self.not_hosts = _values(operation.not_hosts, lower=True)
        self.ports = frozenset(operation.ports) if operation.ports else None
        self.not_ports = frozenset(operation.not_ports) if operation.not_ports else None

    def matches(self, request: _Request) -> bool:
        method = request.facts.method
        if self.methods is not None and not self.methods.matches(method):
            return False
        if self.not_methods is not None and self.not_methods.matches(method):
            return False
        if self.paths is not None and not self.paths.matches(request.path):
            return False
        if self.not_paths is not None and self.not_paths.matches(request.path):
            return False
        if self.hosts is not None and not any(map(self.hosts.matches, request.hosts())):
            return False
        if self.not_hosts is not None and any(map(self.not_hosts.matches, request.hosts())):
            return False
        if self.ports is not None and request.port not in self.ports:
            return False
        return self.not_ports is None or request.port not in self.not_ports


_CONDITION_KEYS = frozenset(
    ("source.principal", "source.namespace", "source.ip", "remote.ip", "destination.ip",
     "destination.port", "connection.sni")
)  # fmt: skip
_ADDRESS_KEYS = frozenset(("source.ip", "remote.ip", "destination.ip"))


class _ConditionMatch:
    """One `when` entry: (values empty or any matches) and no notValue matches."""

    __slots__ = (
        "addresses",
        "claim",
        "header",
        "kind",
        "not_addresses",
        "not_values",
        "unevaluable_holds",
        "values",
    )

    def __init__(self, condition: Condition, *, lenient: bool, tcp: bool = False) -> None:
        self.values = _values(condition.values)
        self.not_values = _values(condition.not_values)
        self.addresses: _Addresses | None = None
        self.not_addresses: _Addresses | None = None
        self.header = ""
        self.claim: tuple[str, ...] = ()
        # kind "" is an unevaluable condition (unknown key, nothing to compare): it
        # holds in DENY/AUDIT policies and fails in ALLOW ones (see the module doc).
        self.kind = ""
        self.unevaluable_holds = lenient
        header = _HEADER_KEY.fullmatch(condition.key)
        claim = _CLAIM_KEY.fullmatch(condition.key)
        if not condition.values and not condition.not_values:
            pass
        elif tcp and _http_only_key(condition.key):
            # a DENY/AUDIT rule on a connection: dropped, i.e. always holds
            self.kind, self.unevaluable_holds = "", True
        elif header is not None:
            self.kind, self.header = "header", header.group(1).strip().lower()
        elif claim is not None:
            self.kind = "claim"
            self.claim = tuple(part.strip() for part in claim.group(1)[1:-1].split("]["))
        elif condition.key in _AUTH_KEYS:
            self.kind = condition.key
        elif condition.key in _CONDITION_KEYS:
            self.kind = condition.key
        if self.kind in _ADDRESS_KEYS:
            self.addresses = _addresses(condition.values, unevaluable=lenient)
            self.not_addresses = _addresses(condition.not_values, unevaluable=not lenient)

    def holds(self, request: _Request) -> bool:
        kind = self.kind
        if kind in _ADDRESS_KEYS:
            if kind == "source.ip":
                ip = request.ip()
            elif kind == "remote.ip":
                ip = request.remote_ip()
            else:
                ip = request.destination_ip()
            if self.addresses is not None and not self.addresses.contains(ip):
                return False
            return self.not_addresses is None or not self.not_addresses.contains(ip)
        if kind == "claim" or kind in _AUTH_KEYS:
            return self._holds_for_auth(request.facts.auth)
        value: str | None
        if kind == "header":
            value = request.facts.headers.get(self.header)
        elif kind == "source.principal":
            value = request.facts.principal or None
        elif kind == "source.namespace":
            value = request.facts.namespace or None
        elif kind == "destination.port":
            value = request.port
        elif kind == "connection.sni":
            value = request.facts.sni or None
        else:
            return self.unevaluable_holds
        # An absent value (header not sent, plaintext caller) matches no value and no
        # notValue.
        if self.values is not None and (value is None or not self.values.matches(value)):
            return False
        return self.not_values is None or value is None or not self.not_values.matches(value)

    def _holds_for_auth(self, auth: AuthIdentity | None) -> bool:
        """A `request.auth.*` key: several values (audiences, a list claim) hold when
        any of them matches, as Istio's list matchers do; no token, no value."""
        if auth is None:
            found: tuple[str, ...] = ()
        elif self.kind == "claim":
            found = claim_strings(claim_at(auth.claims, self.claim))
        elif self.kind == "request.auth.principal":
            found = (auth.principal,)
        elif self.kind == "request.auth.audiences":
            found = auth.audiences
        else:
            found = (auth.presenter,) if auth.presenter else ()
        if self.values is not None and not any(map(self.values.matches, found)):
            return False
        return self.not_values is None or not any(map(self.not_values.matches, found))


def _http_only_key(key: str) -> bool:
    return (
        _HEADER_KEY.fullmatch(key) is not None
        or _CLAIM_KEY.fullmatch(key) is not None
        or key in _AUTH_KEYS
    )


def _http_only(rule: AuthzRule) -> bool:
    """Whether the rule names a field a TCP connection does not have."""
    return (
        any(
            o.methods or o.not_methods or o.paths or o.not_paths or o.hosts or o.not_hosts
            for o in rule.operations
        )
        or any(s.request_principals or s.not_request_principals for s in rule.sources)
        or any(_http_only_key(c.key) for c in rule.when)
    )


class _RuleMatch:
    __slots__ = ("conditions", "never", "operations", "sources")

    def __init__(self, rule: AuthzRule, *, lenient: bool, tcp: bool = False) -> None:
        # an ALLOW rule with HTTP-only fields never matches a connection (module doc)
        self.never = tcp and not lenient and _http_only(rule)
        self.sources = tuple(_SourceMatch(s, lenient=lenient, tcp=tcp) for s in rule.sources)
        self.operations = tuple(_OperationMatch(o, tcp=tcp) for o in rule.operations)
        self.conditions = tuple(_ConditionMatch(c, lenient=lenient, tcp=tcp) for c in rule.when)

    def matches(self, request: _Request) -> bool:
        if self.never:
            return False
        # Plain loops rather than any()/all() over generators: on this path creating
        # the generators costs more than the checks themselves.
        if self.sources:
            for source in self.sources:
                if source.matches(request):
                    break
            else:
                return False
        if self.operations:
            for operation in self.operations:
                if operation.matches(request):
                    break
            else:
                return False
        for condition in self.conditions:
            if not condition.holds(request):
                return False
        return True


class _PolicyMatch:
    __slots__ = ("provider", "ref", "rules")

    def __init__(self, policy: AuthzPolicy, *, tcp: bool = False) -> None:
        self.ref = f"{policy.namespace}/{policy.name}"
        self.provider = policy.provider
        lenient = policy.action != "ALLOW"
        self.rules = tuple(_RuleMatch(r, lenient=lenient, tcp=tcp) for r in policy.rules)

    def matches(self, request: _Request) -> bool:
        # No rules: matches nothing (an empty ALLOW policy allows nothing).
        for rule in self.rules:
            if rule.matches(request):
                return True
        return False


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


class _Engine:
    """One set of policies in Istio's evaluation order: AUDIT marks, DENY first, then
    ALLOW when there is one. Built per protocol, and apart for dry-run policies."""

    __slots__ = ("allow", "audit", "custom", "deny")

    def __init__(self, policies: Iterable[AuthzPolicy], *, tcp: bool) -> None:
        by_action: dict[str, list[_PolicyMatch]] = {
            "CUSTOM": [], "AUDIT": [], "DENY": [], "ALLOW": [],
        }  # fmt: skip
        for authz in policies:
            by_action[authz.action].append(_PolicyMatch(authz, tcp=tcp))
        self.custom = tuple(by_action["CUSTOM"])
        self.audit = tuple(by_action["AUDIT"])
        self.deny = tuple(by_action["DENY"])
        self.allow = tuple(by_action["ALLOW"])
        providers = sorted({p.provider for p in self.custom})
        if len(providers) > 1:
            refs = ", ".join(p.ref for p in self.custom)
            raise ValueError(
                f"CUSTOM policies {refs} select one workload with different providers "
                f"({', '.join(providers)}): only one provider per workload is supported"
            )

    @property
    def empty(self) -> bool:
        return not (self.custom or self.audit or self.deny or self.allow)

    @property
    def refs(self) -> tuple[str, ...]:
        return tuple(p.ref for p in (*self.custom, *self.audit, *self.deny, *self.allow))

    def decide(self, request: _Request, kind: str = "") -> Decision:
        """`kind` ("dry-run ") qualifies the policies in the reasons."""
        decision = self._decide(request, kind)
        for policy in self.custom:
            if policy.matches(request):
                return decision._replace(custom=policy.provider, custom_policy=policy.ref)
        return decision

    def _decide(self, request: _Request, kind: str) -> Decision:
        audit = bool(self.audit) and any(p.matches(request) for p in self.audit)
        for policy in self.deny:
            if policy.matches(request):
                return Decision(
                    False, f"denied by {kind}DENY policy {policy.ref}", policy.ref, audit
                )
        if not self.allow:
            return Decision(True, f"no {kind}ALLOW policy applies", "", audit)
        for policy in self.allow:
            if policy.matches(request):
                return Decision(
                    True, f"allowed by {kind}ALLOW policy {policy.ref}", policy.ref, audit
                )
        return Decision(False, f"no {kind}ALLOW policy matched", "", audit)


_NO_ENGINE = _Engine((), tcp=False)


class Authorizer:
    """The AuthorizationPolicies applying to one workload, ready to evaluate requests
    (`decide`) and TCP connections (`decide_connection`)."""

    __slots__ = ("_http", "_shadow_http", "_shadow_tcp", "_tcp", "applied", "dry_run")

    def __init__(
        self,
        enforced: tuple[AuthzPolicy, ...] = (),
        dry_run: tuple[AuthzPolicy, ...] = (),
    ) -> None:
        self._http = _Engine(enforced, tcp=False) if enforced else _NO_ENGINE
        self._tcp = _Engine(enforced, tcp=True) if enforced else _NO_ENGINE
        self._shadow_http = _Engine(dry_run, tcp=False) if dry_run else None
        self._shadow_tcp = _Engine(dry_run, tcp=True) if dry_run else None
        # `ns/name` of every policy kept, for the admin config dump
        self.applied: tuple[str, ...] = self._http.refs
        self.dry_run: tuple[str, ...] = self._shadow_http.refs if self._shadow_http else ()

    @classmethod
    def build(cls, policy: InboundPolicy | None, labels: Mapping[str, str]) -> Authorizer:
        """Keep the policies whose selector is empty or a subset of `labels`."""
        if policy is None:
            return cls()
        kept = [authz for authz in policy.authorization if _selects(authz.selector, labels)]
        return cls(
            tuple(authz for authz in kept if not authz.dry_run),
            tuple(authz for authz in kept if authz.dry_run),
        )

    @property
    def empty(self) -> bool:
        """True when no policy applies, dry-run ones included: every request is
        allowed, facts are not needed."""
        return self._http.empty and self._shadow_http is None

    def decide(self, facts: RequestFacts) -> Decision:
        if self.empty:
            return _NO_POLICY
        request = _Request(facts)
        return self._decide(request, self._http, self._shadow_http)

    def decide_connection(self, facts: ConnectionFacts) -> Decision:
        """A TCP connection: the same policies, with Istio's rules for HTTP-only fields."""
        if self.empty:
            return _NO_POLICY
        request = _Request(
            RequestFacts(
                facts.principal,
                facts.namespace,
                facts.source_ip,
                "",
                "",
                "",
                facts.port,
                {},
                destination_ip=facts.destination_ip,
                sni=facts.sni,
            )
        )
        decision = self._decide(request, self._tcp, self._shadow_tcp)
        if decision.custom:
            return decision._replace(
                allowed=False,
                reason=f"CUSTOM policy {decision.custom_policy} cannot check a TCP connection "
                f"(provider {decision.custom} is an HTTP authorizer)",
                policy=decision.custom_policy,
            )
        return decision

    @staticmethod
    def _decide(request: _Request, engine: _Engine, shadow: _Engine | None) -> Decision:
        decision = _NO_POLICY if engine.empty else engine.decide(request)
        if shadow is None:
            return decision
        would = shadow.decide(request, "dry-run ")
        return decision._replace(shadow=ShadowDecision(would.allowed, would.reason, would.policy))
