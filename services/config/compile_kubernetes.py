"""Pure compiler of Kubernetes `Service` resources into RouteTable parts
(docs/architecture.md §8).

A Service whose selector narrows its backing service (`reviews-v1`: app=reviews,
version=v1) becomes a synthetic subset `k8s-<name>` of the backing service's table
(`kubernetes_subsets`), a default route for its own host (`kubernetes_default_route`),
and an alias the Envoy data plane follows (`kubernetes_aliases`); a backendRef naming
it resolves to (backing host, that subset) (`resolve_backend`). A Service that selects
exactly `app: <its own name>` is the registered service itself and adds nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh import compiled
from mesh.hosts import ServiceRef, canonical_host
from mesh.resources import Resource
from mesh.resources.kubernetes import APP_LABEL, ServiceSpec, backing_service

__all__ = [
    "K8S_SUBSET_PREFIX",
    "k8s_services",
    "kubernetes_aliases",
    "kubernetes_default_route",
    "kubernetes_subsets",
    "resolve_backend",
]

K8S_SUBSET_PREFIX = "k8s-"


def k8s_services(resources: Sequence[Resource]) -> dict[ServiceRef, ServiceSpec]:
    return {
        ServiceRef(r.metadata.namespace, r.metadata.name): r.spec
        for r in resources
        if isinstance(r.spec, ServiceSpec)
    }


def _narrows(name: str, spec: ServiceSpec) -> bool:
    """Whether the Service is anything but the whole registered service of its name."""
    return dict(spec.selector) != {APP_LABEL: name}


def resolve_backend(
    services: dict[ServiceRef, ServiceSpec], name: str, namespace: str
) -> tuple[str, str]:
    """(canonical host, subset) a backend Service name stands for."""
    spec = services.get(ServiceRef(namespace, name))
    if spec is None or not _narrows(name, spec):
        return canonical_host(name, namespace), ""
    backing = ServiceRef(namespace, backing_service(spec))
    return backing.fqdn, K8S_SUBSET_PREFIX + name


def kubernetes_subsets(
    resources: Sequence[Resource], service: ServiceRef, policy: compiled.TrafficPolicy
) -> tuple[compiled.Subset, ...]:
    """The synthetic subsets of `service` for the Kubernetes Services it backs."""
    return tuple(
        compiled.Subset(
            name=K8S_SUBSET_PREFIX + ref.name, labels=dict(spec.selector), traffic_policy=policy
        )
        for ref, spec in sorted(k8s_services(resources).items())
        if ref.namespace == service.namespace
        and backing_service(spec) == service.name
        and _narrows(ref.name, spec)
    )


def kubernetes_aliases(resources: Sequence[Resource], service: ServiceRef) -> tuple[str, ...]:
    """The hosts of the Kubernetes Services that narrow `service` (`reviews-v1`)."""
    return tuple(
        ref.fqdn
        for ref, spec in sorted(k8s_services(resources).items())
        if ref.namespace == service.namespace
        and backing_service(spec) == service.name
        and _narrows(ref.name, spec)
        and ref != service
    )


def kubernetes_default_route(
    resources: Sequence[Resource], service: ServiceRef
) -> compiled.HTTPRoute | None:
    """A request for a narrowing Kubernetes Service's own host (`reviews-v1`) with no
    rule of its own goes to the instances its selector picks."""
    spec = k8s_services(resources).get(service)
    if spec is None or not _narrows(service.name, spec):
        return None
    host, subset = resolve_backend({service: spec}, service.name, service.namespace)
    return compiled.HTTPRoute(
        name=f"service/{service.name}",
        route=(compiled.WeightedDestination(destination=compiled.Destination(host, subset)),),
        origin=f"Service/{service.namespace}/{service.name}",
    )
