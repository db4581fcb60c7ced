"""Typed models of the `meshwork.io` kinds: what Istio lacks, shaped after prior art.

`MeshConfig` (`meshwork.io/v1`, plural `meshconfigs`) holds what Istio configures in
its meshConfig rather than in resources; only `extensionProviders[]` (the external
authorizers of `action: CUSTOM` policies), in Istio's shape::

    apiVersion: meshwork.io/v1
    kind: MeshConfig
    metadata: {name: mesh, namespace: istio-system}     # the root namespace
    spec:
      extensionProviders:
      - name: sample-ext-authz-http
        envoyExtAuthzHttp:
          service: ext-authz.foo.svc.cluster.local
          port: 8000
          includeRequestHeadersInCheck: ["x-ext-authz"]

or, for Envoy's gRPC `envoy.service.auth.v3.Authorization/Check`::

      - name: sample-ext-authz-grpc
        envoyExtAuthzGrpc:
          service: ext-authz.foo.svc.cluster.local
          port: 9000
          timeout: 1s            # optional; failOpen and statusOnError as for HTTP

`trustDomain` and `trustDomainAliases` are Istio's trust domain migration: with
`trustDomain: new-td` and `trustDomainAliases: [old-td]`, a policy principal
`old-td/ns/foo/sa/bar`, `new-td/...` or `cluster.local/...` matches the workload in
either trust domain; principals of other trust domains, and `*/...`, stay as written.

Only MeshConfigs in the root namespace count; a provider name must be unique across
them, and each names exactly one of the two. `includeAdditionalHeadersInCheck` and
gRPC's `clearRouteCache` are not supported yet (refused with their path).

`RateLimitPolicy` (`meshwork.io/v1`, plural `ratelimitpolicies`, short `rlp`) is local
rate limiting in the *server* sidecars, shaped like Linkerd's HTTPLocalRateLimitPolicy
(`total`, `identity`, `overrides`), but attached to workloads the way Istio policies
are, by a label selector in the policy's namespace (no selector: every workload of
the namespace)::

    apiVersion: meshwork.io/v1
    kind: RateLimitPolicy
    metadata: {name: ratings, namespace: default}
    spec:
      selector: {matchLabels: {app: ratings}}
      total: {requestsPerSecond: 100}       # every caller together, per sidecar
      identity: {requestsPerSecond: 20}     # each caller principal on its own
      overrides:                            # these principals instead of `identity`
      - requestsPerSecond: 50
        clientRefs:
          principals: ["cluster.local/ns/default/sa/reviews"]

Semantics (enforced by the inbound sidecar, one token bucket per limit, capacity =
requestsPerSecond, so a burst of up to one second's worth passes at once):
- a request must pass `total` (when set) and its caller's own limit: the override
  listing its principal, else `identity` (when set);
- each principal of an override has its own bucket at the override's rate;
- callers without a principal (plaintext) are one caller for `identity`, as Linkerd
  treats unmeshed sources;
- limits are per sidecar (local), not per service: N instances admit N times the rate;
- beyond a limit the sidecar answers 429 with `x-ratelimit-*` headers, flag `RL`.

Validation follows Linkerd's rules (no limit above `total`) and refuses a policy that
limits nothing. Principals use Istio's form `<trust-domain>/ns/<namespace>/sa/<sa>`.
"""

from __future__ import annotations

from mesh.resources.networking import Model
from mesh.resources.security import WorkloadSelector

# ---------------------------------------------------------------- MeshConfig


class RequestBodyInCheck(Model, frozen=True):
    """Istio's `includeRequestBodyInCheck` (Envoy's `with_request_body`)."""

    max_request_bytes: int | None = None
    allow_partial_message: bool = False
    pack_as_bytes: bool = False


class ExtAuthzHttp(Model, frozen=True):
    """Istio's `envoyExtAuthzHttp` (Envoy's ext_authz HTTP service)."""

    service: str = ""
    # Istio's task writes `port: "8000"` (protobuf JSON accepts a string)
    port: int | str | None = None
    timeout: str | None = None
    path_prefix: str = ""
    fail_open: bool = False
    status_on_error: str = ""
    include_request_headers_in_check: tuple[str, ...] = ()
    headers_to_upstream_on_allow: tuple[str, ...] = ()
    headers_to_downstream_on_deny: tuple[str, ...] = ()
    headers_to_downstream_on_allow: tuple[str, ...] = ()
    include_request_body_in_check: RequestBodyInCheck | None = None


class ExtAuthzGrpc(Model, frozen=True):
    """Istio's `envoyExtAuthzGrpc` (Envoy's ext_authz gRPC service,
    `envoy.service.auth.v3.Authorization/Check`)."""

    service: str = ""
    port: int | str | None = None
    timeout: str | None = None
    fail_open: bool = False
    status_on_error: str = ""
    include_request_body_in_check: RequestBodyInCheck | None = None


class ExtensionProvider(Model, frozen=True):
    name: str = ""
    envoy_ext_authz_http: ExtAuthzHttp | None = None
    envoy_ext_authz_grpc: ExtAuthzGrpc | None = None


class GatewayTopology(Model, frozen=True):
    # how many proxies in front of the mesh append to X-Forwarded-For (Envoy's
    # `xff_num_trusted_hops`): the client address `remoteIpBlocks` compares is the
    # N-th from the right of that list (0: the connection's peer)
    num_trusted_proxies: int | None = None


class ProxyDefaults(Model, frozen=True):
    gateway_topology: GatewayTopology | None = None


class OutboundTrafficPolicy(Model, frozen=True):
    """Istio's `meshConfig.outboundTrafficPolicy`: what a sidecar does with a request
    for a host neither the registry nor a ServiceEntry knows. REGISTRY_ONLY (the
    default): 502 `NR`; ALLOW_ANY: forwarded to the host and port asked for."""

    # None is refused in validation
    mode: str | None = None


class MeshConfigSpec(Model, frozen=True):
    """The mesh-wide settings Istio keeps in its meshConfig, as a resource: those in
    the root namespace apply (`extensionProviders`, named by CUSTOM policies;
    `defaultConfig.gatewayTopology.numTrustedProxies`; `outboundTrafficPolicy`)."""

    extension_providers: tuple[ExtensionProvider, ...] = ()
    default_config: ProxyDefaults | None = None
    # the mesh's trust domain (the CA's, default "cluster.local") and the ones it was
    # migrated from: a policy principal in any of them, or in "cluster.local", names
    # the same workload in all of them (Istio's trust domain migration)
    trust_domain: str = ""
    trust_domain_aliases: tuple[str, ...] = ()
    outbound_traffic_policy: OutboundTrafficPolicy | None = None


# ---------------------------------------------------------------- RateLimitPolicy


class RequestRate(Model, frozen=True):
    """`{requestsPerSecond: N}`; None is refused in validation with its path."""

    requests_per_second: int | None = None


class ClientRefs(Model, frozen=True):
    principals: tuple[str, ...] = ()


class RateLimitOverride(Model, frozen=True):
    requests_per_second: int | None = None
    client_refs: ClientRefs | None = None


class RateLimitPolicySpec(Model, frozen=True):
    selector: WorkloadSelector | None = None
    total: RequestRate | None = None
    identity: RequestRate | None = None
    overrides: tuple[RateLimitOverride, ...] = ()
