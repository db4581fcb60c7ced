"""Inbound policy compilation: which PeerAuthentications and AuthorizationPolicies reach
the server sidecars of a service, and what they carry (tables, no I/O)."""

from __future__ import annotations

import random

import msgspec
import pytest

from mesh.compiled import (
    AuthzPolicy,
    AuthzRule,
    Condition,
    InboundPolicy,
    Operation,
    PeerAuthn,
    RateLimit,
    RateLimitOverride,
    Source,
)
from mesh.hosts import ServiceRef
from mesh.resources import Resource, load_yaml, parse_resource
from services.config.compile_security import DEFAULT_ROOT_NAMESPACE, compile_inbound_policy
from services.config.settings import ConfigSettings, ConfigSettingsError

REVIEWS = ServiceRef("default", "reviews")
ROOT = "istio-system"

POLICIES = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: gateways, namespace: istio-system}
spec:
  selector: {matchLabels: {app: istio-ingressgateway}}
  mtls: {mode: DISABLE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: reviews-v2, namespace: default}
spec:
  selector: {matchLabels: {app: reviews, version: v2}}
  mtls: {mode: STRICT}
  portLevelMtls:
    9080: {mode: PERMISSIVE}
    9443: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: other}
spec:
  mtls: {mode: DISABLE}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: default}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/productpage"]
        notNamespaces: ["legacy"]
    - source:
        ipBlocks: ["10.0.0.0/8"]
        notIpBlocks: ["10.9.0.0/16"]
    to:
    - operation:
        methods: ["GET", "HEAD"]
        notPaths: ["/admin*"]
        ports: ["9080"]
    when:
    - key: request.headers[x-team]
      values: ["reviews"]
      notValues: ["blocked"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-everything, namespace: istio-system}
spec:
  action: AUDIT
  rules:
  - {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: block-scanners, namespace: istio-system}
spec:
  selector: {matchLabels: {tier: web}}
  action: DENY
  rules:
  - when:
    - key: request.headers[user-agent]
      values: ["*scanner"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: other}
spec:
  rules:
  - {}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
"""


def resources(text: str = POLICIES) -> list[Resource]:
    return [
        parse_resource(body, source="p.yaml", index=i)
        for i, body in enumerate(load_yaml(text, "p.yaml"))
    ]


def created(rs: list[Resource]) -> dict[tuple[str, str, str], int]:
    return {r.ref: 100 + i for i, r in enumerate(rs)}


def test_peer_authentication_scopes_for_a_service_outside_the_root_namespace() -> None:
    rs = resources()
    policy = compile_inbound_policy(rs, REVIEWS, 42, ROOT, create_revisions=created(rs))
    assert policy.peer_authentication == (
        PeerAuthn(name="default", namespace="default", scope="namespace", mode="PERMISSIVE",
                  create_revision=102),
        PeerAuthn(name="reviews-v2", namespace="default", scope="workload",
                  selector={"app": "reviews", "version": "v2"}, mode="STRICT",
                  port_modes={9080: "PERMISSIVE", 9443: "UNSET"}, create_revision=103),
        # the root namespace's selector-less policy is mesh-wide; its workload policy
        # (gateways) is not for workloads of other namespaces, and `other` is not ours
        PeerAuthn(name="default", namespace="istio-system", scope="mesh", mode="STRICT",
                  create_revision=100),
    )  # fmt: skip


def test_root_namespace_workload_policy_applies_to_root_namespace_services_only() -> None:
    rs = resources()
    gateway = compile_inbound_policy(rs, ServiceRef(ROOT, "istio-ingressgateway"), 1, ROOT)
    assert [(p.name, p.scope, p.selector) for p in gateway.peer_authentication] == [
        ("default", "mesh", {}),
        ("gateways", "workload", {"app": "istio-ingressgateway"}),
    ]
    assert [(a.name, a.mesh_wide) for a in gateway.authorization] == [
        ("audit-everything", True),
        ("block-scanners", True),
    ]


def test_authorization_policies_of_the_namespace_and_the_root_namespace() -> None:
    policy = compile_inbound_policy(resources(), REVIEWS, 7, ROOT)
    assert [(a.namespace, a.name, a.action, a.mesh_wide) for a in policy.authorization] == [
        ("default", "deny-all", "ALLOW", False),
        ("default", "reviews-viewer", "ALLOW", False),
        ("istio-system", "audit-everything", "AUDIT", True),
        ("istio-system", "block-scanners", "DENY", True),
    ]
    deny_all, viewer, audit, block = policy.authorization
    # an ALLOW policy with no rules matches nothing: it allows nothing
    assert deny_all == AuthzPolicy(name="deny-all", namespace="default")
    assert viewer == AuthzPolicy(
        name="reviews-viewer",
        namespace="default",
        selector={"app": "reviews"},
        rules=(
            AuthzRule(
                sources=(
                    Source(principals=("cluster.local/ns/default/sa/productpage",),
                           not_namespaces=("legacy",)),
                    Source(ip_blocks=("10.0.0.0/8",), not_ip_blocks=("10.9.0.0/16",)),
                ),
                operations=(
                    Operation(methods=("GET", "HEAD"), not_paths=("/admin*",), ports=("9080",)),
                ),
                when=(
                    Condition(key="request.headers[x-team]", values=("reviews",),
                              not_values=("blocked",)),
                ),
            ),
        ),
    )  # fmt: skip
    # `rules: [{}]`: one rule that matches every request
    assert audit.rules == (AuthzRule(),)
    # selectors of root-namespace policies are kept: the sidecar matches its own labels
    assert block.selector == {"tier": "web"}


def test_a_service_with_no_policies_gets_only_mesh_wide_ones() -> None:
    policy = compile_inbound_policy(resources(), ServiceRef("shop", "cart"), 3, ROOT)
    assert policy.namespace == "shop" and policy.service == "cart" and policy.revision == 3
    assert [p.scope for p in policy.peer_authentication] == ["mesh"]
    assert all(a.mesh_wide for a in policy.authorization)


def test_nothing_applies_without_security_resources() -> None:
    vs_only = [r for r in resources() if r.kind == "VirtualService"]
    assert compile_inbound_policy(vs_only, REVIEWS, 5, ROOT) == InboundPolicy(
        namespace="default", service="reviews", revision=5
    )


def test_root_namespace_is_a_parameter() -> None:
    policy = compile_inbound_policy(resources(), REVIEWS, 1, "other")
    # `other` is now the root: its selector-less PeerAuthentication is mesh-wide and
    # its AuthorizationPolicy applies everywhere; istio-system's are just another namespace
    assert [(p.namespace, p.scope) for p in policy.peer_authentication] == [
        ("default", "namespace"),
        ("default", "workload"),
        ("other", "mesh"),
    ]
    assert [(a.namespace, a.name, a.mesh_wide) for a in policy.authorization] == [
        ("default", "deny-all", False),
        ("default", "reviews-viewer", False),
        ("other", "allow-all", True),
    ]


def test_output_is_deterministic_whatever_the_input_order() -> None:
    rs = resources()
    expected = compile_inbound_policy(rs, REVIEWS, 9, ROOT, create_revisions=created(rs))
    shuffled = list(rs)
    random.Random(4).shuffle(shuffled)
    again = compile_inbound_policy(shuffled, REVIEWS, 9, ROOT, create_revisions=created(rs))
    assert again == expected
    assert msgspec.msgpack.encode(again) == msgspec.msgpack.encode(expected)


def test_stored_form_compiles_the_same() -> None:
    """Stored resources come back from etcd as JSON (string port keys)."""
    from mesh.resources import to_dict

    rs = resources()
    stored = [parse_resource(to_dict(r), source="etcd", index=0) for r in rs]
    assert compile_inbound_policy(stored, REVIEWS, 1, ROOT) == compile_inbound_policy(
        rs, REVIEWS, 1, ROOT
    )


def test_wire_round_trip() -> None:
    policy = compile_inbound_policy(resources(), REVIEWS, 11, ROOT)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(policy), type=InboundPolicy)
    assert decoded == policy
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(policy))["type"] == "InboundPolicy"


# ---------------------------------------------------------------- settings


def test_root_namespace_setting() -> None:
    assert ConfigSettings.from_options({}).root_namespace == DEFAULT_ROOT_NAMESPACE == ROOT
    assert ConfigSettings.from_options({"root-namespace": "mesh-root"}).root_namespace == (
        "mesh-root"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"root-namespace": "Istio_System"}, "root-namespace: must be a DNS-1123 label"),
        ({"root-namespace": ""}, "root-namespace: must be a DNS-1123 label"),
        ({"rootnamespace": "x"}, "unknown option(s) rootnamespace; the config service knows"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigSettingsError) as info:
        ConfigSettings.from_options(options)
    assert str(info.value).startswith(message)


# ---------------------------------------------------------------- RateLimitPolicy (issue 6)

RATE_LIMITS = """
apiVersion: meshwork.io/v1
kind: RateLimitPolicy
metadata: {name: reviews, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  total: {requestsPerSecond: 100}
  identity: {requestsPerSecond: 20}
  overrides:
  - requestsPerSecond: 50
    clientRefs:
      principals: [cluster.local/ns/default/sa/productpage, cluster.local/ns/shop/sa/cart]
---
apiVersion: meshwork.io/v1
kind: RateLimitPolicy
metadata: {name: all-workloads, namespace: default}
spec:
  identity: {requestsPerSecond: 5}
---
apiVersion: meshwork.io/v1
kind: RateLimitPolicy
metadata: {name: ratings, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  total: {requestsPerSecond: 10}
---
apiVersion: meshwork.io/v1
kind: RateLimitPolicy
metadata: {name: elsewhere, namespace: shop}
spec:
  total: {requestsPerSecond: 1}
---
apiVersion: meshwork.io/v1
kind: RateLimitPolicy
metadata: {name: root, namespace: istio-system}
spec:
  total: {requestsPerSecond: 1}
"""


def test_rate_limit_policies_of_the_service_namespace() -> None:
    policy = compile_inbound_policy(resources(POLICIES + "---" + RATE_LIMITS), REVIEWS, 1, ROOT)
    # every policy of the namespace may select some instance of the service: the
    # sidecar keeps the ones matching its labels; other namespaces' never apply
    assert policy.rate_limits == (
        RateLimit(name="all-workloads", namespace="default", identity_rps=5),
        RateLimit(name="ratings", namespace="default", selector={"app": "ratings"},
                  total_rps=10),
        RateLimit(
            name="reviews",
            namespace="default",
            selector={"app": "reviews"},
            total_rps=100,
            identity_rps=20,
            overrides=(
                RateLimitOverride(
                    principals=("cluster.local/ns/default/sa/productpage",
                                "cluster.local/ns/shop/sa/cart"),
                    rps=50,
                ),
            ),
        ),
    )  # fmt: skip
    # authorization and peer authentication are unchanged by rate limits
    without = compile_inbound_policy(resources(), REVIEWS, 1, ROOT)
    assert msgspec.structs.replace(policy, rate_limits=()) == without


def test_rate_limits_survive_the_wire_and_old_policies_still_decode() -> None:
    policy = compile_inbound_policy(resources(RATE_LIMITS), ServiceRef("shop", "cart"), 2, ROOT)
    assert [r.name for r in policy.rate_limits] == ["elsewhere"]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(policy), type=InboundPolicy) == policy
    old = {"type": "InboundPolicy", "namespace": "default", "service": "reviews", "revision": 1}
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=InboundPolicy)
    assert decoded.rate_limits == ()


DRY_RUN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: default
  annotations:
    istio.io/dry-run: "true"
spec:
  action: DENY
  rules:
  - {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: enforced
  namespace: default
  annotations:
    istio.io/dry-run: "false"
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: plain
  namespace: default
spec: {}
"""


def test_dry_run_annotation_compiles_to_the_dry_run_flag() -> None:
    policy = compile_inbound_policy(resources(DRY_RUN), REVIEWS, 1, ROOT)
    assert policy.authorization == (
        AuthzPolicy(name="deny-all", namespace="default", action="DENY", rules=(AuthzRule(),),
                    dry_run=True),
        AuthzPolicy(name="enforced", namespace="default"),
        AuthzPolicy(name="plain", namespace="default"),
    )  # fmt: skip
    # a sidecar that predates the flag decodes enforced policies as before: the field
    # is absent on the wire unless set
    wire = msgspec.msgpack.encode(policy.authorization[1])
    assert b"dry_run" not in wire
    assert b"dry_run" in msgspec.msgpack.encode(policy.authorization[0])
