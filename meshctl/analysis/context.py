"""The state analyzers look at: validated resources and the registered instances."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mesh.hosts import ServiceRef, canonical_host, service_of_host
from mesh.messages import Endpoint, EndpointSet
from mesh.resources import Resource

from .messages import ResourceName


@dataclass(frozen=True)
class Workload:
    """One registered instance: its service and the labels policies select on."""

    namespace: str
    service: str
    labels: Mapping[str, str]
    mtls: bool  # registered with an identity (a sidecar with a certificate)


@dataclass(frozen=True)
class Context:
    resources: Sequence[Resource]
    workloads: Sequence[Workload] = ()
    # the mesh-wide namespace of security policies (Istio's root namespace)
    root_namespace: str = "istio-system"
    services: frozenset[ServiceRef] = field(default=frozenset())

    def of_kind(self, kind: str) -> list[Resource]:
        return [r for r in self.resources if r.kind == kind]

    def service_known(self, ref: ServiceRef) -> bool:
        return ref in self.services


def workloads_of(sets: Sequence[EndpointSet]) -> list[Workload]:
    return [
        Workload(s.namespace, s.service, _labels(e), bool(e.identity))
        for s in sets
        for e in s.endpoints
    ]


def _labels(endpoint: Endpoint) -> dict[str, str]:
    labels = dict(endpoint.labels)
    if endpoint.version and "version" not in labels:
        labels["version"] = endpoint.version
    return labels


def build_context(
    resources: Sequence[Resource], sets: Sequence[EndpointSet], root_namespace: str = "istio-system"
) -> Context:
    workloads = workloads_of(sets)
    services = frozenset(ServiceRef(w.namespace, w.service) for w in workloads)
    return Context(resources, workloads, root_namespace, services)


def name_of(resource: Resource) -> ResourceName:
    return ResourceName(resource.kind, resource.metadata.namespace, resource.metadata.name)


def service_of(host: str, namespace: str) -> ServiceRef | None:
    """The mesh service a host written in `namespace` names (None: wildcard/external)."""
    fqdn = canonical_host(host, namespace)
    if fqdn.startswith("*"):
        return None
    return service_of_host(fqdn)


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
