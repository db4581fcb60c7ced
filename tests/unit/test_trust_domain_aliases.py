"""Trust domain migration (MeshConfig `trustDomain`, `trustDomainAliases`): policy
principals are rewritten across the mesh's trust domain and its aliases as Istio's
`ReplaceTrustDomainAliases` does, at compile time, so both data planes see the result."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.hosts import ServiceRef
from mesh.resources import ResourceError, parse_resource
from proxy.policy import Authorizer, RequestFacts
from services.config.compile_security import compile_inbound_policy, with_trust_domain_aliases

BUNDLE = ("td2", "td1")  # migrated from td1 to td2

REWRITES = [
    # a principal of the mesh's trust domain or an alias: every trust domain of the bundle
    (["td1/ns/foo/sa/bar"], ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"]),
    (["td2/ns/foo/sa/bar"], ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"]),
    # "cluster.local" points at the local trust domain and its aliases
    (["cluster.local/ns/foo/sa/bar"], ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"]),
    # another trust domain, any trust domain, and what is not a SPIFFE principal: as written
    (["other/ns/foo/sa/bar"], ["other/ns/foo/sa/bar"]),
    (["*/ns/foo/sa/bar"], ["*/ns/foo/sa/bar"]),
    (["ns/foo/sa/bar", "*"], ["ns/foo/sa/bar", "*"]),
    # a pattern trust domain stays as written where it matches, no duplicates
    (["*1/ns/foo/sa/bar"], ["td2/ns/foo/sa/bar", "*1/ns/foo/sa/bar"]),
    (["td*/ns/foo/sa/bar"], ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"]),
]


@pytest.mark.parametrize(("principals", "expected"), REWRITES)
def test_principals_are_rewritten_across_the_bundle(
    principals: list[str], expected: list[str]
) -> None:
    assert list(with_trust_domain_aliases(principals, BUNDLE)) == expected


def test_without_a_bundle_principals_stay_as_written() -> None:
    assert with_trust_domain_aliases(["cluster.local/ns/a/sa/b"], ()) == (
        "cluster.local/ns/a/sa/b",
    )


def mesh_config(**spec: Any) -> Any:
    return parse_resource(
        {
            "apiVersion": "meshwork.io/v1",
            "kind": "MeshConfig",
            "metadata": {"name": "mesh", "namespace": "istio-system"},
            "spec": spec,
        },
        source="t.yaml",
        index=0,
    )


DENY_OLD_TD = parse_resource(
    {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny", "namespace": "default"},
        "spec": {
            "action": "DENY",
            "rules": [
                {"from": [{"source": {"principals": ["old-td/ns/sleep-allow/sa/sleep"]}}]},
                {"when": [{"key": "source.principal", "values": ["old-td/ns/x/sa/y"]}]},
            ],
        },
    },
    source="t.yaml",
    index=1,
)


def decide(resources: list[Any], principal: str) -> bool:
    policy = compile_inbound_policy(resources, ServiceRef("default", "httpbin"), 1, "istio-system")
    facts = RequestFacts(principal, principal.split("/")[2], "10.0.0.1", "GET", "/", "h", 8000, {})
    return Authorizer.build(policy, {}).decide(facts).allowed


def test_istio_trust_domain_migration_task() -> None:
    """Istio's authz-td-migration task: a policy written for old-td keeps denying the
    workload once the mesh moved to new-td with old-td as an alias."""
    migrated = [mesh_config(trustDomain="new-td", trustDomainAliases=["old-td"]), DENY_OLD_TD]
    assert not decide(migrated, "new-td/ns/sleep-allow/sa/sleep")
    assert not decide(migrated, "old-td/ns/sleep-allow/sa/sleep")
    assert not decide(migrated, "new-td/ns/x/sa/y")
    assert decide(migrated, "new-td/ns/default/sa/sleep")
    # without the alias the policy names a foreign trust domain only
    assert decide(
        [mesh_config(trustDomain="new-td"), DENY_OLD_TD], "new-td/ns/sleep-allow/sa/sleep"
    )


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"trustDomain": "Bad TD"}, "spec.trustDomain"),
        ({"trustDomainAliases": ["ok", "no/slash"]}, "spec.trustDomainAliases[1]"),
    ],
)
def test_trust_domain_refusals_name_the_field(spec: dict[str, Any], path: str) -> None:
    with pytest.raises(ResourceError) as info:
        mesh_config(**spec)
    assert info.value.path == path
