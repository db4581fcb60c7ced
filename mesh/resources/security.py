"""Typed models of the `security.istio.io` kinds we support, field for field.

As in `networking`, only the fields Meshwork enforces exist here and every model
forbids unknown fields: for a policy an ignored field is a security hole (a dropped
`requestPrincipals` would turn "only these JWT subjects" into "anyone"). Fields Istio
has and we refuse on purpose, so that users get `... is not supported` with their
path: RequestAuthentication's `jwksRefresh`-style extensions.

`targetRef`/`targetRefs` (Istio 1.22+, both kinds) attach a policy by reference
instead of `selector`: to a `Service` (group "" or "core": the workloads serving that
service name in the policy's namespace) or a Gateway API `Gateway` (group
`gateway.networking.k8s.io`: the gateway proxies labelled
`gateway.networking.k8s.io/gateway-name: <name>`, the label Istio gives a Gateway's
deployment). Other kinds (GatewayClass, ServiceEntry, ...) and cross-namespace
references are refused with their path. (An `outputClaimToHeaders` claim that is not a
string, number or boolean is not copied, as Envoy does.)

Scalars that have an Istio default (`action`, `mode`) default to None, so `meshctl get`
shows back exactly what was applied.
"""

from __future__ import annotations

import msgspec

from mesh.resources.networking import Model


class WorkloadSelector(Model, frozen=True):
    match_labels: dict[str, str] = {}


class PolicyTargetReference(Model, frozen=True):
    """Istio's `PolicyTargetReference` (`targetRef`, `targetRefs[]`)."""

    group: str = ""
    kind: str = ""
    name: str = ""
    namespace: str = ""


# ---------------------------------------------------------------- PeerAuthentication


class MutualTLS(Model, frozen=True):
    # UNSET, STRICT, PERMISSIVE or DISABLE (checked in validation); None = UNSET
    mode: str | None = None


class PeerAuthenticationSpec(Model, frozen=True):
    selector: WorkloadSelector | None = None
    mtls: MutualTLS | None = None
    # YAML keys are integers (`8080:`), JSON ones (stored, or sent over the wire) are
    # strings: both are accepted and digit strings become ints, so a stored resource
    # parses back equal to the applied one; anything else is refused in validation
    port_level_mtls: dict[int | str, MutualTLS] | None = None

    def __post_init__(self) -> None:
        if self.port_level_mtls and any(isinstance(k, str) for k in self.port_level_mtls):
            normalised = {_port_key(k): v for k, v in self.port_level_mtls.items()}
            msgspec.structs.force_setattr(self, "port_level_mtls", normalised)


def _port_key(value: int | str) -> int | str:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        return int(value)
    return value


# ---------------------------------------------------------------- AuthorizationPolicy

# metadata.annotations key: "true" evaluates the policy in shadow only (logged and
# counted, never enforced), as Istio does; "false" or absent enforces it
DRY_RUN_ANNOTATION = "istio.io/dry-run"
DRY_RUN_VALUES = ("true", "false")


class Source(Model, frozen=True):
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    # `<iss>/<sub>` of a JWT validated by RequestAuthentication
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    # `<namespace>/<service account>` of the peer certificate, any trust domain
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    # the original client's address, from X-Forwarded-For past the trusted proxies
    # (MeshConfig `defaultConfig.gatewayTopology.numTrustedProxies`)
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()


class RuleFrom(Model, frozen=True):
    source: Source | None = None


class Operation(Model, frozen=True):
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    # strings of digits, as in Istio
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()


class RuleTo(Model, frozen=True):
    operation: Operation | None = None


class Condition(Model, frozen=True):
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


class Rule(Model, frozen=True):
    # None (absent) differs from [] (refused, as Istio does): an empty `from` would
    # otherwise read as "from anyone"
    from_: tuple[RuleFrom, ...] | None = msgspec.field(default=None, name="from")
    to: tuple[RuleTo, ...] | None = None
    when: tuple[Condition, ...] = ()


class ExtensionProviderRef(Model, frozen=True):
    """`provider: {name: ...}` of a CUSTOM policy: a mesh-wide extension provider."""

    name: str = ""


class AuthorizationPolicySpec(Model, frozen=True):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    # ALLOW, DENY, AUDIT or CUSTOM (checked in validation); None = ALLOW
    action: str | None = None
    # CUSTOM only: the ext_authz provider (MeshConfig `extensionProviders[].name`)
    provider: ExtensionProviderRef | None = None
    rules: tuple[Rule, ...] = ()


# ---------------------------------------------------------------- RequestAuthentication


class JwtHeader(Model, frozen=True):
    """`fromHeaders[]`: the header carrying the token and the prefix before it
    (`Bearer `); the prefix is removed before validation."""

    name: str = ""
    prefix: str = ""


class ClaimToHeader(Model, frozen=True):
    """`outputClaimToHeaders[]`: copy claim `claim` (nested with `.`) to `header`."""

    header: str = ""
    claim: str = ""


class JwtRule(Model, frozen=True):
    issuer: str = ""
    audiences: tuple[str, ...] = ()
    jwks_uri: str = ""
    # inline JSON Web Key Set (a JSON document, as Istio takes it)
    jwks: str = ""
    from_headers: tuple[JwtHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str = ""
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    forward_original_token: bool = False
    # how long fetching `jwksUri` may take (Istio's default: 5s)
    timeout: str | None = None


class RequestAuthenticationSpec(Model, frozen=True):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    jwt_rules: tuple[JwtRule, ...] = ()
