"""Pure compiler of the mesh-wide configuration (`mesh.compiled_mesh.MeshWideConfig`):
the root namespace's MeshConfig `outboundTrafficPolicy` and every ServiceEntry host
with its route table (docs/architecture.md §5.5).

Istio semantics kept here:
- only MeshConfigs in the root namespace count; the newest one that sets
  `outboundTrafficPolicy` wins (there is normally one); unset is REGISTRY_ONLY;
- a ServiceEntry's hosts resolve in its namespace (`canonical_host`); one with N
  hosts gives N services; when several ServiceEntries name one host, the oldest
  wins (Istio merges them; we keep the first and say so in the docs);
- `exportTo` absent is `*`; `.` is the ServiceEntry's namespace; `~` none;
- VirtualServices and the DestinationRule for a ServiceEntry host compile as for a
  mesh service (timeouts, retries, subsets by endpoint labels, TLS origination).
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh.compiled import RouteTable
from mesh.compiled_mesh import (
    EntryEndpoint,
    EntryPort,
    ExternalService,
    Location,
    MeshWideConfig,
    OutboundMode,
    Resolution,
)
from mesh.hosts import ServiceRef, canonical_host, service_of_host
from mesh.resources import MeshConfigSpec, Resource, ServiceEntrySpec
from services.config.compile import compile_host_table

__all__ = ["compile_mesh_wide", "outbound_mode", "service_entry_refs"]


def compile_mesh_wide(
    resources: Sequence[Resource], root_namespace: str, revision: int
) -> MeshWideConfig:
    """`resources` in creation order (oldest first)."""
    services: dict[str, ExternalService] = {}
    for resource in resources:
        spec = resource.spec
        if not isinstance(spec, ServiceEntrySpec):
            continue
        namespace = resource.metadata.namespace
        for host in spec.hosts:
            fqdn = canonical_host(host, namespace)
            if fqdn in services:
                continue
            table = compile_host_table(resources, fqdn, namespace, fqdn, revision)
            services[fqdn] = _service(resource, spec, fqdn, table)
    return MeshWideConfig(
        revision=revision,
        outbound_traffic_policy=outbound_mode(resources, root_namespace),
        services=tuple(services[h] for h in sorted(services)),
    )


def service_entry_refs(resources: Sequence[Resource]) -> set[ServiceRef]:
    """The ServiceEntry hosts inside the mesh domain, as services (a change to their
    VirtualServices or DestinationRules changes the mesh-wide table too)."""
    refs: set[ServiceRef] = set()
    for resource in resources:
        if isinstance(resource.spec, ServiceEntrySpec):
            for host in resource.spec.hosts:
                ref = service_of_host(canonical_host(host, resource.metadata.namespace))
                if ref is not None:
                    refs.add(ref)
    return refs


def outbound_mode(resources: Sequence[Resource], root_namespace: str) -> OutboundMode:
    mode: OutboundMode = "REGISTRY_ONLY"
    for resource in resources:
        spec = resource.spec
        if not isinstance(spec, MeshConfigSpec) or resource.metadata.namespace != root_namespace:
            continue
        policy = spec.outbound_traffic_policy
        if policy is not None and policy.mode == "ALLOW_ANY":
            mode = "ALLOW_ANY"
        elif policy is not None and policy.mode == "REGISTRY_ONLY":
            mode = "REGISTRY_ONLY"
    return mode


def _service(
    resource: Resource, spec: ServiceEntrySpec, fqdn: str, table: RouteTable
) -> ExternalService:
    namespace = resource.metadata.namespace
    location: Location = "MESH_INTERNAL" if spec.location == "MESH_INTERNAL" else "MESH_EXTERNAL"
    resolution: Resolution = "NONE"
    if spec.resolution == "STATIC":
        resolution = "STATIC"
    elif spec.resolution == "DNS":
        resolution = "DNS"
    elif spec.resolution == "DNS_ROUND_ROBIN":
        resolution = "DNS_ROUND_ROBIN"
    ports = tuple(
        EntryPort(
            number=p.number or 0,
            name=p.name,
            protocol=p.protocol.upper() or "HTTP",
            target_port=p.target_port or 0,
        )
        for p in spec.ports
    )
    endpoints = tuple(
        EntryEndpoint(
            address=e.address,
            ports=dict(e.ports),
            labels=dict(e.labels),
            weight=1 if e.weight is None else e.weight,
        )
        for e in spec.endpoints
    )
    export_to = tuple(
        dict.fromkeys(namespace if t == "." else t for t in (spec.export_to or ("*",)) if t != "~")
    )
    return ExternalService(
        host=fqdn,
        namespace=namespace,
        name=resource.metadata.name,
        location=location,
        resolution=resolution,
        ports=ports,
        addresses=tuple(spec.addresses),
        endpoints=endpoints,
        export_to=export_to,
        workload_selector=dict(spec.workload_selector.labels) if spec.workload_selector else {},
        table=table,
    )
