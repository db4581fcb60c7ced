"""`targetRef`/`targetRefs` on AuthorizationPolicy and RequestAuthentication: a policy
attached to a Service or a Gateway API Gateway by reference instead of a selector,
and the references that do not map to our workloads, refused with their path."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.hosts import ServiceRef
from mesh.resources import ResourceError, parse_resource
from proxy.policy import Authorizer, RequestFacts
from services.config.compile_security import GATEWAY_NAME_LABEL, compile_inbound_policy

HTTPBIN = ServiceRef("foo", "httpbin")


def policy(kind: str = "AuthorizationPolicy", namespace: str = "foo", **spec: Any) -> Any:
    if kind == "AuthorizationPolicy":
        spec.setdefault("action", "DENY")
        spec.setdefault("rules", [{"to": [{"operation": {"paths": ["/admin"]}}]}])
    else:
        spec.setdefault("jwtRules", [{"issuer": "iss", "jwksUri": "https://iss.example.com/jwks"}])
    return parse_resource(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": kind,
            "metadata": {"name": "p", "namespace": namespace},
            "spec": spec,
        },
        source="t.yaml",
        index=0,
    )


def compiled(resource: Any, ref: ServiceRef = HTTPBIN) -> Any:
    return compile_inbound_policy([resource], ref, 1, "istio-system")


def test_a_service_reference_applies_to_that_service_only() -> None:
    p = policy(targetRefs=[{"kind": "Service", "group": "", "name": "httpbin"}])
    (authz,) = compiled(p).authorization
    assert authz.selector == {} and not authz.mesh_wide
    assert compiled(p, ServiceRef("foo", "other")).authorization == ()
    # and it is enforced: the DENY rule applies to httpbin's workloads
    authorizer = Authorizer.build(compiled(p), {"app": "httpbin"})
    facts = RequestFacts("", "", "10.0.0.1", "GET", "/admin", "httpbin", 8000, {})
    assert not authorizer.decide(facts).allowed


def test_a_gateway_reference_selects_the_gateway_proxies_by_label() -> None:
    p = policy(targetRef={"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"})
    ingress = ServiceRef("foo", "gw-istio")
    (authz,) = compiled(p, ingress).authorization
    assert authz.selector == {GATEWAY_NAME_LABEL: "gw"}
    on_gateway = Authorizer.build(compiled(p, ingress), {GATEWAY_NAME_LABEL: "gw"})
    elsewhere = Authorizer.build(compiled(p, ingress), {GATEWAY_NAME_LABEL: "other"})
    facts = RequestFacts("", "", "10.0.0.1", "GET", "/admin", "gw", 8080, {})
    assert not on_gateway.decide(facts).allowed
    assert elsewhere.decide(facts).allowed


def test_a_reference_in_the_root_namespace_is_not_mesh_wide() -> None:
    p = policy(namespace="istio-system", targetRefs=[{"kind": "Service", "name": "httpbin"}])
    assert compiled(p).authorization == ()
    assert len(compiled(p, ServiceRef("istio-system", "httpbin")).authorization) == 1


def test_request_authentication_by_reference() -> None:
    p = policy("RequestAuthentication", targetRefs=[{"kind": "Service", "name": "httpbin"}])
    (authn,) = compiled(p).request_authentication
    assert authn.selector == {}
    assert compiled(p, ServiceRef("foo", "other")).request_authentication == ()


REFUSED = [
    ({"targetRefs": [{"kind": "ServiceEntry", "group": "networking.istio.io", "name": "x"}]},
     "spec.targetRefs[0].kind"),
    ({"targetRefs": [{"kind": "Gateway", "name": "x"}]}, "spec.targetRefs[0].kind"),
    ({"targetRefs": [{"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "x"}]},
     "spec.targetRefs[0].kind"),
    ({"targetRef": {"kind": "Service"}}, "spec.targetRef.name"),
    ({"targetRefs": [{"kind": "Service", "name": "x", "namespace": "bar"}]},
     "spec.targetRefs[0].namespace"),
    ({"selector": {"matchLabels": {"app": "x"}}, "targetRefs": [{"kind": "Service", "name": "x"}]},
     "spec.targetRefs"),
    ({"targetRef": {"kind": "Service", "name": "x"}, "targetRefs": [{"kind": "Service", "name": "y"}]},
     "spec.targetRefs"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "path"), REFUSED)
@pytest.mark.parametrize("kind", ["AuthorizationPolicy", "RequestAuthentication"])
def test_references_that_do_not_map_are_refused(kind: str, spec: dict[str, Any], path: str) -> None:
    with pytest.raises(ResourceError) as info:
        policy(kind, **spec)
    assert info.value.path == path
